"""``normlab experiment lecture``: the loss log of makemore part 3, stage by stage.

One hidden layer (n_embd 10, block 3, 200 tanh units), SGD with batch 32 for
200,000 steps, lr 0.1 then 0.01 from step 100,000, on the lectures' 80/10/10
split. Every stage starts from plain ``randn`` tensors, as the lecture's code
does, and scales them:

1. original: nothing scaled (initial loss ≈ 27);
2. softmax fix: output weights × 0.01, output bias × 0;
3. tanh fix: also hidden weights × 0.2 and hidden bias × 0.01;
4. Kaiming: hidden weights × (5/3)/sqrt(30) and no hidden bias (the output
   keeps stage 2's fix);
5. BatchNorm after the hidden Linear (no bias before it), running statistics
   with momentum 0.001.

The losses are in eval mode over the whole splits; stage 5 is evaluated, as in
the lecture's final ``split_loss``, with the running statistics, and also with
statistics calibrated over the whole training set.
"""

import math
from dataclasses import asdict, dataclass

from normlab.lm.config import ModelConfig
from normlab.lm.data import load_dataset
from normlab.lm.experiments.common import (
    TOLERANCE,
    Context,
    Table,
    against_the_lecture,
    calibrated_losses,
    fit,
    lecture_sgd,
    new_model,
    step0_health,
)
from normlab.lm.init_schemes import LectureScales, scale_lecture_

# the lecture's loss log (train, val), makemore part 3, "loss log" cell
LECTURE = {
    "original": (2.1245, 2.1682),
    "softmax fix": (2.07, 2.13),
    "tanh fix": (2.0356, 2.1027),
    "kaiming": (2.0377, 2.1070),
    "batchnorm": (2.0668, 2.1048),
}
N_EMBD, BLOCK_SIZE, N_HIDDEN = 10, 3, 200


@dataclass(frozen=True)
class Stage:
    """The lecture's scales on the naive model's ``randn`` tensors (the ``lecture`` init's
    recipe, stage by stage); ``hidden_bias`` False: no hidden bias."""

    name: str
    scales: LectureScales
    hidden_bias: bool = True
    batchnorm: bool = False


KAIMING = (5 / 3) / math.sqrt(N_EMBD * BLOCK_SIZE)  # tanh gain / sqrt(fan_in)
KAIMING_SCALES = LectureScales(hidden_weight=KAIMING, hidden_bias=1.0)  # no bias to scale
STAGES = (
    Stage("original", LectureScales(1.0, 1.0, 1.0, 1.0)),
    Stage("softmax fix", LectureScales(hidden_weight=1.0, hidden_bias=1.0)),
    Stage("tanh fix", LectureScales()),  # the lecture's final recipe: init lecture
    Stage("kaiming", KAIMING_SCALES, hidden_bias=False),
    Stage("batchnorm", KAIMING_SCALES, hidden_bias=False, batchnorm=True),
)


def stage_config(stage: Stage) -> ModelConfig:
    return ModelConfig(
        block_size=BLOCK_SIZE,
        n_embd=N_EMBD,
        n_hidden=N_HIDDEN,
        n_layer=1,
        norm="batch" if stage.batchnorm else "none",
        nonlinearity="tanh",
        init="naive",  # every tensor plain randn, biases included
        bias=stage.hidden_bias,
        bn_momentum=0.001,
    )


def run(ctx: Context) -> dict:
    steps = 2_000 if ctx.quick else 200_000
    tcfg = lecture_sgd(steps, decay_step=steps // 2, seed=ctx.seed)
    data = load_dataset(None, BLOCK_SIZE)
    print(
        f"lecture: {len(STAGES)} stages × {steps:,} SGD steps (batch 32, lr 0.1 → 0.01 at "
        f"{steps // 2:,}), seed {ctx.seed}"
    )
    table = Table(
        "stage results (eval mode, whole splits; lecture's numbers for comparison)",
        [
            ("stage", 12),
            ("init loss", 9),
            ("tanh sat", 8),
            ("train", 7),
            ("val", 7),
            ("lect. train", 11),
            ("lect. val", 9),
            ("val − lect.", 11),
        ],
    )
    rows = []
    for stage in STAGES:
        model = new_model(stage_config(stage), data, ctx.seed)
        scale_lecture_(model, stage.scales)
        result = fit(model, data, tcfg, ctx, desc=stage.name)
        lecture_train, lecture_val = LECTURE[stage.name]
        row = {
            "stage": stage.name,
            "scales": asdict(stage.scales),
            "params": sum(p.numel() for p in model.parameters()),
            "init_loss": result.init_loss,
            # the lecture's saturation measure, on the first batch: |tanh| beyond 0.97
            "tanh_saturated_step0": step0_health(result.snapshot)["saturated_first"],
            "train_loss": result.losses["train"],
            "val_loss": result.losses["val"],
            "lecture_train": lecture_train,
            "lecture_val": lecture_val,
            "val_minus_lecture": result.losses["val"] - lecture_val,
            "train_minus_lecture": result.losses["train"] - lecture_train,
            "seconds": round(result.seconds, 1),
        }
        if stage.batchnorm:
            row.update(calibrated_losses(model, data, ctx.device))
        rows.append(row)
        table.row(
            stage.name,
            row["init_loss"],
            f"{row['tanh_saturated_step0']:.1%}",
            row["train_loss"],
            row["val_loss"],
            lecture_train,
            lecture_val,
            f"{row['val_minus_lecture']:+.4f}",
        )
    bn = rows[-1]
    print(
        f"batchnorm stage with calibrated statistics: train {bn['calibrated_train_loss']:.4f}, "
        f"val {bn['calibrated_val_loss']:.4f}"
    )
    within = [abs(r["val_minus_lecture"]) <= TOLERANCE for r in rows]
    print(f"val within ±{TOLERANCE} of the lecture: {sum(within)} of {len(rows)} stages")
    labels = [r["stage"] for r in rows]
    fig = against_the_lecture(rows, labels, "makemore part 3, stage by stage")
    ctx.save_figure(fig, "lecture.png")
    return {"steps": steps, "tolerance": TOLERANCE, "stages": rows}
