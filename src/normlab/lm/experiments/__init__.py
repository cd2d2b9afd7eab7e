"""``normlab experiment NAME``: reproducible measurements behind docs/RESULTS.md.

Each experiment is a module with ``run(ctx) -> dict``: it prints a table as it
goes, saves its figures into ``ctx.out`` and returns the results, which are
written to ``results.json`` there.
"""

import importlib

from normlab.lm.experiments.common import Context

EXPERIMENTS = ("lecture", "depth", "batchnorm", "wavenet", "lr-find", "sharpness", "width")


def run_experiment(ctx: Context) -> dict:
    """Run one experiment and write its results; returns them."""
    if ctx.name not in EXPERIMENTS:
        valid = ", ".join(EXPERIMENTS)
        raise ValueError(f"unknown experiment {ctx.name!r}; valid choices: {valid}")
    ctx.prepare()
    module = importlib.import_module(f"normlab.lm.experiments.{ctx.name.replace('-', '_')}")
    results = module.run(ctx)
    path = ctx.write_results(results)
    print(f"results: {path}; figures: {ctx.out}/*.png")
    return results
