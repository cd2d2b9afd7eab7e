"""What a diagnostics recording costs on lecture-deep, as a compiled run takes it.

A run records every 100th step: ``CompiledStep.record``, which for lecture-deep on SGD, its
step compiled, runs the recording's own compiled graph (the step, the batch's eval-mode loss
and every statistic, in one call), then ``Diagnostics.take``, which brings the statistics to
the host as a Snapshot (``normlab train`` takes that graph in a run of at least
``RECORDINGS_TO_COMPILE`` recordings, as lecture-deep's 2,000; ``TrainStep`` here always does).
Here lecture-deep trains as ``normlab train`` does, recording every 100th step, and the
benchmark prints per batch size the plain step's time, a recording's (and
its parts: the recorded step, ``take``), and a recording's cost against the 100 steps it
covers; then the first recording's time (a run's first step: the pass that learns what the
model writes in place, the recording graph's trace and its compile, with whatever the compile
cache holds) and which path recordings took. The recordings run between plain steps, as in a
run, not back to back: the caches a plain step leaves make a recording slower than it is in a
tight loop, which the last figures give (a recording's parts back to back, and the statistics'
operators' share, from ``torch.profiler``).

    .venv/bin/python benchmarks/bench_recording.py [--rounds 3] [--threads 1]
"""

import statistics
import time

import torch
from bench_train import lecture_deep, rounds_and_threads

from normlab.diagnostics import Diagnostics
from normlab.lm.config import TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.optim import make_optimizer
from normlab.lm.presets import PRESETS
from normlab.lm.step import TrainStep

LR = 0.1
EVERY = 100  # the default --diagnose-every
CASES = ((32, 30), (256, 10))  # batch size, recordings per round


class Parts:
    """Seconds spent in the recorded step and in ``take``, summed."""

    def __init__(self, step: TrainStep, diagnostics: Diagnostics) -> None:
        self.seconds = {"step": 0.0, "take": 0.0}
        for part, owner, name in (("step", step.core, "record"), ("take", diagnostics, "take")):
            setattr(owner, name, self._timed(part, getattr(owner, name)))

    def _timed(self, part: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed


def one_round(step, diagnostics, parts, batches) -> tuple[float, float, dict]:
    """Milliseconds per plain step and per recording, and per part of a recording."""
    for part in parts.seconds:
        parts.seconds[part] = 0.0
    plain_s = recorded_s = 0.0
    recordings = 0
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        if i % EVERY == 0:
            step(x, y, LR, diagnostics, i)
            recorded_s += time.perf_counter() - start
            recordings += 1
        else:
            step(x, y, LR)
            plain_s += time.perf_counter() - start
    plain_ms = 1000 * plain_s / (len(batches) - recordings)
    per_part = {part: 1000 * s / recordings for part, s in parts.seconds.items()}
    return plain_ms, 1000 * recorded_s / recordings, per_part


def alone(step: TrainStep, diagnostics: Diagnostics, x, y, n: int = 300) -> str:
    """Back to back, ``n`` recordings' parts (the recorded step, ``take``), and the
    statistics' operators' time per recording (``torch.profiler``): what a recording costs
    with its caches warm."""
    recorded = step.core.record(x, y, LR, diagnostics)
    start = time.perf_counter()
    for _ in range(n):
        step.core.record(x, y, LR, diagnostics)
    step_ms = 1000 * (time.perf_counter() - start) / n
    start = time.perf_counter()
    for i in range(n):
        diagnostics.take(recorded.measured, i)
    take_ms = 1000 * (time.perf_counter() - start) / n
    with torch.profiler.profile() as profile:
        for _ in range(20):
            step.core.record(x, y, LR, diagnostics)
    ops = [e for e in profile.key_averages() if e.key.startswith("normlab::")]
    ops = ", ".join(f"{e.key[9:]} {e.self_cpu_time_total / 20:.0f} µs" for e in ops)
    return f"back to back: the recorded step {step_ms:.2f} ms, take {take_ms:.2f} ms ({ops})"


def main():
    args = rounds_and_threads(__doc__)
    data = load_dataset(None, PRESETS["lecture-deep"]["model"]["block_size"])
    X, Y = data.splits["train"]
    g = torch.Generator().manual_seed(0)
    for batch_size, recordings in CASES:
        n = recordings * EVERY
        ix = torch.randint(0, len(X), (n, batch_size), generator=g)
        batches = [(X[i], Y[i]) for i in ix]
        model = lecture_deep(data.vocab.size)
        optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=LR, weight_decay=0.0))
        step = TrainStep(model, optimizer, batch_size, compile=True)
        diagnostics = Diagnostics(model)
        start = time.perf_counter()
        step(*batches[0], LR, diagnostics, 0)  # a run's first step records
        first_s = time.perf_counter() - start
        step(*batches[1], LR)  # compiles the plain step (or loads it from the cache)
        path = "in their compiled graph" if step.core._forms else "untraced"
        parts = Parts(step, diagnostics)
        rounds = [one_round(step, diagnostics, parts, batches) for _ in range(args.rounds)]
        plain = statistics.median(r[0] for r in rounds)
        recording = statistics.median(r[1] for r in rounds)
        per_part = {p: statistics.median(r[2][p] for r in rounds) for p in parts.seconds}
        share = (recording - plain) / (EVERY * plain)
        print(
            f"batch {batch_size}, {args.threads} thread(s): plain compiled step {plain:.3f} ms; "
            f"a recording every {EVERY} steps {recording:.2f} ms ("
            + ", ".join(f"{p} {ms:.2f}" for p, ms in per_part.items())
            + f"), {recording / plain:.1f}× a plain step, {share:.1%} of the {EVERY} steps' time; "
            f"the first recording {first_s:.2f} s; recordings ran {path}; "
            + alone(step, diagnostics, *batches[0]),
            flush=True,
        )


if __name__ == "__main__":
    main()
