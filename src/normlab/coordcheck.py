"""The coord check: does each layer's activation size stay put as a model gets wider, over the
first steps of training? (Yang et al., "Tensor Programs V", 2022; mup's ``get_coord_data``.)

For each width and seed, ``coord_check`` builds ``factory(width)``, trains it for ``steps``
steps on the first ``steps`` batches of ``data``, and records at each step, before its
update, every layer's mean :math:`|x|` over the batch (a hook on each leaf module), and after
the update the mean :math:`|\\Delta w|` of the layer's weight. Averaged over the seeds, each
layer's size at step :math:`t` is fit by least squares as

.. math::
    \\log \\overline{|x|} = a + s \\log(\\text{width})

and the slope :math:`s` is the verdict: 0 where the size does not depend on the width (the
parametrization holds for that layer), 1/2 where it grows like :math:`\\sqrt{\\text{width}}`,
1 like the width. Under the standard parametrization every layer is flat at step 0 (that is
what :math:`1/\\sqrt{\\text{fan-in}}` initialization is for), and layers drift once training
moves them; under μP they stay flat.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from normlab.dataflow import Batch, batch_loss, first_tensor
from normlab.errors import first_line

THRESHOLD = 0.25  # |slope| above it: the layer's size depends on the width


@dataclass(frozen=True)
class CoordCheck:
    """What ``coord_check`` recorded, averaged over the seeds."""

    widths: tuple[int, ...]
    steps: int
    seeds: int
    sizes: dict[str, list[list[float]]]  # layer -> [step][width]: mean |output| before the update
    updates: dict[str, list[list[float]]]  # layer -> [step][width]: its weight's mean |Δw|
    threshold: float = THRESHOLD
    along: str = "width"  # what ``widths`` measure: the width, or another size such as depth

    @property
    def slopes(self) -> dict[str, list[float]]:
        """Layer -> the slope of log size against log width (``along``), at each recorded
        step."""
        return {
            name: [_slope(self.widths, row) for row in rows] for name, rows in self.sizes.items()
        }

    @property
    def flagged(self) -> dict[str, float]:
        """The layers whose slope moves further than ``threshold`` from 0 at some step, with
        that slope (the largest in magnitude)."""
        worst = {name: max(slopes, key=abs) for name, slopes in self.slopes.items()}
        return {name: s for name, s in worst.items() if abs(s) > self.threshold}

    def table(self) -> str:
        """One row per layer: its slope at each step, and its verdict."""
        header = f"{'layer':<28}" + "".join(f"{f'step {t}':>9}" for t in range(self.steps))
        lines = [
            f"coord check: {self.along} {', '.join(map(str, self.widths))}; {self.seeds} "
            f"seed(s); slope of log mean|x| against log {self.along} (flagged beyond "
            f"±{self.threshold})",
            header + "  verdict",
        ]
        flagged = self.flagged
        for name, slopes in self.slopes.items():
            verdict = "flat"
            if name in flagged:
                trend = "grows" if flagged[name] > 0 else "shrinks"
                verdict = f"{trend} with {self.along} ({flagged[name]:+.2f})"
            lines.append(
                f"{name[:27]:<28}" + "".join(f"{s:>9.2f}" for s in slopes) + f"  {verdict}"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """mup's figure: one panel per step, each layer's mean |x| against the width (or
        ``along``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            1, self.steps, figsize=(3.2 * self.steps, 3.2), sharey=True, squeeze=False
        )
        few = len(self.sizes) <= 12
        for t, ax in enumerate(axes[0]):
            for name, rows in self.sizes.items():
                ax.plot(self.widths, rows[t], marker=".", linewidth=1 if few else 0.6, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"step {t}")
            ax.set_xlabel(self.along)
        axes[0][0].set_ylabel("mean |activation|")
        if few:
            axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


def _slope(widths, sizes) -> float:
    """Least-squares slope of log(size) against log(width)."""
    x = [math.log(w) for w in widths]
    y = [math.log(max(s, 1e-30)) for s in sizes]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
        (a - mx) ** 2 for a in x
    )


def _build(factory: Callable[[int], nn.Module], width: int, along: str) -> nn.Module:
    try:
        model = factory(width)
    except TypeError as e:
        raise ValueError(
            f"coord_check: the factory must take a {along}: factory({width}) raised {first_line(e)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"coord_check: factory({width}) returned a {type(model).__name__}")
    return model


def coord_check(
    factory: Callable[[int], nn.Module],
    widths: Iterable[int],
    data: Iterable[Batch],
    steps: int = 4,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    loss_fn: Callable | None = None,
    seeds: Iterable[int] = (0, 1),
    threshold: float = THRESHOLD,
    along: str = "width",
) -> CoordCheck:
    """Record every layer's mean |activation| over the first ``steps`` steps at each width.

    A layer that some widths lack (a check along depth: the blocks only the deeper models have)
    is left out; the layers every model has are compared.

    Args:
        factory: ``factory(width)`` builds the model at that width.
        widths: at least two, different; the model's parameter count must change with them.
        data: batches (``model(batch)``, ``(*batch)`` or ``(**batch)``, as ``normlab.audit``
            calls a model); the first ``steps`` of them, the same at every width and seed.
        steps: training steps recorded (the first is the initialization).
        optimizer: ``optimizer(model)`` builds its optimizer (default: AdamW, lr 1e-3).
        loss_fn: ``loss_fn(model, batch)``, the batch's loss (default:
            ``normlab.dataflow.batch_loss``, the model's own loss).
        seeds: each width is built and trained once per seed (``torch.manual_seed``).
        threshold: a layer is flagged where its slope's magnitude exceeds it.
        along: what the widths measure, for the table and the figure (``"depth"``: the factory
            takes a depth).

    Example:
        >>> def mlp(width):
        ...     return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))
        >>> data = [torch.randn(32, 8) for _ in range(2)]
        >>> check = coord_check(mlp, [16, 64], data, steps=2, seeds=[0])
        >>> sorted(check.slopes), len(check.slopes["0"])
        (['0', '1', '2'], 2)
    """
    widths = tuple(sorted(set(widths)))
    seeds = tuple(seeds)
    if len(widths) < 2:
        raise ValueError(f"coord_check needs at least two different widths, got {widths}")
    if steps < 1 or not seeds:
        raise ValueError("coord_check needs at least one step and one seed")
    batches = list(islice(data, steps))
    if len(batches) < steps:
        raise ValueError(
            f"coord_check: {steps} steps need {steps} batches; data gave {len(batches)}"
        )
    make_optimizer = optimizer or (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    counts = {}
    sizes: dict[str, list[list[float]]] = {}
    updates: dict[str, list[list[float]]] = {}
    seen: dict[str, set[int]] = {}  # layer -> the widths whose model has it
    for k, width in enumerate(widths):
        for seed in seeds:
            torch.manual_seed(seed)
            model = _build(factory, width, along)
            count = sum(p.numel() for p in model.parameters())
            for other, n in counts.items():
                if n == count and other != width:
                    raise ValueError(
                        f"coord_check: the factory builds {count:,} parameters at widths {other} "
                        f"and {width}: the {along} changes nothing"
                    )
            counts.setdefault(width, count)
            run = _train(model, batches, make_optimizer(model), loss_fn)
            for name, (run_sizes, run_updates) in run.items():
                seen.setdefault(name, set()).add(width)
                for store, values in ((sizes, run_sizes), (updates, run_updates)):
                    rows = store.setdefault(name, [[0.0] * len(widths) for _ in range(steps)])
                    for t, value in enumerate(values):
                        rows[t][k] += value / len(seeds)
    common = [name for name in sizes if len(seen[name]) == len(widths)]
    return CoordCheck(
        widths,
        steps,
        len(seeds),
        {name: sizes[name] for name in common},
        {name: updates[name] for name in common},
        threshold,
        along,
    )


def _train(model: nn.Module, batches: list, optimizer, loss_fn) -> dict:
    """Each leaf layer's mean |output| at each step before its update, and its weight's mean
    |Δw| by it: layer -> ([step], [step])."""
    leaves = {n: m for n, m in model.named_modules() if n and not list(m.children())}
    current: dict[str, float] = {}

    def hook(name):
        def record(module, inputs, out):
            x = first_tensor(out)
            if x is not None and x.is_floating_point():
                current[name] = x.detach().abs().mean().item()

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves.items()]
    sizes: dict[str, list[float]] = {}
    changes: dict[str, list[float]] = {}
    model.train()
    try:
        for batch in batches:
            current.clear()
            weights = {n: m.weight.detach().clone() for n, m in leaves.items() if _weight(m)}
            loss = loss_fn(model, batch) if loss_fn is not None else batch_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in current.items():
                sizes.setdefault(name, []).append(value)
                moved = leaves[name].weight.detach() - weights[name] if name in weights else None
                changes.setdefault(name, []).append(
                    moved.abs().mean().item() if moved is not None else 0.0
                )
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sizes[name], changes[name]) for name in sizes}


def _weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)
