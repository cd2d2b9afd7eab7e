"""normlab's BatchNorm vs torch's: forward + backward in training mode, CPU, float32, 1 thread.

The two are timed in alternating rounds (so drift in machine load hits both
alike) and the median of the per-round speed ratios is printed per shape.
A ratio >= 1 means normlab is at least as fast. Goal: >= 0.9 at every shape. The
2-D shapes run BatchNorm1d on (N, C); then BatchNorm1d on (N, C, L) and
BatchNorm2d on (N, C, H, W).

    .venv/bin/python benchmarks/bench_batchnorm.py [--rounds 15]
"""

import argparse
import statistics
import time

import torch

from normlab import nn as nl

SHAPES = [(32, 100), (256, 100), (4096, 100), (4096, 1024), (64, 32, 20), (32, 64, 16, 16)]
LAYER = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}  # by the input's rank


def time_step(bn, x, grad, reps):
    """Seconds per forward+backward, averaged over ``reps`` calls."""
    start = time.perf_counter()
    for _ in range(reps):
        bn(x).backward(grad)
    return (time.perf_counter() - start) / reps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, float32, forward+backward")
    print(f"{'shape':>18} {'torch us':>10} {'normlab us':>11} {'speed ratio':>12}")
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        layer = LAYER[len(shape)]
        ours, theirs = getattr(nl, layer)(shape[1]), getattr(torch.nn, layer)(shape[1])
        reps = max(3, int(2e6 // x.numel()))
        for bn in (ours, theirs):  # warm-up
            time_step(bn, x, grad, reps)
        ratios, t_ours, t_theirs = [], [], []
        for _ in range(args.rounds):
            a = time_step(theirs, x, grad, reps)
            b = time_step(ours, x, grad, reps)
            t_theirs.append(a)
            t_ours.append(b)
            ratios.append(a / b)  # > 1: normlab faster
        print(
            f"{shape!s:>18} {statistics.median(t_theirs) * 1e6:>10.1f} "
            f"{statistics.median(t_ours) * 1e6:>11.1f} {statistics.median(ratios):>11.2f}x"
        )


if __name__ == "__main__":
    main()
