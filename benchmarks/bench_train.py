"""Training throughput of lecture-deep: normlab's default step against plain torch.nn + SGD.

The baseline is the one the performance issue names, built here from the same
initial weights: nn.Embedding, nn.Linear(bias=False), nn.BatchNorm1d, nn.Tanh,
torch.optim.SGD. Against it, in the same run:

- normlab default: ``normlab.lm.step.TrainStep`` with ``normlab.lm.compiled.CompiledStep``,
  the step ``normlab train --preset lecture-deep`` runs with no flag: the model's
  forward, autograd's backward and the update traced into one graph and compiled;
- normlab --no-compile: the same ``TrainStep`` eager: ``LanguageModel``'s
  hand-written layers, autograd and the fused SGD of ``make_optimizer``.

At each batch size it first checks that the three agree over 100 steps (10
at batch 4096) from the same weights, then times them in alternating rounds
and prints steps/s and the ratios to the baseline. Last, the compile time of
``normlab bench --preset lecture-deep``, each in a new process: with an empty
compile cache (a machine's first run), and again with the cache that run left.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--threads 1]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.model import LanguageModel
from normlab.lm.optim import make_optimizer
from normlab.lm.presets import PRESETS
from normlab.lm.step import TrainStep

LR = 0.1
CASES = ((32, 2000), (256, 800), (4096, 60))  # batch size, steps per round


def lecture_deep(vocab_size: int) -> LanguageModel:
    config = ModelConfig(**PRESETS["lecture-deep"]["model"], vocab_size=vocab_size)
    return LanguageModel(config, torch.Generator().manual_seed(0), verbose=False)


def torch_nn_copy(model: LanguageModel) -> nn.Sequential:
    """The same network in plain torch.nn layers, with ``model``'s weights."""
    c = model.config
    layers, fan_in = [nn.Embedding(c.vocab_size, c.n_embd), nn.Flatten()], c.block_size * c.n_embd
    for _ in range(c.n_layer):
        layers += [nn.Linear(fan_in, c.n_hidden, bias=False), nn.BatchNorm1d(c.n_hidden), nn.Tanh()]
        fan_in = c.n_hidden
    layers += [nn.Linear(fan_in, c.vocab_size, bias=False), nn.BatchNorm1d(c.vocab_size)]
    baseline = nn.Sequential(*layers)
    ours = [p for p in model.parameters()]
    with torch.no_grad():
        for p, q in zip(baseline.parameters(), ours, strict=True):
            p.copy_(q)
    return baseline


def sgd_runner(model: nn.Module, loss_of):
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def run(x, y):
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return run


def normlab_runner(model: LanguageModel, batch_size: int, compiled: bool):
    """normlab train's own step (``TrainStep``), compiled or eager, with its SGD."""
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=LR, weight_decay=0.0))
    step = TrainStep(model, optimizer, batch_size, compile=compiled)
    return lambda x, y: step(x, y, LR).loss


def runners(vocab_size: int, batch_size: int) -> dict:
    """The three training steps, each on its own copy of the same initial network."""
    base = torch_nn_copy(lecture_deep(vocab_size))
    return {
        "torch.nn baseline": sgd_runner(base, lambda x, y: F.cross_entropy(base(x), y)),
        "normlab default": normlab_runner(lecture_deep(vocab_size), batch_size, compiled=True),
        "normlab --no-compile": normlab_runner(
            lecture_deep(vocab_size), batch_size, compiled=False
        ),
    }


def rounds_and_threads(doc: str) -> argparse.Namespace:
    """The flags ``--rounds`` (default 3) and ``--threads`` (default 1, set for torch)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main():
    args = rounds_and_threads(__doc__)
    data = load_dataset(None, PRESETS["lecture-deep"]["model"]["block_size"])
    X, Y = data.splits["train"]

    def batches(batch_size, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [
            (X[ix], Y[ix])
            for ix in (torch.randint(0, len(X), (batch_size,), generator=g) for _ in range(n))
        ]

    for batch_size, n in CASES:
        # the same numbers: 100 steps from the same weights
        steps = runners(data.vocab.size, batch_size)
        worst, compile_s = 0.0, 0.0
        for x, y in batches(batch_size, 100 if batch_size < 4096 else 10, seed=1):
            losses = []
            for name, run in steps.items():
                start = time.perf_counter()
                losses.append(run(x, y).item())
                if name == "normlab default" and not compile_s:  # the first call compiles
                    compile_s = time.perf_counter() - start
            worst = max(worst, max(losses) - min(losses))
        assert worst < 1e-3, f"the three training steps disagree at batch {batch_size}"
        rates = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, run in steps.items():
                data_ = batches(batch_size, n)
                start = time.perf_counter()
                for x, y in data_:
                    run(x, y)
                rates[name].append(n / (time.perf_counter() - start))
        base = statistics.median(rates["torch.nn baseline"])
        line = ", ".join(
            f"{name} {statistics.median(r):,.0f} steps/s ({statistics.median(r) / base:.2f}×)"
            for name, r in rates.items()
        )
        print(
            f"batch {batch_size}, {args.threads} thread(s): {line}; the first compiled step took "
            f"{compile_s:.1f} s; the three agree to {worst:.1e} in loss",
            flush=True,
        )
    with tempfile.TemporaryDirectory() as cache:
        cold, warm = (warmup_seconds(cache, args.threads) for _ in "ab")
        eager = warmup_seconds(cache, args.threads, "--no-compile")
    print(
        f"normlab bench --preset lecture-deep, {args.threads} thread(s), the first "
        f"{BENCH_WARMUP} steps: {cold:.1f} s with an empty compile cache, {warm:.1f} s with a "
        f"warm one, {eager:.2f} s with --no-compile",
        flush=True,
    )


BENCH_WARMUP = 10  # what normlab bench --steps 10 runs before timing


def warmup_seconds(cache: str, threads: int, *flags: str) -> float:
    """The warm-up of ``normlab bench`` (its first steps, the compile included) in a new
    process whose compile cache is ``cache``."""
    command = [sys.executable, "-m", "normlab", "bench", "--preset", "lecture-deep"]
    command += ["--steps", "10", "--device", "cpu", "--threads", str(threads), *flags]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.splitlines()[-1])["warmup_s"]


if __name__ == "__main__":
    main()
