"""``normlab experiment width``: does the best learning rate carry over from narrow to wide?

The ``default`` preset's model (2 hidden blocks Linear → BatchNorm → tanh over 8 characters,
no output BatchNorm) at hidden widths 64 to 1,024, trained by AdamW on the names for the same
steps (warm-up a tenth, then cosine decay), at each peak learning rate of a grid of seven
half-decades, under the standard parametrization and under μP (``--param mup``, base width
64), with two seeds. Per parametrization and width: the learning rate with the lowest val loss
(averaged over the seeds). Beside it, the coord check of both parametrizations over the same
widths, at the grid's middle rate.
"""

import statistics
from dataclasses import replace

from normlab.lm.config import preset_configs
from normlab.lm.coordcheck import coord_check_model
from normlab.lm.data import load_dataset
from normlab.lm.experiments.common import Context, Table, fit, new_model

WIDTHS, QUICK_WIDTHS = (64, 128, 256, 512, 1024), (32, 64, 128)
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_LRS = (1e-3, 1e-2, 1e-1)
PARAMS = ("standard", "mup")
STEPS, QUICK_STEPS = 600, 40
SEEDS, QUICK_SEEDS = 2, 1


def run(ctx: Context) -> dict:
    widths = QUICK_WIDTHS if ctx.quick else WIDTHS
    lrs = QUICK_LRS if ctx.quick else LRS
    steps = QUICK_STEPS if ctx.quick else STEPS
    seeds = range(ctx.seed, ctx.seed + (QUICK_SEEDS if ctx.quick else SEEDS))
    model_config, train_config = preset_configs("default")
    train_config = replace(
        train_config,
        steps=steps,
        warmup_steps=steps // 10,
        diagnose_every=steps,  # step 0 alone, which fit reports
        second_order_every=0,
    )
    data = load_dataset(train_config.data, model_config.block_size)
    grid = []
    for param in PARAMS:
        table = Table(
            f"width, {param}: AdamW, {steps:,} steps, val loss (mean of {len(seeds)} seed(s))",
            [("width", 6), *[(f"{lr:g}", 8) for lr in lrs], ("best lr", 8)],
        )
        for width in widths:
            config = replace(model_config, n_hidden=width, param=param, base_width=widths[0])
            means = []
            for lr in lrs:
                losses = []
                for seed in seeds:
                    cell = fit(
                        new_model(replace(config), data, seed),
                        data,
                        replace(train_config, lr=lr, seed=seed),
                        ctx,
                        f"{param} width {width} lr {lr:g}",
                    )
                    losses.append(cell.losses["val"])
                    grid.append(
                        {
                            "width": width,
                            "lr": lr,
                            "param": param,
                            "seed": seed,
                            "val_loss": cell.losses["val"],
                        }
                    )
                means.append(statistics.fmean(losses))
            best = min(range(len(lrs)), key=lambda k: means[k])
            table.row(width, *means, f"{lrs[best]:g}")
    best = _best(grid, widths, lrs)
    for param in PARAMS:
        steps_apart = (
            max(best[param].values(), key=lrs.index),
            min(best[param].values(), key=lrs.index),
        )
        print(
            f"  {param}: best lr from {best[param][widths[0]]:g} (width {widths[0]}) to "
            f"{best[param][widths[-1]]:g} (width {widths[-1]}); spread "
            f"{lrs.index(steps_apart[0]) - lrs.index(steps_apart[1])} grid step(s)"
        )
    coord = {}
    for param in PARAMS:
        middle = replace(train_config, lr=lrs[len(lrs) // 2])
        check = coord_check_model(
            replace(model_config, param=param, base_width=widths[0]), middle, data, list(widths)
        )
        check.plot(ctx.out / f"coordcheck-{param}.png")
        coord[param] = {"slopes": check.slopes, "flagged": check.flagged}
        print(f"  coord check, {param}: {len(check.flagged)} layer(s) drift with the width")
    ctx.save_figure(_figure(grid, widths, lrs), "width.png")
    return {
        "steps": steps,
        "widths": list(widths),
        "lrs": list(lrs),
        "grid": grid,
        "best_lr": {p: {str(w): lr for w, lr in b.items()} for p, b in best.items()},
        "coord_check": coord,
    }


def _best(grid: list[dict], widths, lrs) -> dict[str, dict[int, float]]:
    """Per parametrization and width, the rate whose val loss, averaged over seeds, is lowest."""
    best = {}
    for param in PARAMS:
        best[param] = {}
        for width in widths:
            mean = {
                lr: statistics.fmean(
                    r["val_loss"]
                    for r in grid
                    if (r["param"], r["width"], r["lr"]) == (param, width, lr)
                )
                for lr in lrs
            }
            best[param][width] = min(mean, key=mean.get)
    return best


def _figure(grid: list[dict], widths, lrs):
    from normlab.report import pyplot  # matplotlib only when a figure is made

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, param in zip(axes, PARAMS, strict=True):
        for k, width in enumerate(widths):
            means = [
                statistics.fmean(
                    r["val_loss"]
                    for r in grid
                    if (r["param"], r["width"], r["lr"]) == (param, width, lr)
                )
                for lr in lrs
            ]
            ax.plot(lrs, means, "o-", color=f"C{k}", label=f"width {width}", markersize=3)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (AdamW)")
        ax.set_title(param, fontsize=9)
    axes[0].set_ylabel("val loss")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig
