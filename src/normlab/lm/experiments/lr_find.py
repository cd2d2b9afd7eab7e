"""``normlab experiment lr-find``: does ``normlab lr-find``'s suggestion train as well as the best
learning rate of a grid, at the same step budget?

Two setups: the ``default`` preset (AdamW, warm-up and cosine decay) and ``lecture-deep``
(the lectures' SGD on batches of 32, × 0.1 for the second half of the steps). For each, the
range test (``normlab.lm.lr_range.lr_range_test``: 100 batches, 1e-7 to 10) suggests a peak
learning rate; then the same model, from the same initial weights, trains for the same steps
at each rate of a grid of seven half-decades and at the suggestion. The check: the
suggestion's val loss within 0.02 of the grid's best.
"""

from dataclasses import replace

from normlab.lm.config import preset_configs
from normlab.lm.data import load_dataset
from normlab.lm.experiments.common import Context, Table, fit, new_model
from normlab.lm.lr_range import lr_range_test

GRIDS = {
    "default": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),  # AdamW
    "lecture-deep": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),  # SGD
}
STEPS = {"default": 2000, "lecture-deep": 4000}
QUICK_STEPS = 200
WITHIN = 0.02  # the suggestion's val loss within this of the grid's best


def run(ctx: Context) -> dict:
    results = {"within": WITHIN, "setups": {}}
    for preset, grid in GRIDS.items():
        steps = QUICK_STEPS if ctx.quick else STEPS[preset]
        model_config, train_config = preset_configs(preset)
        train_config = replace(train_config, steps=steps, seed=ctx.seed)
        if train_config.schedule == "step":
            train_config = replace(train_config, decay_step=steps // 2)
        data = load_dataset(train_config.data, model_config.block_size)
        model_config.vocab_size = data.vocab.size
        sweep = lr_range_test(model_config, replace(train_config, compile=False), data)
        table = Table(
            f"{preset}: {train_config.optimizer}, {steps:,} steps; the range test suggests "
            f"{sweep.suggestion:.3g}",
            [("lr", 10), ("val loss", 10), ("", 12)],
        )
        rows = []
        for lr in (*grid, sweep.suggestion):
            cell = fit(
                new_model(replace(model_config), data, ctx.seed),
                data,
                replace(train_config, lr=lr),
                ctx,
                f"{preset} lr {lr:.3g}",
            )
            suggested = lr == sweep.suggestion and len(rows) == len(grid)
            rows.append({"lr": lr, "val_loss": cell.losses["val"], "suggested": suggested})
            table.row(f"{lr:.3g}", cell.losses["val"], "(suggested)" if suggested else "")
        best = min(rows[:-1], key=lambda r: r["val_loss"])
        gap = rows[-1]["val_loss"] - best["val_loss"]
        print(
            f"  best of the grid: lr {best['lr']:.3g}, val {best['val_loss']:.4f}; the suggestion "
            f"is {gap:+.4f} from it ({'within' if gap <= WITHIN else 'NOT within'} {WITHIN})"
        )
        results["setups"][preset] = {
            "optimizer": train_config.optimizer,
            "steps": steps,
            "suggestion": sweep.suggestion,
            "sweep_stopped": sweep.stopped,
            "grid": rows[:-1],
            "suggested_val_loss": rows[-1]["val_loss"],
            "best_lr": best["lr"],
            "best_val_loss": best["val_loss"],
            "gap": gap,
        }
    ctx.save_figure(_figure(results), "lr-find.png")
    return results


def _figure(results: dict):
    from normlab.report import pyplot  # matplotlib only when a figure is made

    plt = pyplot()
    setups = results["setups"]
    fig, axes = plt.subplots(1, len(setups), figsize=(4 * len(setups), 3.2), squeeze=False)
    for ax, (preset, setup) in zip(axes[0], setups.items(), strict=True):
        ax.plot([r["lr"] for r in setup["grid"]], [r["val_loss"] for r in setup["grid"]], "o-")
        ax.plot([setup["suggestion"]], [setup["suggested_val_loss"]], "r*", markersize=12)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("val loss")
        ax.set_title(f"{preset} ({setup['optimizer']}, {setup['steps']:,} steps)", fontsize=9)
    fig.tight_layout()
    return fig
