"""The cost of diagnostics in real training runs: --diagnose-every 100 against none.

Runs ``normlab.train.train`` itself (the loop, evaluations and checkpoints as
in any run) in alternating pairs of runs, with recordings every 100 steps and
with none. Noise on a shared machine only ever slows a run down, so the cost
is read from the best run of each variant (as timeit does); the median runs
are printed too. Goal: the recordings cost at most 5% of throughput.

    .venv/bin/python benchmarks/bench_diagnostics.py [--rounds 5] [--steps 3000]
"""

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
from pathlib import Path

import torch

from normlab.model import ModelConfig
from normlab.presets import PRESETS
from normlab.train import TrainConfig, train

CASES = [("lecture-deep", 32, 1), ("default", 256, 2)]  # preset, batch size, threads


def steps_per_s(preset, batch_size, threads, steps, diagnose_every, folder):
    model = ModelConfig(**PRESETS[preset]["model"])
    tcfg = TrainConfig(
        **{
            **PRESETS[preset]["train"],
            "steps": steps,
            "batch_size": batch_size,
            "eval_every": steps,
            "checkpoint_every": steps,
            "threads": threads,
            "diagnose_every": diagnose_every,
            "device": "cpu",
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(copy.deepcopy(model), tcfg, folder)
    return summary["steps_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {args.steps} steps a run, {args.rounds} rounds a variant")
    print(
        f"{'preset':<14}{'batch':>6}{'threads':>8}{'best: none':>13}{'every 100':>12}{'cost':>7}"
        f"{'median: none':>15}{'every 100':>12}{'cost':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = 0
        for preset, batch, threads in CASES:
            rates = {0: [], 100: []}
            for _ in range(args.rounds):
                for every in (0, 100):
                    run += 1
                    folder = Path(tmp) / f"run{run}"
                    rates[every].append(
                        steps_per_s(preset, batch, threads, args.steps, every, folder)
                    )
            best_off, best_on = max(rates[0]), max(rates[100])
            off, on = statistics.median(rates[0]), statistics.median(rates[100])
            print(
                f"{preset:<14}{batch:>6}{threads:>8}{best_off:>11.1f}/s{best_on:>10.1f}/s"
                f"{1 - best_on / best_off:>7.1%}{off:>13.1f}/s{on:>10.1f}/s{1 - on / off:>7.1%}"
            )


if __name__ == "__main__":
    main()
