"""``normlab experiment depth``: which tanh MLPs can be trained as depth grows.

Every cell is the same language model (n_embd 10, block 3, hidden width 100,
tanh) with ``depth`` hidden blocks, one init/normalization variant, and the
same budget and optimizer: SGD, batch 32, lr 0.1, × 0.1 for the last quarter
of the steps. Per cell: the val loss at the end, and from the diagnostics of
step 0 the loss, the last hidden activation's std, the gradient-std ratio of
the first to the last hidden activation, and the verdicts that fired. Each
cell has a fixed seed; the full run trains every cell with a second seed and
reports how far the val loss moves.
"""

import math
import statistics
from dataclasses import asdict, replace

from normlab.lm.config import ModelConfig
from normlab.lm.data import load_dataset
from normlab.lm.experiments.common import (
    Context,
    Table,
    fit,
    lecture_sgd,
    new_model,
    step0_health,
)

VARIANTS: dict[str, dict] = {
    "naive": dict(init="naive", norm="none"),
    "kaiming gain 1": dict(init="kaiming", gain=1.0, norm="none"),
    "kaiming 5/3": dict(init="kaiming", norm="none"),
    "kaiming 5/3 + BN": dict(init="kaiming", norm="batch"),
    "kaiming + LN": dict(init="kaiming", norm="layer"),
    "kaiming + BN + residual": dict(init="kaiming", norm="batch", residual=True),
    "kaiming + BN + residual/√2L": dict(
        init="kaiming", norm="batch", residual=True, residual_scale="depth"
    ),
    "kaiming 5/3 + residual": dict(init="kaiming", norm="none", residual=True),
    "kaiming 5/3 + residual/√2L": dict(
        init="kaiming", norm="none", residual=True, residual_scale="depth"
    ),
    "lsuv": dict(init="lsuv", norm="none"),
}
DEPTHS = (2, 5, 10, 20, 50)
QUICK_DEPTHS = (2, 5)
STEPS, QUICK_STEPS = 4_000, 100
WIDTH = 100


def cell_config(variant: str, depth: int) -> ModelConfig:
    return ModelConfig(
        block_size=3,
        n_embd=10,
        n_hidden=WIDTH,
        n_layer=depth,
        nonlinearity="tanh",
        **VARIANTS[variant],
    )


def run(ctx: Context) -> dict:
    steps = QUICK_STEPS if ctx.quick else STEPS
    depths = QUICK_DEPTHS if ctx.quick else DEPTHS
    seeds = (ctx.seed,) if ctx.quick else (ctx.seed, ctx.seed + 1)
    data = load_dataset(None, 3)
    print(
        f"depth: {len(VARIANTS)} variants × depths {', '.join(map(str, depths))} × seeds "
        f"{', '.join(map(str, seeds))}; width {WIDTH}, tanh; SGD batch 32, {steps:,} steps, "
        f"lr 0.1 → 0.01 at {steps * 3 // 4:,}"
    )
    table = Table(
        "per cell: val loss at the end; loss, last activation std and grad ratio at step 0",
        [
            ("variant", 28),
            ("depth", 5),
            ("seed", 4),
            ("val", 7),
            ("loss@0", 7),
            ("act std", 7),
            ("grad 1st/last", 13),
            ("verdicts at step 0", 30),
        ],
    )
    cells = []
    for seed in seeds:
        # only the val loss is reported: the train loss at the end is measured on a sample
        tcfg = replace(
            lecture_sgd(steps, decay_step=steps * 3 // 4, seed=seed), eval_train_examples=1000
        )
        for variant in VARIANTS:
            for depth in depths:
                model = new_model(cell_config(variant, depth), data, seed)
                result = fit(model, data, tcfg, ctx, desc=f"{variant} {depth}")
                cell = {
                    "variant": variant,
                    "depth": depth,
                    "seed": seed,
                    "val_loss": result.losses["val"],
                    "diverged_at": result.diverged_at,
                    "loss_step0": result.init_loss,
                    **step0_health(result.snapshot, data.vocab.size),
                    "seconds": round(result.seconds, 1),
                }
                if result.lsuv is not None:
                    cell["lsuv"] = [asdict(r) for r in result.lsuv]
                cells.append(cell)
                table.row(
                    variant,
                    depth,
                    seed,
                    cell["val_loss"],
                    cell["loss_step0"],
                    cell["act_std_last"],
                    cell["grad_ratio_first_last"],
                    ", ".join(cell["verdicts"]) or "-",
                )
    summary = seed_spread(cells, seeds)
    if len(seeds) > 1:
        print(
            f"\nsecond seed: val loss moved by {summary['mean_abs_diff']:.4f} on average, "
            f"{summary['max_abs_diff']:.4f} at most ({summary['max_cell']}), over "
            f"{summary['cells']} cells that trained with both seeds"
        )
    ctx.save_figure(_figure(cells, seeds[0], depths), "depth.png")
    return {
        "steps": steps,
        "depths": list(depths),
        "seeds": list(seeds),
        "variants": VARIANTS,
        "cells": cells,
        "seed_spread": summary,
    }


def seed_spread(cells: list[dict], seeds: tuple[int, ...]) -> dict:
    """How far the val loss of each (variant, depth) moves between the first two seeds."""
    if len(seeds) < 2:
        return {}
    by_key = {(c["variant"], c["depth"], c["seed"]): c["val_loss"] for c in cells}
    diffs = {}
    for variant, depth, seed in by_key:
        if seed != seeds[0]:
            continue
        a, b = by_key[(variant, depth, seeds[0])], by_key[(variant, depth, seeds[1])]
        if math.isfinite(a) and math.isfinite(b):
            diffs[f"{variant} @ {depth}"] = abs(a - b)
    worst = max(diffs, key=diffs.get)
    return {
        "cells": len(diffs),
        "mean_abs_diff": statistics.fmean(diffs.values()),
        "max_abs_diff": diffs[worst],
        "max_cell": worst,
        "abs_diff": diffs,
    }


def _figure(cells: list[dict], seed: int, depths):
    from normlab.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for variant in VARIANTS:
        points = [
            (c["depth"], c["val_loss"])
            for c in cells
            if c["variant"] == variant and c["seed"] == seed and math.isfinite(c["val_loss"])
        ]
        if points:  # a variant that diverged at every depth has no line
            ax.plot(*zip(*points, strict=True), "o-", label=variant)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(list(depths), [str(d) for d in depths])
    ax.set_xlabel("hidden layers")
    ax.set_ylabel("val loss")
    ax.set_title(f"val loss against depth (seed {seed})")
    ax.legend(fontsize=7)
    return fig
