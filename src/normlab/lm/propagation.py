"""The seed idea on the spot: how the scale of the weights decides what reaches layer 50.

A batch of unit-Gaussian data goes through a deep ``Linear → tanh`` stack with
four weight scalings, and each layer's activation std and saturated fraction
(``|tanh| > 0.97``) are tabulated. Unscaled ``randn`` saturates every unit,
gain 1 lets the signal fade, Kaiming's 5/3 holds it steady, and BatchNorm
holds it steady whatever the scale.
"""

from dataclasses import dataclass

import torch

from normlab import init
from normlab import nn as nl
from normlab.nn import SATURATION

VARIANTS = ("randn", "gain 1", "kaiming 5/3", "kaiming+BN")


@dataclass
class TanhStats:
    """The tanh outputs of one layer of the stack."""

    std: float
    saturated: float  # fraction of units with |t| > SATURATION


@torch.no_grad()
def propagate(
    variant: str, n_layer: int = 50, width: int = 100, batch: int = 1000, seed: int = 0
) -> list[TanhStats]:
    """Per-layer statistics of tanh outputs for one weight-scaling variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=g)  # (B, width), unit Gaussian
    stats = []
    for _ in range(n_layer):
        W = torch.empty(width, width)
        if variant == "randn":
            W.normal_(generator=g)
        elif variant == "gain 1":
            init.kaiming_normal_(W, nonlinearity="linear", generator=g)
        else:
            init.kaiming_normal_(W, nonlinearity="tanh", generator=g)
        h = x @ W.T  # (B, width) pre-activations
        if variant == "kaiming+BN":
            h = nl.BatchNorm1d(width)(h)
        x = torch.tanh(h)
        stats.append(TanhStats(x.std().item(), (x.abs() > SATURATION).float().mean().item()))
    return stats


def propagation_table(n_layer: int = 50, width: int = 100, seed: int = 0) -> str:
    """A fixed-width table: per layer, activation std and saturation for every variant."""
    results = {v: propagate(v, n_layer, width, seed=seed) for v in VARIANTS}
    shown = sorted({1, 2, 3, 5, n_layer} | set(range(10, n_layer + 1, 10)))
    shown = [i for i in shown if i <= n_layer]
    lines = [
        f"tanh activations through {n_layer} layers of {width} units "
        f"(batch of 1000 unit-Gaussian inputs); std / % saturated (|t| > {SATURATION})",
        "layer" + "".join(f"{v:>18}" for v in VARIANTS),
    ]
    for i in shown:
        cells = "".join(
            f"{results[v][i - 1].std:>10.3f} {results[v][i - 1].saturated:>6.1%}" for v in VARIANTS
        )
        lines.append(f"{i:>5}{cells}")
    return "\n".join(lines)
