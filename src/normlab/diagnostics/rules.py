"""The verdicts: a table of rules, each with its threshold, run over the recordings.

Measurements (``Snapshot``) and judgements are kept apart: ``judge`` takes any
history of snapshots, live or read back from ``diagnostics.jsonl``, and any
``Thresholds``, so a run can be judged again with other thresholds.
"""

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from normlab.diagnostics.snapshot import (
    LayerStats,
    SecondOrderStats,
    Snapshot,
    finite,
    update_history,
)
from normlab.init import calculate_gain
from normlab.nn import ACTIVATIONS, NORMALIZATIONS, SATURATION, WEIGHTED


@dataclass(frozen=True)
class Thresholds:
    """Where each verdict fires. The defaults are quiet on a healthy ``lecture-deep`` at step 0."""

    saturated: float = 0.25  # saturating: fraction of outputs beyond 0.97 of the half range
    dead: float = 0.25  # rectifying: fraction of units never above the floor over the batch
    depth_ratio: float = 10.0  # std of the last vs the first activation layer, either way
    update_log10: float = -3.0  # the healthy log10 update:data ratio of a weight matrix
    update_tolerance: float = 1.0  # how far from it (in log10) is "far"
    update_sustained: int = 3  # for this many recordings in a row
    confident_at_init: float = 1.0  # loss at step 0 above ln(num_classes) by more than this
    bn_drift: float = 0.5  # |running mean − batch mean| / batch std, worst feature
    bn_settled: float = 3.0  # judge drift only after momentum × batches ≥ this (time constants)
    stability: float = 1.0  # sharpness above this fraction of its stability line (2/lr for SGD)
    noise_factor: float = 10.0  # the batch this many times below or above the noise scale


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
    unrecorded: list[str] = field(default_factory=list)  # layers of no known kind

    def to_json(self) -> str:
        return json.dumps(finite(asdict(self)))


# ---------------------------------------------------------------------------- the rules

Rule = Callable[[list[Snapshot], Thresholds, int | None], Iterator[Verdict]]


def _feeding(snap: Snapshot, index: int) -> LayerStats | None:
    """The weighted or normalization layer last recorded before ``snap.layers[index]``."""
    for layer in reversed(snap.layers[:index]):
        if layer.family in (*WEIGHTED, *NORMALIZATIONS):
            return layer
    return None


def _scale_fix(snap: Snapshot, index: int) -> str:
    """What sets an activation layer's input scale, compared with Kaiming's std for it."""
    source, kind = _feeding(snap, index), snap.layers[index].kind
    if source is None:
        return ""
    if source.family in NORMALIZATIONS:
        return f"; {source.name} ({source.kind}) before it sets its scale: look at its gain"
    weight = next((p for p in snap.params if p.name == f"{source.name}.weight"), None)
    try:
        gain = calculate_gain(kind)
    except ValueError:  # no Kaiming gain for this nonlinearity
        return ""
    if weight is None or len(weight.shape) < 2 or not weight.data_std:
        return ""
    kaiming = gain / math.sqrt(math.prod(weight.shape[1:]))
    ratio = weight.data_std / kaiming
    return f"; the weights of {source.name} have std {ratio:.1f}× Kaiming's for {kind}"


def _saturated(history, t, _classes):
    snap = history[-1]
    for i, layer in enumerate(snap.layers):
        if layer.saturated is not None and layer.saturated > t.saturated:
            message = f"{layer.saturated:.0%} saturated (beyond {SATURATION} of its range)"
            message += _scale_fix(snap, i)
            yield Verdict("saturated", layer.name, layer.saturated, t.saturated, message)


def healthy_dead(samples: int) -> float:
    """The fraction of units a healthy layer shows as dead over ``samples`` draws per unit:
    a unit active half the time is never active in all of them with probability 0.5^samples
    (at a batch of 2, a quarter of a healthy GELU layer's units read dead).

    >>> healthy_dead(2), healthy_dead(32) < 1e-9
    (0.25, True)
    """
    return 0.5**samples


def _dead(history, t, _classes):
    snap = history[-1]
    unjudged = []
    for i, layer in enumerate(snap.layers):
        if layer.dead is None:
            continue
        # judged only where healthy units read dead at a tenth of the threshold or less (a
        # threshold of 0 asks for every dead unit, whatever the batch)
        gated = layer.samples is not None and t.dead > 0
        if gated and healthy_dead(layer.samples) > t.dead / 10:
            unjudged.append(layer)
        elif layer.dead > t.dead:
            message = f"{layer.dead:.0%} of units never active in the batch" + _scale_fix(snap, i)
            yield Verdict("dead", layer.name, layer.dead, t.dead, message)
    if unjudged:
        fewest = min(layer.samples for layer in unjudged)
        need = math.ceil(math.log2(10 / t.dead))
        message = (
            f"dead units not judged on {len(unjudged)} layers: with {fewest} samples per unit "
            f"{healthy_dead(fewest):.0%} of a healthy layer's units read dead; record a batch "
            f"of at least {need} samples per unit"
        )
        yield Verdict("batch-too-small", unjudged[0].name, fewest, need, message)


def _bias_before_batchnorm(history, t, _classes):
    """A bias on the layer feeding a BatchNorm: the BatchNorm's mean subtraction cancels it."""
    snap = history[-1]
    params = {p.name: p for p in snap.params}
    for i, layer in enumerate(snap.layers):
        source = _feeding(snap, i) if layer.family == "batchnorm" else None
        bias = params.get(f"{source.name}.bias") if source is not None else None
        if source is not None and source.family in WEIGHTED and bias is not None:
            grad = bias.grad_std or 0.0
            message = (
                f"a bias feeds BatchNorm {layer.name}: it receives no gradient (std {grad:.1e}); "
                "remove it (bias=False)"
            )
            yield Verdict("bias-before-batchnorm", source.name, grad, 0.0, message)


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
    acts = [layer for layer in history[-1].layers if layer.family in ACTIVATIONS]
    if len(acts) >= 2 and acts[0].std > 0:
        first, last = acts[0], acts[-1]
        yield from _growth(last.name, last.std / first.std, t, "activation", f"from {first.name}")


def _gradient_depth(history, t, _classes):
    """Gradient std at the first activation layer against the last: gradients flow backwards."""
    acts = [layer for layer in history[-1].layers if layer.family in ACTIVATIONS]
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


def stability_line(so: SecondOrderStats) -> tuple[float, float, str] | None:
    """The sharpness that decides stability, its line and how that line is written: with
    Adam's preconditioned sharpness, (2 + 2β₁)/((1 − β₁)·lr) (Cohen et al. 2022); else 2/lr
    (Cohen et al. 2021). None without a learning rate or a sharpness."""
    if not so.lr:
        return None
    if so.preconditioned_sharpness is not None and so.beta1 is not None:
        factor = (2 + 2 * so.beta1) / (1 - so.beta1)
        return (
            so.preconditioned_sharpness,
            factor / so.lr,
            f"(2 + 2β₁)/((1 − β₁)·lr) = {factor:.3g}/lr",
        )
    if so.sharpness is None:
        return None
    return so.sharpness, 2 / so.lr, "2/lr"


def _lr_too_high(history, t, _classes):
    so = history[-1].second_order
    found = stability_line(so) if so is not None else None
    if found is None:
        return
    sharpness, line, written = found
    if sharpness > t.stability * line:
        under = so.lr * t.stability * line / sharpness  # the rate whose line sits at it
        message = (
            f"sharpness {sharpness:.4g} is above the stability line {written} = {line:.4g} at "
            f"lr {so.lr:.3g}: expect loss spikes; a learning rate below {under:.3g} sits under it"
        )
        yield Verdict("lr-too-high", "model", sharpness, t.stability * line, message)


def _batch_vs_noise(history, t, _classes):
    so = history[-1].second_order
    if so is None or so.noise_scale is None or not math.isfinite(so.noise_scale):
        return
    noise, batch = so.noise_scale, so.batch_size
    if noise <= 0:
        return
    if batch * t.noise_factor < noise:
        message = (
            f"batch {batch} is far below the gradient noise scale B_simple ≈ {noise:.0f}: most "
            f"of each step is noise; a batch nearer {noise:.0f} takes proportionally larger steps"
        )
        yield Verdict("batch-vs-noise", "model", noise, batch * t.noise_factor, message)
    elif batch > noise * t.noise_factor:
        message = (
            f"batch {batch} is far above the gradient noise scale B_simple ≈ {noise:.0f}: the "
            f"extra examples barely improve the step; a batch nearer {noise:.0f} costs less"
        )
        yield Verdict("batch-vs-noise", "model", noise, batch / t.noise_factor, message)


# verdict                  fires when (thresholds in Thresholds)
RULES: tuple[Rule, ...] = (
    _saturated,  # saturated: a saturating layer's fraction beyond 0.97 of its range > saturated
    _dead,  # dead: a rectifying layer's fraction of never-active units > dead, where a healthy
    # layer's is ≤ dead / 10 at its batch (else one batch-too-small for all such layers)
    _bias_before_batchnorm,  # bias-before-batchnorm: a weighted layer's bias feeds a BatchNorm
    _activation_depth,  # vanishing/exploding: activation std, last vs first, beyond depth_ratio
    _gradient_depth,  # vanishing/exploding: gradient std, first vs last, beyond depth_ratio
    _bn_drift,  # bn-drift: a settled BatchNorm's running mean > bn_drift batch stds off
    _update_ratio_off,  # update-ratio-off: log10 update:data far from update_log10, sustained
    _confident_at_init,  # confident-at-init: the loss at step 0 well above ln(num_classes)
    _lr_too_high,  # lr-too-high: the sharpness above stability × its stability line
    _batch_vs_noise,  # batch-vs-noise: the batch noise_factor × below or above B_simple
)


def verdicts(
    history: list[Snapshot], thresholds: Thresholds | None = None, num_classes: int | None = None
) -> list[Verdict]:
    """What every rule finds in the latest snapshot (and, for update ratios, before it)."""
    t = thresholds or Thresholds()
    return [verdict for rule in RULES for verdict in rule(history, t, num_classes)]


def judge(
    history: list[Snapshot],
    num_classes: int | None = None,
    thresholds: Thresholds | None = None,
    series: dict[str, list[tuple[int, float]]] | None = None,
    unrecorded: list[str] | tuple = (),
) -> Report:
    """The latest snapshot of ``history`` with its verdicts.

    Args:
        history: the recordings, oldest first (``Diagnostics.history``, or rows of
            ``diagnostics.jsonl`` read back with ``snapshot_from_dict``).
        num_classes: the model's output classes, for the confident-at-init rule.
        thresholds: where the verdicts fire (default: ``Thresholds()``).
        series: every recording's update:data ratios (``Diagnostics.update_history``),
            where ``history`` holds only some recordings.
        unrecorded: the layers that were not recorded, for the report to list.
    """
    if not history:
        raise ValueError("no recording to judge: call Diagnostics.arm() and collect() first")
    first = history[0]
    return Report(
        snapshot=history[-1],
        verdicts=verdicts(history, thresholds, num_classes),
        update_history=series if series is not None else update_history(history),
        init_loss=first.loss if first.step == 0 else None,
        num_classes=num_classes,
        unrecorded=list(unrecorded),
    )


def judge_recording(
    diagnostics, num_classes: int | None = None, thresholds: Thresholds | None = None
) -> Report:
    """``judge`` of a ``Diagnostics``' recordings: its history, its whole update:data series
    and the layers it could not record."""
    return judge(
        diagnostics.history,
        num_classes,
        thresholds,
        series=diagnostics.update_history,
        unrecorded=diagnostics.unrecorded,
    )
