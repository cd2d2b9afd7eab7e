"""``normlab experiment wavenet``: the performance log of makemore part 5, row by row.

Every row trains with the lecture's optimization (SGD, batch 32, 200,000
steps, lr 0.1 then 0.01 from step 150,000) on the lectures' 80/10/10 split,
from weights ``N(0, 1 / fan_in)`` (the lecture's Linear), an output layer
× 0.1 and no bias before a BatchNorm:

1. context 8: the flat MLP over 8 characters (n_embd 10, 200 units);
2. hierarchical: ``--arch wavenet`` (n_embd 10, 68 units, 3 levels) with the
   lecture's BatchNorm bug: statistics over the batch alone, one per position
   (``--no-bn-over-positions``; its gain and bias are per position too, so it
   has 544 more parameters than the lecture's);
3. batchnorm fix: the same over the batch and the positions;
4. scaled up: the ``lecture-wavenet`` preset (n_embd 24, 128 units).

The losses are in eval mode (running statistics) over the whole splits, as the
lecture's ``split_loss``; each row also reports them with statistics
calibrated over the whole training set.
"""

from dataclasses import replace

from normlab.lm.config import ModelConfig, preset_configs
from normlab.lm.data import load_dataset
from normlab.lm.experiments.common import (
    TOLERANCE,
    Context,
    Table,
    against_the_lecture,
    calibrated_losses,
    fit,
    new_model,
)

# makemore part 5, "performance log": (train, val)
LECTURE = {
    "context 8": (1.918, 2.027),
    "hierarchical": (1.941, 2.029),
    "batchnorm fix": (1.912, 2.022),
    "scaled up": (1.769, 1.993),
}
QUICK_STEPS = 1_000

SCALED_UP, LECTURE_SGD = preset_configs("lecture-wavenet")
SMALL = dict(n_embd=10, n_layer=3, n_hidden=68)  # the hierarchical rows' 22K parameters
ROWS: dict[str, ModelConfig] = {
    "context 8": replace(SCALED_UP, arch="mlp", n_embd=10, n_layer=1, n_hidden=200),
    "hierarchical": replace(SCALED_UP, **SMALL, bn_over_positions=False),
    "batchnorm fix": replace(SCALED_UP, **SMALL),
    "scaled up": SCALED_UP,
}


def run(ctx: Context) -> dict:
    steps = QUICK_STEPS if ctx.quick else LECTURE_SGD.steps
    decay_step = steps * 3 // 4  # 150,000 of 200,000
    tcfg = replace(
        LECTURE_SGD, steps=steps, decay_step=decay_step, diagnose_every=steps, seed=ctx.seed
    )
    data = load_dataset(None, SCALED_UP.block_size)
    print(
        f"wavenet: {len(ROWS)} rows × {steps:,} SGD steps (batch 32, lr 0.1 → 0.01 at "
        f"{decay_step:,}), seed {ctx.seed}"
    )
    table = Table(
        "rows (eval mode, whole splits; the lecture's numbers for comparison)",
        [
            ("row", 13),
            ("params", 6),
            ("train", 7),
            ("val", 7),
            ("val calib.", 10),
            ("lect. train", 11),
            ("lect. val", 9),
            ("val − lect.", 11),
            ("minutes", 7),
        ],
    )
    rows = []
    for name, config in ROWS.items():
        model = new_model(replace(config), data, ctx.seed)
        result = fit(model, data, tcfg, ctx, desc=name)
        lecture_train, lecture_val = LECTURE[name]
        row = {
            "row": name,
            "arch": config.arch,
            "params": model.num_params(),
            "train_loss": result.losses["train"],
            "val_loss": result.losses["val"],
            **calibrated_losses(model, data, ctx.device),
            "lecture_train": lecture_train,
            "lecture_val": lecture_val,
            "val_minus_lecture": result.losses["val"] - lecture_val,
            "train_minus_lecture": result.losses["train"] - lecture_train,
            "seconds": round(result.seconds, 1),
        }
        rows.append(row)
        table.row(
            name,
            row["params"],
            row["train_loss"],
            row["val_loss"],
            row["calibrated_val_loss"],
            lecture_train,
            lecture_val,
            f"{row['val_minus_lecture']:+.4f}",
            f"{row['seconds'] / 60:.1f}",
        )
    within = [abs(r["val_minus_lecture"]) <= TOLERANCE for r in rows]
    print(f"val within ±{TOLERANCE} of the lecture: {sum(within)} of {len(rows)} rows")
    labels = [f"{r['row']}\n{r['params']:,}" for r in rows]
    ctx.save_figure(against_the_lecture(rows, labels, "makemore part 5, row by row"), "wavenet.png")
    return {"steps": steps, "decay_step": decay_step, "tolerance": TOLERANCE, "rows": rows}
