"""Sampling speed: batched generation vs one name at a time, lecture-deep, CPU, 1 thread.

Both use normlab.lm.sample.generate on the same model (eval mode, running
BatchNorm statistics), first trained briefly on the bundled names so that the
samples have the lengths of real names (an untrained model rarely ends one).
The ratio is measured in the same run. Goal: at least 20,000 names/s batched.

    .venv/bin/python benchmarks/bench_sample.py [--names 20000] [--single 300]
"""

import argparse
import time

import torch

from normlab.lm.config import ModelConfig
from normlab.lm.data import load_dataset
from normlab.lm.model import LanguageModel
from normlab.lm.presets import PRESETS
from normlab.lm.sample import generate

MAX_LEN = 35  # twice the longest bundled name, plus 5, as normlab sample uses


def briefly_trained_model(data, steps=1500):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**PRESETS["lecture-deep"]["model"]), verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    X, Y = data.splits["train"]
    for _ in range(steps):
        ix = torch.randint(0, len(X), (256,))
        _, loss = model(X[ix], Y[ix])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, loss.item()


def names_per_second(model, vocab, n_names, batch, generator):
    start = time.perf_counter()
    done = 0
    while done < n_names:
        done += len(generate(model, vocab, batch, MAX_LEN, generator=generator))
    return done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=20_000, help="names generated batched")
    parser.add_argument("--single", type=int, default=300, help="names generated one at a time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(None, block_size=3)
    model, loss = briefly_trained_model(data)
    g = torch.Generator().manual_seed(0)
    names_per_second(model, data.vocab, 1000, 1000, g)  # warm-up
    batched = names_per_second(model, data.vocab, args.names, args.names, g)
    single = names_per_second(model, data.vocab, args.single, 1, g)
    print(f"torch {torch.__version__}, 1 thread, lecture-deep ({model.num_params():,} parameters,")
    print(f"trained 1,500 AdamW steps to a batch loss of {loss:.2f})")
    print(f"batched ({args.names:,} at once): {batched:,.0f} names/s")
    print(f"one at a time:{'':>11}{single:,.0f} names/s")
    print(f"speed-up: {batched / single:.0f}x")


if __name__ == "__main__":
    main()
