"""What a diagnostics recording costs on lecture-deep, on the compiled path and on autograd.

On the compiled path (``normlab train``'s default) a recording step runs
``CompiledStep.recorded``: the step traced with the ``Diagnostics`` hooks attached,
its graph run uncompiled. Against it, in the same run: the same recording on
autograd (``--no-compile``), the plain compiled step, and what compiling the
recording's graph as well would cost (its first call) and save (its steps).
Each recording includes ``Diagnostics.collect()``, the statistics themselves.

    .venv/bin/python benchmarks/bench_recording.py [--rounds 3] [--threads 1]
"""

import os
import statistics
import tempfile
import time

import torch
from bench_train import lecture_deep, rounds_and_threads

from normlab.diagnostics import Diagnostics
from normlab.lm import compiled as compiled_module
from normlab.lm.config import TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.optim import make_optimizer, set_learning_rate
from normlab.lm.presets import PRESETS
from normlab.lm.step import TrainStep

LR = 0.1
CASES = ((32, 100), (256, 40))  # batch size, recordings per round


def lecture_deep_step(vocab_size: int, batch_size: int, compiled: bool):
    """``TrainStep`` on lecture-deep with SGD, and a ``Diagnostics`` of its model."""
    model = lecture_deep(vocab_size)
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=LR, weight_decay=0.0))
    return TrainStep(model, optimizer, batch_size, compile=compiled), Diagnostics(model)


def per_step_ms(run, batches) -> float:
    start = time.perf_counter()
    for x, y in batches:
        run(x, y)
    return 1000 * (time.perf_counter() - start) / len(batches)


def main():
    args = rounds_and_threads(__doc__)
    with tempfile.TemporaryDirectory() as cache:
        # an empty compile cache: compiling costs what it costs on a machine's first run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        run_cases(args)


def run_cases(args):
    data = load_dataset(None, PRESETS["lecture-deep"]["model"]["block_size"])
    X, Y = data.splits["train"]
    g = torch.Generator().manual_seed(0)
    for batch_size, n in CASES:
        batches = [(X[ix], Y[ix]) for ix in torch.randint(0, len(X), (n, batch_size), generator=g)]
        times, trace_s, compile_s = one_case(data.vocab.size, batches, args.rounds)
        line = ", ".join(f"{name} {statistics.median(t):.2f} ms" for name, t in times.items())
        print(
            f"batch {batch_size}, {args.threads} thread(s): {line}; the first recording "
            f"(its trace) {trace_s:.2f} s; compiling the recording's graph {compile_s:.1f} s",
            flush=True,
        )


def one_case(vocab_size: int, batches: list, rounds: int) -> tuple[dict, float, float]:
    """Milliseconds per step of each set-up in each round, the first recording's seconds,
    and the seconds of compiling the recording's graph (its first call)."""
    x, y = batches[0]
    batch_size = len(y)
    traced, traced_diag = lecture_deep_step(vocab_size, batch_size, compiled=True)
    eager, eager_diag = lecture_deep_step(vocab_size, batch_size, compiled=False)
    plain, _ = lecture_deep_step(vocab_size, batch_size, compiled=True)
    start = time.perf_counter()
    traced(x, y, LR, traced_diag)
    trace_s = time.perf_counter() - start
    plain(x, y, LR)
    # the recording's graph, compiled as the plain step's is
    recording = traced.core
    key = recording._key(x, y, traced_diag)
    compiled_graph = torch.compile(
        recording._compiled[key], dynamic=False, options=compiled_module._options(x.device)
    )

    def compiled_recording(x, y):  # CompiledStep.recorded, with the graph compiled
        traced_diag.arm()
        out = compiled_graph(recording.tensors, x, y)
        grads, update = recording._grads_at(recording._places[key])
        set_learning_rate(recording.optimizer, LR)
        update()
        for p, grad in zip(recording.params, grads, strict=True):
            p.grad = grad
        traced_diag.restore(out[2])
        traced_diag.collect(0)

    start = time.perf_counter()
    compiled_recording(x, y)
    compile_s = time.perf_counter() - start
    runs = {
        "recording, traced graph uncompiled (the default)": lambda x, y: traced(
            x, y, LR, traced_diag
        ),
        "recording, autograd (--no-compile)": lambda x, y: eager(x, y, LR, eager_diag),
        "recording, traced graph compiled": compiled_recording,
        "plain compiled step": lambda x, y: plain(x, y, LR),
    }
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(per_step_ms(run, batches))
    return times, trace_s, compile_s


if __name__ == "__main__":
    main()
