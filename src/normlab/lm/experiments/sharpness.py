"""``normlab experiment sharpness``: progressive sharpening and the edge of stability.

``lecture-deep`` (5 × Linear → BatchNorm → tanh, an output BatchNorm) trained by plain SGD at
a constant learning rate, on batches of 1,024, once per learning rate; every 50 steps the
sharpness of the step's batch (the Hessian's top eigenvalue, ``normlab.curvature``) is
measured before its update. Gradient descent on a quadratic is stable while the sharpness
stays below 2/lr; Cohen et al. (ICLR 2021) found that training drives the sharpness up
(progressive sharpening) until it meets that line, and then holds it there (the edge of
stability). Per rate: the sharpness at the start, its peak, and its median over the second
half of the run, each against 2/lr.
"""

import statistics
from dataclasses import replace

from normlab.lm.config import preset_configs
from normlab.lm.data import load_dataset
from normlab.lm.experiments.common import Context, Table, fit, new_model

LRS, QUICK_LRS = (0.25, 0.5, 1.0, 2.0), (1.0, 2.0)
STEPS, QUICK_STEPS = 1500, 200
EVERY = 50  # steps between measurements
BATCH = 1024


def run(ctx: Context) -> dict:
    lrs = QUICK_LRS if ctx.quick else LRS
    steps = QUICK_STEPS if ctx.quick else STEPS
    model_config, train_config = preset_configs("lecture-deep")
    train_config = replace(
        train_config,
        seed=ctx.seed,
        steps=steps,
        batch_size=BATCH,
        decay_step=None,  # a constant rate
        diagnose_every=EVERY,
        second_order_every=EVERY,
    )
    data = load_dataset(None, model_config.block_size)
    table = Table(
        f"sharpness: lecture-deep, SGD at a constant rate, batch {BATCH:,}, {steps:,} steps",
        [("lr", 6), ("2/lr", 6), ("at step 0", 10), ("peak", 8), ("2nd half", 9), ("/ (2/lr)", 9)],
    )
    rows = []
    for lr in lrs:
        cell = fit(
            new_model(replace(model_config), data, ctx.seed),
            data,
            replace(train_config, lr=lr),
            ctx,
            f"lr {lr}",
        )
        series = [(step, so.sharpness) for step, so in cell.second_order if so.sharpness]
        late = [value for step, value in series if step >= steps // 2]
        line = 2 / lr
        row = {
            "lr": lr,
            "stability_line": line,
            "sharpness": series,
            "at_start": series[0][1],
            "peak": max(value for _, value in series),
            "second_half_median": statistics.median(late),
            "val_loss": cell.losses["val"],
        }
        rows.append(row)
        ratio = row["second_half_median"] / line
        table.row(lr, line, row["at_start"], row["peak"], row["second_half_median"], ratio)
    ctx.save_figure(_figure(rows, steps), "sharpness.png")
    return {"batch_size": BATCH, "steps": steps, "every": EVERY, "runs": rows}


def _figure(rows: list[dict], steps: int):
    from normlab.report import pyplot  # matplotlib only when a figure is made

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for k, row in enumerate(rows):
        color = f"C{k}"
        ax.plot(*zip(*row["sharpness"], strict=True), color=color, label=f"lr {row['lr']}")
        ax.axhline(row["stability_line"], color=color, linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlim(0, steps)
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness λmax (dashed: 2/lr)")
    ax.set_title("lecture-deep, SGD: the sharpness rises to 2/lr", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
