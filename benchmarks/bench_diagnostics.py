"""The cost of diagnostics in real training runs: --diagnose-every 100 against none.

Runs ``normlab.lm.train.train`` itself (the loop, evaluations and checkpoints as
in any run) in alternating pairs of runs, with recordings every 100 steps and
the second-order measurements at their default cadence, and with neither, and
prints, as medians over the runs:

- recordings, in-run: how much longer the recorded steps took than the run's
  plain steps, as a share of its training time (``diagnostics_share``, which
  counts the compile and the evaluations as training time), and as a share of
  its steps' own time (``diagnostics_step_share``: what the share tends to in a
  run long enough that the compile and evaluations vanish). Measured inside
  one run, neither suffers from run-to-run noise.
- second order: one measurement's milliseconds, its share of the training
  time (``second_order_share``), and its share at its own cadence: one
  measurement against ``--second-order-every`` typical steps.
- end to end: the median throughput of the runs with diagnostics against the
  median of the runs without. On a shared machine these vary by several
  percent from run to run, so read it as a check on the first figures.

Goal (issue 27): the recordings cost at most 3% of training time, and the
second-order measurements as little at their own cadence.

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

from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.presets import PRESETS
from normlab.lm.train import train

CASES = [("lecture-deep", 32, 1), ("default", 256, 2)]  # preset, batch size, threads


def run_config(preset, batch_size, threads, steps, diagnose_every) -> tuple:
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
    return model, tcfg


def run_summary(model, tcfg, folder) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train(copy.deepcopy(model), tcfg, folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {args.steps} steps a run, {args.rounds} rounds a variant")
    print(
        f"{'preset':<14}{'batch':>6}{'threads':>8}"
        f"{'recordings: of train':>22}{'of steps':>10}"
        f"{'second order: ms':>18}{'of train':>10}{'at cadence':>12}"
        f"{'none':>11}{'with':>11}{'end to end':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = 0
        for preset, batch, threads in CASES:
            rates, with_diagnostics = {0: [], 100: []}, []
            for _ in range(args.rounds):
                for every in (0, 100):
                    run += 1
                    model, tcfg = run_config(preset, batch, threads, args.steps, every)
                    summary = run_summary(model, tcfg, Path(tmp) / f"run{run}")
                    rates[every].append(summary["steps_per_s"])
                    if every:
                        with_diagnostics.append(summary)

            def median(key, summaries=with_diagnostics):
                return statistics.median(s[key] for s in summaries)

            measurements = max(median("second_order_measurements"), 1)
            second_order_ms = 1000 * median("second_order_s") / measurements
            typical_step_ms = 1000 * median("step_s") / args.steps
            at_cadence = second_order_ms / (tcfg.second_order_every * typical_step_ms)
            off, on = statistics.median(rates[0]), statistics.median(rates[100])
            print(
                f"{preset:<14}{batch:>6}{threads:>8}"
                f"{median('diagnostics_share'):>22.1%}{median('diagnostics_step_share'):>10.1%}"
                f"{second_order_ms:>18.1f}{median('second_order_share'):>10.1%}"
                f"{at_cadence:>12.1%}"
                f"{off:>9.1f}/s{on:>9.1f}/s{1 - on / off:>12.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
