"""Pieces of a compiled training step at batch 4096, timed alone.

On one (100, 4096) float32 activation, 1 thread, each against its eager form
measured in the same run:

- tanh: eager ATen, inductor's own vectorized tanh, and inductor's exp-based
  decomposition (``cpp.use_decompose_tanh``, which ``normlab.lm.compiled`` turns on);
- BatchNorm's batch statistics (``torch.var_mean`` over the batch), compiled,
  in the model's (B, C) layout and transposed, (C, B);
- the three matrix products of a 100-wide Linear in the (C, B) layout: the
  forward, the weight gradient and the input gradient.

    .venv/bin/python benchmarks/bench_kernels.py [--repeats 300]
"""

import argparse
import time

import torch


def microseconds(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(100, 4096, generator=g)  # (C, B)
    decompose = {"cpp.use_decompose_tanh": True}

    def row(name, eager, compiled):
        base = microseconds(eager, args.repeats)
        line = f"{name}: eager {base:,.0f} µs"
        for label, fn in compiled.items():
            t = microseconds(fn, args.repeats)
            line += f", {label} {t:,.0f} µs ({base / t:.2f}× eager's speed)"
        print(line, flush=True)

    tanh = torch.compile(torch.tanh, dynamic=False)
    tanh_decomposed = torch.compile(lambda t: torch.tanh(t), dynamic=False, options=decompose)
    worst = (tanh_decomposed(z) - torch.tanh(z.double())).abs().max().item()
    row(
        "tanh of (100, 4096)",
        lambda: torch.tanh(z),
        {"inductor": lambda: tanh(z), "inductor decomposed": lambda: tanh_decomposed(z)},
    )
    print(f"  the decomposition's largest error against float64: {worst:.1e}")

    zt = z.t().contiguous()  # (B, C), the model's layout
    stats = torch.compile(lambda t, dim: torch.var_mean(t, dim, correction=0), dynamic=False)
    row(
        "batch statistics (var_mean over 4096)",
        lambda: torch.var_mean(zt, 0, correction=0),
        {"compiled (B, C)": lambda: stats(zt, 0), "compiled (C, B)": lambda: stats(z, 1)},
    )

    w, dz = torch.randn(100, 100, generator=g), torch.randn(100, 4096, generator=g)
    for name, fn in (
        ("forward W @ h", lambda: w @ z),
        ("weight gradient dz @ h.T", lambda: dz @ z.t()),
        ("input gradient W.T @ dz", lambda: w.t() @ dz),
    ):
        t = microseconds(fn, args.repeats)
        print(f"matrix product, {name}: {t:,.0f} µs ({2 * 100 * 100 * 4096 / t / 1e3:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
