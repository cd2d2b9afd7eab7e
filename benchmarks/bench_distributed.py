"""What data parallelism costs on one machine: 2 processes on gloo over loopback against 1.

For each case it runs ``normlab train`` (the real command, through torch's
launcher for 2 processes) in alternating rounds of three set-ups with the same
global batch:

- 1 process on ``--threads`` threads (the baseline), and on 2 threads;
- 2 processes, synchronized BatchNorm (the default): one all-reduce per
  BatchNorm per forward and per backward, besides DDP's gradient all-reduce;
- 2 processes with ``--no-sync-batchnorm``: DDP's all-reduce alone;
- 2 processes, synchronized, ``--no-compile``: autograd and DDP instead of the
  compiled step (which all-reduces the gradients itself). Presets that train
  eagerly anyway (``default``, ``best``) run the same thing twice here.

It reads the mean time of a training step from each run's checkpoint (steps
without evaluations or diagnostics, after the first, which compiles) and prints
the medians over rounds and the ratios measured in this run: sync against
no-sync is what synchronized BatchNorm costs, 2 processes against 1 what data
parallelism costs or gains at this size.

    .venv/bin/python benchmarks/bench_distributed.py [--rounds 3] [--steps 500] [--preset P]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# preset, global batch: from a step of ~2 ms (all latency) to one where the arithmetic dominates
CASES = [("lecture-deep", 32), ("default", 256), ("best", 1024)]
SETUPS = {  # name: (processes, extra flags)
    "1 process": (1, []),
    "1 process, 2 threads": (1, ["--threads", "2"]),  # the same cores as 2 processes
    "2 processes, sync BN": (2, []),
    "2 processes, local BN": (2, ["--no-sync-batchnorm"]),
    "2 processes, sync BN, --no-compile": (2, ["--no-compile"]),
}


def step_ms(preset: str, batch_size: int, nproc: int, flags: list[str], steps: int, out: Path):
    command = [
        *(sys.executable, "-m", "normlab", "train", "--out", str(out), "--nproc", str(nproc)),
        *("--preset", preset, "--batch-size", str(batch_size), "--steps", str(steps)),
        *("--eval-every", str(steps), "--checkpoint-every", str(steps), "--diagnose-every", "0"),
        *("--device", "cpu", *flags),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)}\nexit code {result.returncode}:\n{result.stderr[-3000:]}")
    progress = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]
    return 1000 * progress["plain_step_s"] / progress["plain_steps"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--threads", type=int, default=1, help="per process (OMP_NUM_THREADS; default 1)"
    )
    parser.add_argument(
        "--preset", action="append", choices=[p for p, _ in CASES], help="only these cases"
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every process, 1 or 2 of them
    results = []
    cases = [(p, b) for p, b in CASES if args.preset is None or p in args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        for preset, batch_size in cases:
            times = {name: [] for name in SETUPS}
            for r in range(args.rounds):
                for name, (nproc, flags) in SETUPS.items():
                    out = Path(tmp) / f"{preset}-{batch_size}-{nproc}-{'-'.join(flags)}-{r}"
                    times[name].append(step_ms(preset, batch_size, nproc, flags, args.steps, out))
            ms = {name: statistics.median(t) for name, t in times.items()}
            sync, local = ms["2 processes, sync BN"], ms["2 processes, local BN"]
            row = {
                "preset": preset,
                "batch_size": batch_size,
                **{f"{name} (ms/step)": round(t, 3) for name, t in ms.items()},
                "sync BN cost (ms/step)": round(sync - local, 3),
                "2 processes / 1 process (time per step)": round(sync / ms["1 process"], 2),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"threads per process {args.threads}, {args.steps} steps per run, median of "
        f"{args.rounds} rounds, {os.cpu_count()} CPU cores"
    )


if __name__ == "__main__":
    main()
