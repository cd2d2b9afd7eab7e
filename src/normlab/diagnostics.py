"""Per-layer health of activations and gradients, for any ``torch.nn.Module``.

What the makemore lecture looks at by hand, measured on one training step:

- every layer's output: mean, std, percentiles, a histogram; the saturated
  fraction of tanh (``|t| > 0.97``) and sigmoid outputs; the dead fraction of
  ReLU units (never positive over the batch);
- the gradient of every layer's output: mean, std, a histogram;
- every parameter: grad std, the grad:data ratio, and the update:data ratio
  measured from the parameter's actual change across the optimizer step, so it
  is right for Adam as for SGD;
- every BatchNorm: how far its running statistics are from the batch's.

Usage::

    diag = Diagnostics(model)          # attaches forward hooks; diag.detach() removes them
    diag.arm()                         # the next training-mode forward/backward is recorded
    logits, loss = model(x, y); loss.backward(); optimizer.step()
    snapshot = diag.collect(step, loss.item())
    print(report(diag, num_classes=27).table())

Statistics are computed on the device and brought to the host in one transfer
per recording. Layers need not store their outputs: a forward hook measures
the output and puts a tensor hook on it for the gradient.
"""

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from normlab import nn as nl

SATURATION = 0.97  # |tanh| beyond this passes less than 6% of the gradient
PERCENTILES = (5, 25, 50, 75, 95)
BINS = 50  # histogram bins kept per layer
FINE_BINS = 1000  # the finer histogram the percentiles come from (a multiple of BINS)
HIST_SAMPLE = 16_384  # histograms and percentiles use at most about 2× this many values a row

_KINDS = (
    ("tanh", (nn.Tanh, nl.Tanh)),
    ("sigmoid", (nn.Sigmoid,)),
    ("relu", (nn.ReLU, nl.ReLU)),
    ("batchnorm", (nl.BatchNorm1d, nn.modules.batchnorm._BatchNorm)),
    ("norm", (nl.LayerNorm, nl.GroupNorm, nn.LayerNorm, nn.GroupNorm)),
    ("linear", (nl.Linear, nn.Linear)),
)
ACTIVATIONS = ("tanh", "sigmoid", "relu")


def layer_kind(module: nn.Module) -> str | None:
    """The kind of layer whose output is recorded, or None for one that is not."""
    for kind, types in _KINDS:
        if isinstance(module, types):
            return kind
    return None


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
class LayerStats:
    name: str
    kind: str
    mean: float
    std: float
    percentiles: dict[str, float]
    saturated: float | None  # tanh and sigmoid
    dead: float | None  # ReLU
    hist_range: float  # the histogram spans [-hist_range, hist_range]
    hist: list[int]
    grad_mean: float | None = None
    grad_std: float | None = None
    grad_hist_range: float | None = None
    grad_hist: list[int] | None = None


@dataclass
class ParamStats:
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
    name: str
    mean_drift: float  # max over features |running_mean − batch_mean| / batch std
    var_ratio: float  # max over features of running_var / batch_var, or its inverse
    settled: bool  # enough batches for the running statistics to have caught up


@dataclass
class Snapshot:
    step: int
    loss: float | None
    eval_loss: float | None  # the same batch in eval mode: BatchNorm's train/eval mismatch
    layers: list[LayerStats]
    params: list[ParamStats]
    batchnorms: list[BatchNormStats]


@dataclass
class Verdict:
    kind: str  # saturated | dead | vanishing | exploding | update-ratio-off | ...
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

    def table(self) -> str:
        return format_table(self)


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None: strict JSON has neither."""
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
    }


def snapshot_from_dict(d: dict) -> Snapshot:
    """The inverse of ``dataclasses.asdict`` for a Snapshot (as stored in diagnostics.jsonl)."""
    return Snapshot(
        step=d["step"],
        loss=d["loss"],
        eval_loss=d["eval_loss"],
        layers=[LayerStats(**x) for x in d["layers"]],
        params=[ParamStats(**x) for x in d["params"]],
        batchnorms=[BatchNormStats(**x) for x in d["batchnorms"]],
    )


# ---------------------------------------------------------------------------- measuring


# Statistics are computed for groups of same-shaped tensors at once (a model's hidden
# layers mostly share one shape): a few dozen operations per recording instead of a few
# dozen per layer, which is what keeps a recording cheap on the CPU.


def _histograms(rows: Tensor, r: Tensor, bins: int) -> Tensor:
    """Counts of each row of ``rows`` (G, N) in ``bins`` equal bins over ``[-r, r]`` (r: (G,))."""
    rows = rows[:, :: max(1, rows.shape[1] // HIST_SAMPLE)]  # an even subsample of a big layer
    G = rows.shape[0]
    # bin = floor((x + r) / (2r) · bins); values beyond ±r land in the end bins, NaN in bin 0
    position = ((rows / r[:, None] + 1) * (bins / 2)).nan_to_num_(0)
    idx = position.floor_().clamp_(0, bins - 1).long()
    idx += torch.arange(G, device=rows.device)[:, None] * bins  # each row its own block
    counts = torch.zeros(G * bins, device=rows.device)
    return counts.scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device=rows.device))


def _percentiles(fine_hist: Tensor, r: Tensor) -> Tensor:
    """PERCENTILES (G, P) read off FINE_BINS histograms (G, FINE_BINS) over ``[-r, r]``.

    Interpolated within a bin, so exact to a bin width (0.2% of the range): a sort
    would be exact, but on the CPU it costs more than all the rest of a recording.
    """
    cdf = fine_hist.cumsum(1) / fine_hist.sum(1, keepdim=True)  # (G, FINE_BINS)
    q = torch.tensor(PERCENTILES, device=cdf.device, dtype=cdf.dtype) / 100
    q = q.expand(cdf.shape[0], -1).contiguous()  # (G, P)
    i = torch.searchsorted(cdf, q).clamp_(max=FINE_BINS - 1)  # first bin reaching each q
    below = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(q))
    within = ((q - below) / (cdf.gather(1, i) - below).clamp_min(1e-12)).clamp_(0, 1)
    return -r[:, None] + (i + within) * (2 * r[:, None] / FINE_BINS)


def _row_std(rows: Tensor) -> Tensor:
    """Sample std of each row of (G, N); on the CPU several times faster than ``std(1)``."""
    centered = rows - rows.mean(1, keepdim=True)
    return (centered.square().sum(1) / max(rows.shape[1] - 1, 1)).sqrt()


def _output_stats(kinds: list[str], outputs: list[Tensor]) -> Tensor:
    """Per layer (rows): mean, std, percentiles, tanh and sigmoid saturation, dead fraction,
    histogram range, histogram. ``outputs`` all have one shape ``(B, ...)``."""
    x = torch.stack([o.float().reshape(o.shape[0], -1) for o in outputs])  # (G, B, units)
    flat = x.flatten(1)  # (G, N)
    bounded = torch.tensor([k in ("tanh", "sigmoid") for k in kinds], device=x.device)
    # tanh and sigmoid share the range [-1, 1], so their plots compare; others span their max
    r = torch.where(bounded, 1.0, flat.abs().amax(1).clamp_min(1e-12))  # (G,)
    fine = _histograms(flat, r, FINE_BINS).view(-1, FINE_BINS)  # (G, FINE_BINS)
    nan = torch.full_like(r, math.nan)
    columns = [
        flat.mean(1),
        _row_std(flat),
        *_percentiles(fine, r).T,
        # each measured only where some layer of the group needs it
        (flat.abs() > SATURATION).float().mean(1) if "tanh" in kinds else nan,
        ((flat - 0.5).abs() > SATURATION - 0.5).float().mean(1) if "sigmoid" in kinds else nan,
        1 - (x > 0).any(dim=1).float().mean(1) if "relu" in kinds else nan,  # dead ReLU units
        r,
    ]
    hist = fine.view(-1, BINS, FINE_BINS // BINS).sum(2)  # (G, BINS)
    return torch.cat([torch.stack(columns, 1), hist], 1)


def _spread_stats(tensors: list[Tensor]) -> Tensor:
    """Per tensor (rows): mean, std, range (max |x|), histogram. One shape for all."""
    rows = torch.stack([t.detach().float().flatten() for t in tensors])  # (G, N)
    r = rows.abs().amax(1).clamp_min(1e-30)
    hist = _histograms(rows, r, BINS).view(-1, BINS)
    return torch.cat([torch.stack([rows.mean(1), _row_std(rows), r], 1), hist], 1)


def _param_stats(before: list[Tensor], params: list[Tensor]) -> Tensor:
    """Per parameter (rows): data std, update std, then grad std, range, histogram.

    One shape for all; a parameter without a gradient has NaN gradient columns.
    """
    b = torch.stack([t.float().reshape(-1) for t in before])  # (G, N)
    a = torch.stack([t.detach().float().reshape(-1) for t in params])
    grads = [p.grad if p.grad is not None else torch.full_like(p, math.nan) for p in params]
    spread = _spread_stats(grads)[:, 1:]  # grad std, range, histogram
    return torch.cat([_row_std(b)[:, None], _row_std(a - b)[:, None], spread], 1)


def _grouped(named: dict[str, Tensor], stats) -> dict[str, Tensor]:
    """Apply ``stats(names, tensors) -> (G, K)`` to each group of same-shaped tensors."""
    groups: dict[tuple, list[str]] = {}
    for name, t in named.items():
        groups.setdefault((tuple(t.shape), t.device), []).append(name)
    rows = {}
    for names in groups.values():
        rows.update(zip(names, stats(names, [named[n] for n in names]), strict=True))
    return rows


def _batchnorm_stats(captured: list[tuple]) -> Tensor:
    """Per BatchNorm (rows): mean drift, variance ratio, settledness; one input shape for all.

    ``captured`` holds (input, running_mean, running_var, eps, momentum, batches tracked),
    the running statistics as they were before this batch updated them.
    """
    x = torch.stack([c[0].float() for c in captured])  # (G, B, C, *spatial)
    dims = (1, *range(3, x.dim()))  # every axis but the layer and the feature (BatchNorm1d/2d/3d)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims)  # (G, C), biased: what the batch normalizes with
    mean = mean.flatten(1)  # (G, C)
    running_mean = torch.stack([c[1] for c in captured]).float()
    running_var = torch.stack([c[2] for c in captured]).float()
    eps = torch.tensor([[c[3]] for c in captured], device=x.device)  # (G, 1)
    drift = ((running_mean - mean).abs() / (var + eps).sqrt()).amax(1)
    ratio = (running_var + eps) / (var + eps)
    var_ratio = torch.maximum(ratio, 1 / ratio).amax(1)
    # time constants seen: batches × momentum (a cumulative average counts as momentum 0.1)
    factor = torch.tensor([c[4] if c[4] is not None else 0.1 for c in captured], device=x.device)
    settled = torch.stack([c[5] for c in captured]).float() * factor
    return torch.stack([drift, var_ratio, settled], 1)


class Diagnostics:
    """Hooks on a model that record one training step's statistics.

    Works on any ``nn.Module``: the outputs of activation, normalization and
    Linear layers (normlab's or torch's) are recorded, and every parameter.
    ``arm()`` attaches the hooks and ``collect()`` detaches them, so the model
    runs at full speed between recordings; only training-mode passes are
    recorded, and a layer called twice in one pass on its first call.
    Attaching twice does not double-count; ``detach()`` removes every hook.
    """

    def __init__(self, model: nn.Module, thresholds: Thresholds | None = None) -> None:
        self.model = model
        self.thresholds = thresholds or Thresholds()
        self.layers = [(n, m, layer_kind(m)) for n, m in model.named_modules() if layer_kind(m)]
        self.history: list[Snapshot] = []
        self._handles: list = []
        self._armed = False
        self._outputs: dict[str, Tensor] = {}
        self._grads: dict[str, Tensor] = {}
        self._batchnorm: dict[str, tuple] = {}
        self._before: dict[str, Tensor] = {}

    # -- hooks
    def attach(self) -> "Diagnostics":
        if self._handles:  # already attached: attaching again must not double-count
            return self
        for name, module, kind in self.layers:
            self._handles.append(module.register_forward_hook(self._forward_hook(name, kind)))
            if kind == "batchnorm":
                self._handles.append(module.register_forward_pre_hook(self._bn_hook(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False

    def _recording(self, module: nn.Module) -> bool:
        return self._armed and module.training

    def _forward_hook(self, name: str, kind: str):
        def hook(module, _inputs, out):
            if not self._recording(module) or name in self._outputs or not torch.is_tensor(out):
                return
            self._outputs[name] = out.detach()  # measured in collect(), grouped by shape
            if out.requires_grad:

                def grad_hook(grad):
                    self._grads.setdefault(name, grad.detach())

                out.register_hook(grad_hook)

        return hook

    def _bn_hook(self, name: str):
        def hook(module, inputs):
            tracked = module.running_mean is not None and module.track_running_stats
            if self._recording(module) and name not in self._batchnorm and tracked:
                # the running statistics before this batch moves them; measured in collect()
                self._batchnorm[name] = (
                    inputs[0].detach(),
                    module.running_mean.clone(),
                    module.running_var.clone(),
                    module.eps,
                    module.momentum,
                    module.num_batches_tracked.clone(),
                )

        return hook

    # -- one recording
    def arm(self) -> None:
        """Record the next training-mode forward and backward pass and the optimizer step."""
        self.attach()
        self._outputs, self._grads, self._batchnorm = {}, {}, {}
        self._before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self._armed = True

    def collect(self, step: int, loss: float | None = None, eval_loss: float | None = None):
        """Finish the armed recording (after ``optimizer.step()``) and return its Snapshot."""
        if not self._armed:
            raise RuntimeError("Diagnostics.collect() without arm()")
        self.detach()  # hooks cost time on every call: they stay only for a recording
        kinds = {name: kind for name, _, kind in self.layers}
        outputs = _grouped(
            self._outputs, lambda names, ts: _output_stats([kinds[n] for n in names], ts)
        )
        grads = _grouped(self._grads, lambda _, ts: _spread_stats(ts))
        bn_inputs = {name: captured[0] for name, captured in self._batchnorm.items()}
        batchnorm = _grouped(
            bn_inputs, lambda names, _: _batchnorm_stats([self._batchnorm[n] for n in names])
        )
        named = list(self.model.named_parameters())
        parts: list[tuple[str, str, Tensor]] = []  # (what, name, its row on the device)
        for name, _, _ in self.layers:
            for what, rows in (("out", outputs), ("grad", grads), ("bn", batchnorm)):
                if name in rows:
                    parts.append((what, name, rows[name]))
        param_rows = _grouped(
            dict(named),
            lambda names, ps: _param_stats([self._before[n] for n in names], ps),
        )
        parts += [("param", name, param_rows[name]) for name, _ in named]
        # one transfer to the host for the whole recording
        host = torch.cat([v.reshape(-1) for _, _, v in parts]).cpu() if parts else None
        snapshot = self._unpack(parts, host, step, loss, eval_loss)
        self._outputs, self._grads, self._batchnorm, self._before = {}, {}, {}, {}
        self.history.append(snapshot)
        return snapshot

    def _unpack(self, parts, host, step, loss, eval_loss) -> Snapshot:
        kinds = {name: kind for name, _, kind in self.layers}
        shapes = {name: list(p.shape) for name, p in self.model.named_parameters()}
        layers: dict[str, LayerStats] = {}
        params, batchnorms = [], []
        values = host.tolist() if host is not None else []
        offset = 0
        for what, name, vec in parts:
            v = values[offset : offset + vec.numel()]
            offset += vec.numel()
            if what == "out":
                k = len(PERCENTILES)
                kind = kinds[name]
                tanh_saturated, sigmoid_saturated, dead = v[2 + k : 5 + k]
                layers[name] = LayerStats(
                    name=name,
                    kind=kind,
                    mean=v[0],
                    std=v[1],
                    percentiles={
                        f"p{p}": x for p, x in zip(PERCENTILES, v[2 : 2 + k], strict=True)
                    },
                    saturated={"tanh": tanh_saturated, "sigmoid": sigmoid_saturated}.get(kind),
                    dead=dead if kind == "relu" else None,
                    hist_range=v[5 + k],
                    hist=_counts(v[6 + k :]),
                )
            elif what == "grad" and name in layers:
                layer = layers[name]
                layer.grad_mean, layer.grad_std, layer.grad_hist_range = v[0], v[1], v[2]
                layer.grad_hist = _counts(v[3:])
            elif what == "bn":
                batchnorms.append(
                    BatchNormStats(name, v[0], v[1], v[2] >= self.thresholds.bn_settled)
                )
            elif what == "param":
                data_std, update_std, grad_std, grad_range = (_none_if_nan(x) for x in v[:4])
                # a constant tensor (a fresh BatchNorm gain) has no spread to compare with
                ok = data_std is not None and data_std > 1e-6
                params.append(
                    ParamStats(
                        name=name,
                        shape=shapes[name],
                        data_std=data_std or 0.0,
                        grad_std=grad_std,
                        grad_to_data=grad_std / data_std if ok and grad_std is not None else None,
                        update_to_data=update_std / data_std
                        if ok and update_std is not None
                        else None,
                        grad_hist_range=grad_range,
                        grad_hist=_counts(v[4:]) if grad_std is not None else None,
                    )
                )
        return Snapshot(step, loss, eval_loss, list(layers.values()), params, batchnorms)


def _counts(values: list[float]) -> list[int]:
    """Histogram counts as ints: exact, and half the size in diagnostics.jsonl."""
    return [int(c) for c in values]


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


# ---------------------------------------------------------------------------- verdicts


def verdicts(
    history: list[Snapshot], thresholds: Thresholds, num_classes: int | None = None
) -> list[Verdict]:
    """What crossed a threshold in the latest snapshot (and, for update ratios, before it)."""
    t = thresholds
    snap = history[-1]
    found: list[Verdict] = []
    for layer in snap.layers:
        if layer.saturated is not None and layer.saturated > t.saturated:
            found.append(
                Verdict(
                    "saturated",
                    layer.name,
                    layer.saturated,
                    t.saturated,
                    f"{layer.saturated:.0%} of outputs beyond ±{SATURATION}",
                )
            )
        if layer.dead is not None and layer.dead > t.dead:
            found.append(
                Verdict(
                    "dead",
                    layer.name,
                    layer.dead,
                    t.dead,
                    f"{layer.dead:.0%} of units never positive in the batch",
                )
            )
    found += _depth_verdicts(snap, t)
    for bn in snap.batchnorms:
        if bn.settled and bn.mean_drift > t.bn_drift:
            found.append(
                Verdict(
                    "bn-drift",
                    bn.name,
                    bn.mean_drift,
                    t.bn_drift,
                    f"running mean {bn.mean_drift:.2f} batch stds from the batch's",
                )
            )
    found += _update_verdicts(history, t)
    first = history[0]
    if num_classes and first.step == 0 and first.loss is not None:
        uniform = math.log(num_classes)
        if first.loss - uniform > t.confident_at_init:
            found.append(
                Verdict(
                    "confident-at-init",
                    "output",
                    first.loss,
                    uniform + t.confident_at_init,
                    f"loss at step 0 is {first.loss:.2f}, a uniform guess gives "
                    f"ln({num_classes}) = {uniform:.2f}: confidently wrong",
                )
            )
    return found


def _depth_verdicts(snap: Snapshot, t: Thresholds) -> list[Verdict]:
    """Activation and gradient std from the first to the last activation layer."""
    acts = [layer for layer in snap.layers if layer.kind in ACTIVATIONS]
    if len(acts) < 2:
        return []
    first, last = acts[0], acts[-1]
    found = []
    if first.std > 0:
        ratio = last.std / first.std
        if ratio < 1 / t.depth_ratio:
            found.append(
                Verdict(
                    "vanishing",
                    last.name,
                    ratio,
                    1 / t.depth_ratio,
                    f"activation std fell {1 / ratio:.0f}× from {first.name}",
                )
            )
        elif ratio > t.depth_ratio:
            found.append(
                Verdict(
                    "exploding",
                    last.name,
                    ratio,
                    t.depth_ratio,
                    f"activation std grew {ratio:.0f}× from {first.name}",
                )
            )
    if first.grad_std and last.grad_std:
        ratio = first.grad_std / last.grad_std  # gradients flow from the last layer to the first
        if ratio < 1 / t.depth_ratio:
            found.append(
                Verdict(
                    "vanishing",
                    first.name,
                    ratio,
                    1 / t.depth_ratio,
                    f"gradient std fell {1 / ratio:.0f}× on its way back from {last.name}",
                )
            )
        elif ratio > t.depth_ratio:
            found.append(
                Verdict(
                    "exploding",
                    first.name,
                    ratio,
                    t.depth_ratio,
                    f"gradient std grew {ratio:.0f}× on its way back from {last.name}",
                )
            )
    return found


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


def _update_verdicts(history: list[Snapshot], t: Thresholds) -> list[Verdict]:
    found = []
    for name, points in update_history(history).items():
        recent = [v for _, v in points[-t.update_sustained :]]
        if len(recent) == t.update_sustained and all(
            abs(v - t.update_log10) > t.update_tolerance for v in recent
        ):
            found.append(
                Verdict(
                    "update-ratio-off",
                    name,
                    recent[-1],
                    t.update_log10,
                    f"log10 update:data has been {recent[-1]:.1f} for "
                    f"{t.update_sustained} recordings (healthy: near {t.update_log10:g})",
                )
            )
    return found


def report(diag: Diagnostics, num_classes: int | None = None) -> Report:
    """The latest snapshot of ``diag`` with its verdicts."""
    if not diag.history:
        raise RuntimeError("no recording yet: call arm() and collect() first")
    first = diag.history[0]
    return Report(
        snapshot=diag.history[-1],
        verdicts=verdicts(diag.history, diag.thresholds, num_classes),
        update_history=update_history(diag.history),
        init_loss=first.loss if first.step == 0 else None,
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------- the table


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rep: Report) -> str:
    """Fixed-width tables of layers and parameters, then the verdicts."""
    snap = rep.snapshot
    lines = [f"diagnostics at step {snap.step:,}"]
    if snap.loss is not None:
        line = f"loss {snap.loss:.4f}"
        if snap.eval_loss is not None:
            line += f" (train mode), {snap.eval_loss:.4f} (eval mode, same batch)"
        if rep.num_classes:
            line += f"; ln({rep.num_classes}) = {math.log(rep.num_classes):.4f}"
        lines.append(line)
    lines += [
        "",
        f"{'layer':<22}{'kind':<10}{'mean':>9}{'std':>9}{'p5':>9}{'p95':>9}"
        f"{'sat %':>7}{'dead %':>7}{'grad std':>10}",
    ]
    for layer in snap.layers:
        lines.append(
            f"{layer.name[:21]:<22}{layer.kind:<10}{layer.mean:>9.3f}{layer.std:>9.3f}"
            f"{layer.percentiles['p5']:>9.3f}{layer.percentiles['p95']:>9.3f}"
            f"{_fmt(layer.saturated and layer.saturated * 100, '.1f'):>7}"
            f"{_fmt(layer.dead and layer.dead * 100, '.1f'):>7}{_fmt(layer.grad_std, '.2e'):>10}"
        )
    lines += [
        "",
        f"{'parameter':<26}{'shape':<14}{'data std':>10}{'grad std':>10}"
        f"{'grad:data':>11}{'log10 upd:data':>15}",
    ]
    for p in snap.params:
        log_update = math.log10(p.update_to_data) if p.update_to_data else None
        lines.append(
            f"{p.name[:25]:<26}{'x'.join(map(str, p.shape)):<14}{p.data_std:>10.3f}"
            f"{_fmt(p.grad_std, '.2e'):>10}{_fmt(p.grad_to_data, '.2e'):>11}"
            f"{_fmt(log_update, '.2f'):>15}"
        )
    if snap.batchnorms:
        lines += ["", f"{'batchnorm':<26}{'mean drift':>12}{'var ratio':>11}{'settled':>9}"]
        for bn in snap.batchnorms:
            lines.append(
                f"{bn.name[:25]:<26}{bn.mean_drift:>12.3f}{bn.var_ratio:>11.3f}{bn.settled!s:>9}"
            )
    lines.append("")
    if rep.verdicts:
        lines.append(f"verdicts ({len(rep.verdicts)}):")
        for v in rep.verdicts:
            lines.append(f"  {v.kind:<18} {v.layer}: {v.message}")
    else:
        lines.append("verdicts: none (healthy by every check)")
    return "\n".join(lines)
