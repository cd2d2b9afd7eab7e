"""What one recording measured, as plain dataclasses: stored in ``diagnostics.jsonl``, judged later.

A snapshot holds measurements only, no thresholds, so a saved one can be
judged again with other thresholds (``normlab.diagnostics.rules``).
"""

import math
from dataclasses import dataclass

PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class LayerStats:
    """A layer's output and the gradient of its output, over one training batch."""

    name: str
    kind: str  # "tanh", "gelu", "layernorm", "conv", ... (normlab.nn.layer_kind)
    family: str  # saturating | rectifying | batchnorm | norm | linear | conv | embedding | ...
    mean: float
    std: float
    percentiles: dict[str, float]  # "p5" ... "p95"
    saturated: float | None  # saturating: fraction of outputs beyond 0.97 of the half range
    dead: float | None  # rectifying: fraction of units never above the floor over the batch
    hist_range: float  # the histogram spans [-hist_range, hist_range]
    hist: list[int]
    samples: int | None = None  # draws per unit that ``dead`` is over (batch × positions)
    grad_mean: float | None = None
    grad_std: float | None = None
    grad_hist_range: float | None = None
    grad_hist: list[int] | None = None


@dataclass
class ParamStats:
    """A parameter, its gradient, and what the optimizer step did to it."""

    name: str
    shape: list[int]
    data_std: float
    grad_std: float | None
    grad_to_data: float | None
    update_to_data: float | None  # std of the step's change / data std
    grad_hist_range: float | None = None
    grad_hist: list[int] | None = None


@dataclass
class BatchNormStats:
    """How far a BatchNorm's running statistics were from the batch's, before it moved them."""

    name: str
    mean_drift: float  # max over features |running_mean − batch_mean| / batch std
    var_ratio: float  # max over features of running_var / batch_var, or its inverse
    time_constants: float  # batches tracked × momentum: how far the running statistics caught up


@dataclass
class SecondOrderStats:
    """The curvature of one batch's loss and the noise of its gradient, where they were measured
    (``normlab.second_order``); None for what was not, with ``note`` saying why."""

    sharpness: float | None  # the Hessian's top eigenvalue λmax
    hessian_trace: float | None  # Hutchinson's estimate of tr(H)
    noise_scale: float | None  # B_simple = tr(Σ)/|G|², McCandlish et al. 2018
    preconditioned_sharpness: float | None  # λmax(P⁻¹H) with Adam's preconditioner P
    lr: float | None  # the learning rate the step took: the stability line's
    beta1: float | None  # Adam's β₁, for its stability line (2 + 2β₁)/((1 − β₁)·lr)
    batch_size: int
    note: str | None = None  # why something was not measured


@dataclass
class Snapshot:
    step: int
    loss: float | None
    eval_loss: float | None  # the same batch in eval mode: BatchNorm's train/eval mismatch
    layers: list[LayerStats]
    params: list[ParamStats]
    batchnorms: list[BatchNormStats]
    second_order: SecondOrderStats | None = None


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None: strict JSON has neither.

    >>> finite({"a": [1.0, float("nan")], "b": float("inf")})
    {'a': [1.0, None], 'b': None}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def snapshot_to_dict(snap: Snapshot) -> dict:
    """``dataclasses.asdict(snap)`` without its deep copies: ten times faster, same result."""
    return {
        "step": snap.step,
        "loss": snap.loss,
        "eval_loss": snap.eval_loss,
        "layers": [dict(vars(x)) for x in snap.layers],
        "params": [dict(vars(x)) for x in snap.params],
        "batchnorms": [dict(vars(x)) for x in snap.batchnorms],
        "second_order": dict(vars(snap.second_order)) if snap.second_order else None,
    }


def snapshot_from_dict(d: dict) -> Snapshot:
    """The inverse of ``snapshot_to_dict`` (a row of ``diagnostics.jsonl``)."""
    return Snapshot(
        step=d["step"],
        loss=d["loss"],
        eval_loss=d["eval_loss"],
        layers=[LayerStats(**x) for x in d["layers"]],
        params=[ParamStats(**x) for x in d["params"]],
        batchnorms=[BatchNormStats(**x) for x in d["batchnorms"]],
        second_order=SecondOrderStats(**d["second_order"]) if d.get("second_order") else None,
    )


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
