"""Named configurations for ``--preset``; any flag overrides one field.

Each preset sets model fields (``ModelConfig``) and training fields
(``TrainConfig``); fields it leaves out keep the dataclass defaults.
"""

# makemore part 5's scaled-up hierarchical model: 76,579 parameters, weights N(0, 1 / fan_in)
# (the lecture's Linear: no tanh gain), BatchNorm over (B, T)
WAVENET_76K = dict(
    arch="wavenet",
    n_embd=24,
    block_size=8,
    n_layer=3,
    n_hidden=128,
    norm="batch",
    nonlinearity="tanh",
    init="kaiming",
    gain=1.0,
)

# the lectures' optimization: plain SGD on batches of 32, lr 0.1 then × 0.1 from decay_step
LECTURE_SGD = dict(
    optimizer="sgd",
    batch_size=32,
    lr=0.1,
    schedule="step",
    steps=200_000,
    eval_every=10_000,
    checkpoint_every=10_000,
)
# runs of minutes: AdamW on batches of 256, a short warmup, then a cosine decay to 5%
MINUTES_ADAMW = dict(
    optimizer="adamw",
    batch_size=256,
    lr=3e-3,
    schedule="cosine",
    warmup_steps=200,
    min_lr_ratio=0.05,
    weight_decay=0.1,
)

PRESETS: dict[str, dict[str, dict]] = {
    # makemore part 3, the first BatchNorm network: 12,097 parameters
    "lecture-mlp": {
        "model": dict(
            n_embd=10,
            block_size=3,
            n_layer=1,
            n_hidden=200,
            norm="batch",
            nonlinearity="tanh",
            init="kaiming",
            bn_momentum=0.001,
        ),
        "train": dict(**LECTURE_SGD, decay_step=100_000),
    },
    # makemore part 3, the deep network: 5 × (Linear → BatchNorm1d → Tanh), Linear → BatchNorm1d
    "lecture-deep": {
        "model": dict(
            n_embd=10,
            block_size=3,
            n_layer=5,
            n_hidden=100,
            norm="batch",
            nonlinearity="tanh",
            init="kaiming",
            output_bn=True,
        ),
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
            **MINUTES_ADAMW, ema=0.999, steps=12_000, eval_every=2000, checkpoint_every=2000
        ),
    },
    # what `normlab train` runs: a minute-scale BatchNorm MLP (see README for its numbers)
    "default": {
        "model": dict(
            n_embd=24,
            block_size=8,
            n_layer=2,
            n_hidden=256,
            norm="batch",
            nonlinearity="tanh",
            init="kaiming",
        ),
        # eager: its step is mostly matrix products, so compiling saves about 0.8 ms of 4.3 per
        # step, less over 8,000 steps than a first compile costs (docs/PERFORMANCE.md)
        "train": dict(
            **MINUTES_ADAMW, steps=8000, eval_every=1000, checkpoint_every=1000, compile=False
        ),
    },
    # the shortest wall time to val 2.10 (`normlab train --preset sprint --target-val-loss 2.10`):
    # one wide layer over a long context, large batches, a short cosine schedule; eager, as
    # compiling the step would take longer than the whole run
    "sprint": {
        "model": dict(
            n_embd=24,
            block_size=8,
            n_layer=1,
            n_hidden=256,
            norm="batch",
            nonlinearity="tanh",
            init="kaiming",
        ),
        "train": dict(
            optimizer="adamw",
            batch_size=1024,
            lr=1e-2,
            schedule="cosine",
            warmup_steps=50,
            min_lr_ratio=0.0,
            steps=500,
            eval_every=100,
            eval_train_examples=5000,  # the whole train split would cost as much as 50 steps
            checkpoint_every=500,
            compile=False,
        ),
    },
    # a first recipe for the lowest loss from a plain BatchNorm MLP, for runs of minutes
    "best": {
        "model": dict(
            n_embd=32,
            block_size=10,
            n_layer=3,
            n_hidden=512,
            norm="batch",
            nonlinearity="tanh",
            init="kaiming",
            residual=True,
            dropout=0.2,
        ),
        "train": dict(
            optimizer="adamw",
            batch_size=256,
            lr=2e-3,
            schedule="cosine",
            warmup_steps=500,
            min_lr_ratio=0.02,
            weight_decay=0.1,
            ema=0.999,  # evaluates the weights' moving average: val 1.9497 against 1.9505
            steps=15_000,
            eval_every=2500,
            checkpoint_every=2500,
            compile=False,  # its 512-wide products leave compiling nothing to gain
        ),
    },
}
