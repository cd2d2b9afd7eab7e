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
BINS = 50
_QUANTILE_LIMIT = 1_000_000  # torch.quantile sorts: larger outputs are subsampled

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
    hist: list[float]
    grad_mean: float | None = None
    grad_std: float | None = None
    grad_hist_range: float | None = None
    grad_hist: list[float] | None = None


@dataclass
class ParamStats:
    name: str
    shape: list[int]
    data_std: float
    grad_std: float | None
    grad_to_data: float | None
    update_to_data: float | None  # std of the step's change / data std
    grad_hist_range: float | None = None
    grad_hist: list[float] | None = None


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


def _histogram(x: Tensor, r: Tensor) -> Tensor:
    """Counts of ``x`` in BINS equal bins over ``[-r, r]``, on the device with no host sync."""
    x = x.detach().flatten().float()
    inner_edges = torch.linspace(-1, 1, BINS + 1, device=x.device)[1:-1] * r  # (BINS - 1,)
    idx = torch.bucketize(x, inner_edges)  # 0 .. BINS-1; values beyond ±r go to the end bins
    return torch.zeros(BINS, device=x.device).scatter_add_(0, idx, torch.ones_like(x))


def _output_stats(kind: str, out: Tensor) -> Tensor:
    """mean, std, percentiles, saturated, dead, range, histogram: one float vector on the device."""
    x = out.detach().float()
    flat = x.flatten()
    sample = flat[:: max(1, flat.numel() // _QUANTILE_LIMIT)]
    q = torch.quantile(sample, torch.tensor([p / 100 for p in PERCENTILES], device=x.device))
    nan = torch.full((1,), math.nan, device=x.device)
    saturated = dead = nan
    if kind == "tanh":
        saturated = (flat.abs() > SATURATION).float().mean().view(1)
    elif kind == "sigmoid":
        saturated = ((flat - 0.5).abs() > SATURATION - 0.5).float().mean().view(1)
    elif kind == "relu":
        units = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.view(-1, 1)  # (B, units)
        dead = 1 - (units > 0).any(dim=0).float().mean().view(1)
    if kind in ("tanh", "sigmoid"):
        r = torch.ones((), device=x.device)  # the same range for every layer: comparable plots
    else:
        r = flat.abs().max().clamp_min(1e-12)
    return torch.cat(
        [flat.mean().view(1), flat.std().view(1), q, saturated, dead, r.view(1), _histogram(x, r)]
    )


def _grad_stats(grad: Tensor) -> Tensor:
    """mean, std, range, histogram of an output gradient."""
    g = grad.detach().float().flatten()
    r = g.abs().max().clamp_min(1e-30)
    return torch.cat([g.mean().view(1), g.std().view(1), r.view(1), _histogram(g, r)])


def _batchnorm_stats(module: nn.Module, x: Tensor) -> Tensor:
    """mean drift, variance ratio and settledness of a BatchNorm's running statistics."""
    x = x.detach().float()
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    std = (var + module.eps).sqrt()
    drift = ((module.running_mean.float() - mean).abs() / std).max()
    ratio = (module.running_var.float() + module.eps) / (var + module.eps)
    var_ratio = torch.maximum(ratio, 1 / ratio).max()
    momentum = module.momentum
    batches = module.num_batches_tracked.float()
    # the running average's time constant: 1/momentum batches (cumulative: any 30 batches)
    settled = batches * (momentum if momentum is not None else 0.1)
    return torch.stack([drift, var_ratio, settled])


class Diagnostics:
    """Hooks on a model that record one training step's statistics when armed.

    Works on any ``nn.Module``: the outputs of activation, normalization and
    Linear layers (normlab's or torch's) are recorded, and every parameter.
    A layer called twice in one forward pass is recorded on its first call.
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
        self._batchnorm: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}
        self.attach()

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
            self._outputs[name] = _output_stats(kind, out)
            if out.requires_grad:

                def grad_hook(grad):
                    self._grads.setdefault(name, _grad_stats(grad))

                out.register_hook(grad_hook)

        return hook

    def _bn_hook(self, name: str):
        def hook(module, inputs):
            tracked = module.running_mean is not None and module.track_running_stats
            if self._recording(module) and name not in self._batchnorm and tracked:
                self._batchnorm[name] = _batchnorm_stats(module, inputs[0])

        return hook

    # -- one recording
    def arm(self) -> None:
        """Record the next training-mode forward and backward pass and the optimizer step."""
        self._outputs, self._grads, self._batchnorm = {}, {}, {}
        self._before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self._armed = True

    def collect(self, step: int, loss: float | None = None, eval_loss: float | None = None):
        """Finish the armed recording (after ``optimizer.step()``) and return its Snapshot."""
        if not self._armed:
            raise RuntimeError("Diagnostics.collect() without arm()")
        self._armed = False
        parts: list[tuple[str, str, Tensor]] = []  # (what, name, vector on the device)
        for name, _, _ in self.layers:
            if name in self._outputs:
                parts.append(("out", name, self._outputs[name]))
            if name in self._grads:
                parts.append(("grad", name, self._grads[name]))
            if name in self._batchnorm:
                parts.append(("bn", name, self._batchnorm[name]))
        for name, p in self.model.named_parameters():
            before = self._before[name].float()
            update_std = (p.detach().float() - before).std()
            if p.grad is None:
                nan = torch.full((BINS + 2,), math.nan, device=p.device)
                vec = torch.cat([before.std().view(1), update_std.view(1), nan])
            else:  # grad std, range and histogram as for layer outputs
                vec = torch.cat([before.std().view(1), update_std.view(1), _grad_stats(p.grad)[1:]])
            parts.append(("param", name, vec))
        # one transfer to the host for the whole recording
        host = torch.cat([v.flatten().float() for _, _, v in parts]).cpu() if parts else None
        snapshot = self._unpack(parts, host, step, loss, eval_loss)
        self._outputs, self._grads, self._batchnorm, self._before = {}, {}, {}, {}
        self.history.append(snapshot)
        return snapshot

    def _unpack(self, parts, host, step, loss, eval_loss) -> Snapshot:
        kinds = {name: kind for name, _, kind in self.layers}
        shapes = {name: list(p.shape) for name, p in self.model.named_parameters()}
        layers: dict[str, LayerStats] = {}
        params, batchnorms = [], []
        offset = 0
        for what, name, vec in parts:
            v = host[offset : offset + vec.numel()].tolist()
            offset += vec.numel()
            if what == "out":
                k = len(PERCENTILES)
                layers[name] = LayerStats(
                    name=name,
                    kind=kinds[name],
                    mean=v[0],
                    std=v[1],
                    percentiles={
                        f"p{p}": x for p, x in zip(PERCENTILES, v[2 : 2 + k], strict=True)
                    },
                    saturated=_none_if_nan(v[2 + k]),
                    dead=_none_if_nan(v[3 + k]),
                    hist_range=v[4 + k],
                    hist=v[5 + k :],
                )
            elif what == "grad" and name in layers:
                layer = layers[name]
                layer.grad_mean, layer.grad_std, layer.grad_hist_range = v[0], v[1], v[2]
                layer.grad_hist = v[3:]
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
                        update_to_data=update_std / data_std if ok and update_std else None,
                        grad_hist_range=grad_range,
                        grad_hist=v[4:] if grad_std is not None else None,
                    )
                )
        return Snapshot(step, loss, eval_loss, list(layers.values()), params, batchnorms)


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
    """log10 update:data ratio of each weight matrix (2-D or more) over the recordings."""
    series: dict[str, list[tuple[int, float]]] = {}
    for snap in history:
        for p in snap.params:
            if len(p.shape) >= 2 and p.update_to_data:
                series.setdefault(p.name, []).append((snap.step, math.log10(p.update_to_data)))
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
