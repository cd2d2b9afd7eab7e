"""The learning-rate range test (Smith 2017): train with a learning rate that grows
exponentially each step, watch the loss, and suggest where it falls fastest.

``find_lr`` sweeps from ``start_lr`` to ``end_lr`` over ``steps`` batches (1e-7 to 10
over 100, as Lightning's ``Tuner.lr_find`` and fastai's ``lr_find`` do by default), one
optimizer step per batch, and then puts back the model's parameters and buffers, the
optimizer's state and settings and torch's random generators: the sweep leaves nothing
behind. The loss is smoothed by an exponential moving average (bias-corrected, as fastai's);
the sweep stops early when the smoothed loss passes ``diverge`` × its best, or is not finite.

The suggestion is the learning rate where the smoothed loss falls fastest against
:math:`\\log \\eta`, before its minimum (Lightning's rule, with the curve's first and last
tenth left out, where the smoothing's warm-up and the divergence bend it).
"""

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from normlab.dataflow import Batch, batch_loss


@dataclass(frozen=True)
class LRSweep:
    """What ``find_lr`` saw: the curve, where it stopped, and the suggestion."""

    lrs: list[float]  # the learning rate of each step taken
    losses: list[float]  # each step's loss, before its update
    smoothed: list[float]  # their exponential moving average, bias-corrected
    suggestion: float | None  # None where the curve is too short or never falls
    stopped: str  # "end" | "diverged" | "not finite"

    def plot(self, path: str | Path) -> Path:
        """The smoothed loss against the learning rate (log scale), the suggestion marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses, color="0.8", linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", label="smoothed")
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="C3", linestyle="--", label=f"{self.suggestion:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # the divergence would squash the curve
            low, high = (
                min(finite),
                self.smoothed[0] if math.isfinite(self.smoothed[0]) else max(finite),
            )
            ax.set_ylim(low - 0.1 * (high - low + 1e-12), high + 0.3 * (high - low + 1e-12))
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The learning rate of the steepest fall of ``smoothed`` against log(lr), before its
    minimum, leaving out the first and last tenth of the curve; None for a curve too short
    (fewer than 10 points) or one that never falls.

    >>> lrs = [10 ** (k / 10 - 5) for k in range(50)]
    >>> sigmoid = [1 / (1 + math.exp(2 * math.log10(lr) + 6)) for lr in lrs]  # falls at 1e-3
    >>> round(math.log10(suggest(lrs, sigmoid)), 1)
    -3.0
    """
    n = len(smoothed)
    if n < 10:
        return None
    start, end = n // 10, n - max(1, n // 10)
    lowest = min(range(start, end), key=lambda i: smoothed[i])
    x = [math.log(lr) for lr in lrs]
    slopes = {
        i: (smoothed[i + 1] - smoothed[i - 1]) / (x[i + 1] - x[i - 1])
        for i in range(max(1, start), min(lowest + 1, n - 1))
    }
    if not slopes:
        return None
    steepest = min(slopes, key=slopes.get)
    return lrs[steepest] if slopes[steepest] < 0 else None


def find_lr(
    model: nn.Module,
    data: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    diverge: float = 4.0,
) -> LRSweep:
    """Sweep the learning rate of ``optimizer`` over ``steps`` batches of ``data`` and suggest one.

    Args:
        model: any module, trained in training mode for the sweep, then put back as it was.
        data: batches, at least ``steps`` of them (a list, a DataLoader).
        optimizer: ``model``'s optimizer. Its param groups keep their ratios: each group's
            rate is the sweep's times its own over the first group's.
        loss_fn: ``loss_fn(model, batch)``, the batch's loss, as ``normlab.curvature`` and
            ``normlab.noise`` take it; without it, ``normlab.dataflow.batch_loss`` (the model
            called on the batch as ``normlab.audit`` calls it, and its own loss).
        start_lr, end_lr, steps: the sweep, exponential from ``start_lr`` to ``end_lr``.
        smoothing: the moving average's factor.
        diverge: stop once the smoothed loss exceeds this multiple of its best.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = nn.Linear(4, 1)
        >>> data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(30)]
        >>> sweep = find_lr(model, data, torch.optim.SGD(model.parameters()),
        ...                 lambda m, b: (m(b[0]) - b[1]).square().mean(), steps=30)
        >>> len(sweep.lrs) <= 30, sweep.stopped in ("end", "diverged", "not finite")
        (True, True)
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"find_lr: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise ValueError(f"find_lr: need at least 2 steps, got {steps}")
    growth = (end_lr / start_lr) ** (1 / (steps - 1))
    base = optimizer.param_groups[0]["lr"] or 1.0
    ratios = [(group["lr"] / base) if base else 1.0 for group in optimizer.param_groups]
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.random.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    lrs, losses, smoothed = [], [], []
    stopped, average, best = "end", 0.0, math.inf
    batches = iter(data)
    try:
        model.train()
        for k in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"find_lr: the sweep takes {steps} batches and the data gave {k}; give "
                    f"more batches or fewer steps"
                ) from None
            lr = start_lr * growth**k
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            loss = loss_fn(model, batch) if loss_fn is not None else batch_loss(model, batch)
            value = loss.item()
            if not math.isfinite(value):
                stopped = "not finite"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = smoothing * average + (1 - smoothing) * value
            current = average / (1 - smoothing ** (k + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(current)
            best = min(best, current)
            if current > diverge * best:
                stopped = "diverged"
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        torch.random.set_rng_state(saved_rng)
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)
        model.train(was_training)
    return LRSweep(lrs, losses, smoothed, suggest(lrs, smoothed), stopped)
