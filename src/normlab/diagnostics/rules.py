"""The verdicts: a table of rules, each with its threshold, run over the recordings.

Measurements (``Snapshot``) and judgements are kept apart: ``judge`` takes any
history of snapshots, live or read back from ``diagnostics.jsonl``, and any
``Thresholds``, so a run can be judged again with other thresholds.
"""

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from normlab.diagnostics.snapshot import Snapshot, finite
from normlab.diagnostics.stats import SATURATION
from normlab.nn import ACTIVATIONS


@dataclass(frozen=True)
class Thresholds:
    """Where each verdict fires. The defaults are quiet on a healthy ``lecture-deep`` at step 0."""

    saturated: float = 0.25  # tanh/sigmoid: fraction of outputs beyond ±0.97
    dead: float = 0.25  # ReLU: fraction of units never positive over the batch
    depth_ratio: float = 10.0  # std of the last vs the first activation layer, either way
    update_log10: float = -3.0  # the healthy log10 update:data ratio of a weight matrix
    update_tolerance: float = 1.0  # how far from it (in log10) is "far"
    update_sustained: int = 3  # for this many recordings in a row
    confident_at_init: float = 1.0  # loss at step 0 above ln(num_classes) by more than this
    bn_drift: float = 0.5  # |running mean − batch mean| / batch std, worst feature
    bn_settled: float = 3.0  # judge drift only after momentum × batches ≥ this (time constants)


@dataclass
class Verdict:
    kind: str  # saturated | dead | vanishing | exploding | bn-drift | update-ratio-off | ...
    layer: str
    value: float
    threshold: float
    message: str


@dataclass
class Report:
    """The latest snapshot, the update:data history, and the verdicts."""

    snapshot: Snapshot
    verdicts: list[Verdict]
    update_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    init_loss: float | None = None
    num_classes: int | None = None

    def to_json(self) -> str:
        return json.dumps(finite(asdict(self)))


def update_history(history: list[Snapshot]) -> dict[str, list[tuple[int, float]]]:
    """log10 update:data ratio of each weight matrix (2-D or more) over the recordings.

    A step that left a matrix unchanged (an update below float resolution) counts as 1e-12.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for snap in history:
        for p in snap.params:
            if len(p.shape) >= 2 and p.update_to_data is not None:
                ratio = max(p.update_to_data, 1e-12)
                series.setdefault(p.name, []).append((snap.step, math.log10(ratio)))
    return series


# ---------------------------------------------------------------------------- the rules

Rule = Callable[[list[Snapshot], Thresholds, int | None], Iterator[Verdict]]


def _saturated(history, t, _classes):
    for layer in history[-1].layers:
        if layer.saturated is not None and layer.saturated > t.saturated:
            message = f"{layer.saturated:.0%} of outputs beyond ±{SATURATION}"
            yield Verdict("saturated", layer.name, layer.saturated, t.saturated, message)


def _dead(history, t, _classes):
    for layer in history[-1].layers:
        if layer.dead is not None and layer.dead > t.dead:
            message = f"{layer.dead:.0%} of units never positive in the batch"
            yield Verdict("dead", layer.name, layer.dead, t.dead, message)


def _growth(layer: str, ratio: float, t: Thresholds, what: str, where: str) -> Iterator[Verdict]:
    """``vanishing`` or ``exploding`` where ``ratio`` is beyond ``depth_ratio`` either way."""
    if ratio < 1 / t.depth_ratio:
        message = f"{what} std fell {1 / ratio:.0f}× {where}"
        yield Verdict("vanishing", layer, ratio, 1 / t.depth_ratio, message)
    elif ratio > t.depth_ratio:
        yield Verdict(
            "exploding", layer, ratio, t.depth_ratio, f"{what} std grew {ratio:.0f}× {where}"
        )


def _activation_depth(history, t, _classes):
    """Activation std at the last activation layer against the first."""
    acts = [layer for layer in history[-1].layers if layer.kind in ACTIVATIONS]
    if len(acts) >= 2 and acts[0].std > 0:
        first, last = acts[0], acts[-1]
        yield from _growth(last.name, last.std / first.std, t, "activation", f"from {first.name}")


def _gradient_depth(history, t, _classes):
    """Gradient std at the first activation layer against the last: gradients flow backwards."""
    acts = [layer for layer in history[-1].layers if layer.kind in ACTIVATIONS]
    if len(acts) >= 2 and acts[0].grad_std and acts[-1].grad_std:
        first, last = acts[0], acts[-1]
        where = f"on its way back from {last.name}"
        yield from _growth(first.name, first.grad_std / last.grad_std, t, "gradient", where)


def _bn_drift(history, t, _classes):
    for bn in history[-1].batchnorms:
        if bn.time_constants >= t.bn_settled and bn.mean_drift > t.bn_drift:
            message = f"running mean {bn.mean_drift:.2f} batch stds from the batch's"
            yield Verdict("bn-drift", bn.name, bn.mean_drift, t.bn_drift, message)


def _update_ratio_off(history, t, _classes):
    for name, points in update_history(history).items():
        recent = [v for _, v in points[-t.update_sustained :]]
        far = [abs(v - t.update_log10) > t.update_tolerance for v in recent]
        if len(recent) == t.update_sustained and all(far):
            message = (
                f"log10 update:data has been {recent[-1]:.1f} for {t.update_sustained} "
                f"recordings (healthy: near {t.update_log10:g})"
            )
            yield Verdict("update-ratio-off", name, recent[-1], t.update_log10, message)


def _confident_at_init(history, t, num_classes):
    first = history[0]
    if not num_classes or first.step != 0 or first.loss is None:
        return
    uniform = math.log(num_classes)
    if first.loss - uniform > t.confident_at_init:
        message = (
            f"loss at step 0 is {first.loss:.2f}, a uniform guess gives "
            f"ln({num_classes}) = {uniform:.2f}: confidently wrong"
        )
        limit = uniform + t.confident_at_init
        yield Verdict("confident-at-init", "output", first.loss, limit, message)


# verdict                  fires when (thresholds in Thresholds)
RULES: tuple[Rule, ...] = (
    _saturated,  # saturated: a tanh/sigmoid layer's fraction beyond ±0.97 > saturated
    _dead,  # dead: a ReLU layer's fraction of never-positive units > dead
    _activation_depth,  # vanishing/exploding: activation std, last vs first, beyond depth_ratio
    _gradient_depth,  # vanishing/exploding: gradient std, first vs last, beyond depth_ratio
    _bn_drift,  # bn-drift: a settled BatchNorm's running mean > bn_drift batch stds off
    _update_ratio_off,  # update-ratio-off: log10 update:data far from update_log10, sustained
    _confident_at_init,  # confident-at-init: the loss at step 0 well above ln(num_classes)
)


def verdicts(
    history: list[Snapshot], thresholds: Thresholds | None = None, num_classes: int | None = None
) -> list[Verdict]:
    """What every rule finds in the latest snapshot (and, for update ratios, before it)."""
    t = thresholds or Thresholds()
    return [verdict for rule in RULES for verdict in rule(history, t, num_classes)]


def judge(
    history: list[Snapshot], num_classes: int | None = None, thresholds: Thresholds | None = None
) -> Report:
    """The latest snapshot of ``history`` with its verdicts.

    Args:
        history: the recordings, oldest first (``Diagnostics.history``, or rows of
            ``diagnostics.jsonl`` read back with ``snapshot_from_dict``).
        num_classes: the model's output classes, for the confident-at-init rule.
        thresholds: where the verdicts fire (default: ``Thresholds()``).
    """
    if not history:
        raise ValueError("no recording to judge: call Diagnostics.arm() and collect() first")
    first = history[0]
    return Report(
        snapshot=history[-1],
        verdicts=verdicts(history, thresholds, num_classes),
        update_history=update_history(history),
        init_loss=first.loss if first.step == 0 else None,
        num_classes=num_classes,
    )
