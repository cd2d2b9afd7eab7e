"""Named configurations for ``--preset``; any flag overrides one field.

Each preset states only the model fields (``ModelConfig``) and training fields
(``TrainConfig``) where it differs from the configs' defaults, which are what
``normlab train`` runs with no flag (the ``default`` preset).
"""

# makemore part 5's scaled-up hierarchical model: 76,579 parameters, weights N(0, 1 / fan_in)
# (the lecture's Linear: no tanh gain), BatchNorm over (B, T)
WAVENET_76K = dict(arch="wavenet", n_embd=24, block_size=8, n_layer=3, n_hidden=128, gain=1.0)

# the lectures' optimization, declared once: plain SGD on batches of 32, lr 0.1 then × 0.1 from
# decay_step, no weight decay, the step compiled
LECTURE_SGD = dict(
    optimizer="sgd",
    batch_size=32,
    lr=0.1,
    schedule="step",
    warmup_steps=0,
    min_lr_ratio=0.1,
    weight_decay=0.0,
    steps=200_000,
    eval_every=10_000,
    checkpoint_every=10_000,
    compile=True,
)

PRESETS: dict[str, dict[str, dict]] = {
    # what `normlab train` runs: the configs' own defaults, a minute-scale BatchNorm MLP
    # (n_embd 24, context 8, 2 × 256 tanh; AdamW on batches of 256 for 8,000 steps, eager)
    "default": {"model": {}, "train": {}},
    # makemore part 3, the first BatchNorm network: 12,097 parameters
    "lecture-mlp": {
        "model": dict(n_embd=10, block_size=3, n_layer=1, n_hidden=200, bn_momentum=0.001),
        "train": dict(**LECTURE_SGD, decay_step=100_000),
    },
    # makemore part 3, the deep network: 5 × (Linear → BatchNorm1d → Tanh), Linear → BatchNorm1d
    "lecture-deep": {
        "model": dict(n_embd=10, block_size=3, n_layer=5, n_hidden=100, output_bn=True),
        "train": dict(**LECTURE_SGD, decay_step=150_000),
    },
    # makemore part 5, the scaled-up model as the lecture trains it
    "lecture-wavenet": {
        "model": WAVENET_76K,
        "train": dict(**LECTURE_SGD, decay_step=150_000),
    },
    # lecture-wavenet's model, trained by AdamW on batches of 256 for minutes, not SGD for
    # hours: the lowest val loss found here at ≤ 76,579 parameters (docs/RESULTS.md)
    "compact": {
        "model": WAVENET_76K,
        "train": dict(
            ema=0.999, steps=12_000, eval_every=2000, checkpoint_every=2000, compile=True
        ),
    },
    # the shortest wall time to val 2.10 (`normlab train --preset sprint --target-val-loss 2.10`):
    # one wide layer over a long context, large batches, a short cosine schedule; eager, as
    # compiling the step would take longer than the whole run
    "sprint": {
        "model": dict(n_layer=1),
        "train": dict(
            batch_size=1024,
            lr=1e-2,
            warmup_steps=50,
            min_lr_ratio=0.0,
            weight_decay=0.0,
            steps=500,
            eval_every=100,
            eval_train_examples=5000,  # the whole train split would cost as much as 50 steps
            checkpoint_every=500,
        ),
    },
    # a first recipe for the lowest loss from a plain BatchNorm MLP, for runs of minutes
    "best": {
        "model": dict(
            n_embd=32, block_size=10, n_layer=3, n_hidden=512, residual=True, dropout=0.2
        ),
        "train": dict(
            lr=2e-3,
            warmup_steps=500,
            min_lr_ratio=0.02,
            ema=0.999,  # evaluates the weights' moving average: val 1.9497 against 1.9505
            steps=15_000,
            eval_every=2500,
            checkpoint_every=2500,
        ),
    },
}
