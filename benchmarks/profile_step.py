"""Where one compiled step of lecture-deep at batch 32 spends its time.

Runs ``TrainStep(compile=True)`` (SGD, lr 0.1) warm, then:

- times its parts over the same steps: the compiled graph (forward, backward, and SGD's
  update, which the graph holds), and the rest of the call (the learning rate, the graph's
  key, the bookkeeping);
- profiles the whole step with ``torch.profiler``: the operators by their own CPU time.

    .venv/bin/python benchmarks/profile_step.py [--rounds 3] [--threads 1]
"""

import statistics
import time

import torch
from bench_train import LR, lecture_deep, rounds_and_threads
from torch.profiler import ProfilerActivity, profile

from normlab.lm.config import TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.optim import make_optimizer
from normlab.lm.presets import PRESETS
from normlab.lm.step import TrainStep

BATCH, STEPS = 32, 2000


def main():
    args = rounds_and_threads(__doc__)
    data = load_dataset(None, PRESETS["lecture-deep"]["model"]["block_size"])
    X, Y = data.splits["train"]
    g = torch.Generator().manual_seed(0)
    batches = [(X[ix], Y[ix]) for ix in torch.randint(0, len(X), (STEPS, BATCH), generator=g)]
    model = lecture_deep(data.vocab.size)
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=LR, weight_decay=0.0))
    step = TrainStep(model, optimizer, BATCH, compile=True)
    for x, y in batches[:20]:  # the compile, and the graph proven
        step(x, y, LR)
    core = step.core
    x, y = batches[0]
    key = core._key(x, y)
    graph = core._compiled[key]
    in_graph = 0.0  # seconds inside the compiled graph, summed

    def timed_graph(*args):
        nonlocal in_graph
        start = time.perf_counter()
        try:
            return graph(*args)
        finally:
            in_graph += time.perf_counter() - start

    core._compiled[key] = timed_graph  # the step calls it as it calls the graph

    parts = {"whole step": [], "compiled graph": [], "the rest": []}
    for _ in range(args.rounds):
        in_graph = 0.0
        start = time.perf_counter()
        for x, y in batches:
            step(x, y, LR)
        whole = time.perf_counter() - start
        totals = {"whole step": whole, "compiled graph": in_graph, "the rest": whole - in_graph}
        for name in parts:
            parts[name].append(totals[name] / len(batches) * 1e6)
    print(f"lecture-deep, batch {BATCH}, {args.threads} thread(s), µs per step (median of "
          f"{args.rounds} rounds of {STEPS:,} steps):")  # fmt: skip
    for name, values in parts.items():
        print(f"  {name:<16} {statistics.median(values):8.1f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches[:200]:
            step(x, y, LR)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
