"""The cost of diagnostics in real training runs: --diagnose-every 100 against none.

Runs ``normlab.lm.train.train`` itself (the loop, evaluations and checkpoints as
in any run) in alternating pairs of runs, with recordings every 100 steps and
with none, and prints two figures:

- in-run: each run with recordings times every step and reports in its
  summary how much longer the recorded steps took than its plain steps, as a
  share of its training time (``diagnostics_share``); the median over runs.
  Measured inside one run, it does not suffer from run-to-run noise.
- end to end: the median throughput of the runs with recordings against the
  median of the runs without. On a shared machine these vary by several
  percent from run to run, so read it as a check on the first figure.

Goal: the recordings cost at most 5% of throughput.

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


def run_summary(preset, batch_size, threads, steps, diagnose_every, folder):
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
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {args.steps} steps a run, {args.rounds} rounds a variant")
    print(
        f"{'preset':<14}{'batch':>6}{'threads':>8}{'in-run share':>14}"
        f"{'none':>11}{'every 100':>12}{'end to end':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = 0
        for preset, batch, threads in CASES:
            rates, shares = {0: [], 100: []}, []
            for _ in range(args.rounds):
                for every in (0, 100):
                    run += 1
                    folder = Path(tmp) / f"run{run}"
                    summary = run_summary(preset, batch, threads, args.steps, every, folder)
                    rates[every].append(summary["steps_per_s"])
                    if every:
                        shares.append(summary["diagnostics_share"])
            off, on = statistics.median(rates[0]), statistics.median(rates[100])
            print(
                f"{preset:<14}{batch:>6}{threads:>8}{statistics.median(shares):>14.1%}"
                f"{off:>9.1f}/s{on:>10.1f}/s{1 - on / off:>12.1%}"
            )


if __name__ == "__main__":
    main()
