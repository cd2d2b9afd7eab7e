"""Sampling speed outside normlab: the ONNX model in onnxruntime (numpy, no torch) against
normlab sample, both batched, lecture-deep, CPU, 1 thread.

The model is bench_sample.py's (lecture-deep, briefly trained), exported by
normlab.lm.export.export_onnx with its BatchNorms folded; the torch-free sampler is
examples/sample_onnx.py. Both generate the same number of names in batches of
the same size, in alternating rounds; the median of each is printed, and the
ratio.

    .venv/bin/python benchmarks/bench_export.py [--names 20000] [--rounds 3]
"""

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from bench_sample import MAX_LEN, briefly_trained_model

from normlab.lm.data import load_dataset
from normlab.lm.export import export_onnx
from normlab.lm.sample import generate

ROOT = Path(__file__).resolve().parents[1]


def torch_free_sampler():
    spec = importlib.util.spec_from_file_location("sample_onnx", ROOT / "examples/sample_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(None, block_size=3)
    model, _ = briefly_trained_model(data)
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    export_onnx(model.eval(), data.vocab, path, log=lambda line: None)
    sampler = torch_free_sampler()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    chars = list(data.vocab.chars)
    g = torch.Generator().manual_seed(0)
    runs = {
        "normlab sample (torch)": lambda: generate(
            model, data.vocab, args.names, MAX_LEN, generator=g
        ),
        "ONNX + numpy": lambda: sampler.generate(session, chars, 3, args.names, MAX_LEN, seed=0),
    }
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run))
    rates = {name: args.names / statistics.median(t) for name, t in times.items()}
    print(f"{args.names:,} names at once, 1 thread, median of {args.rounds} rounds")
    for name, rate in rates.items():
        print(f"{name:>24}: {rate:>9,.0f} names/s")
    print(f"ONNX / torch: {rates['ONNX + numpy'] / rates['normlab sample (torch)']:.2f}x")


if __name__ == "__main__":
    main()
