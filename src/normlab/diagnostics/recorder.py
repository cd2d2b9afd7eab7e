"""``Diagnostics``: hooks on any ``nn.Module`` that record one training step into a Snapshot."""

import math
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from normlab.dataflow import first_tensor
from normlab.diagnostics import stats
from normlab.diagnostics.keep import KeepAsIs
from normlab.diagnostics.nogc import gc_paused
from normlab.diagnostics.snapshot import (
    BatchNormStats,
    LayerStats,
    ParamStats,
    Snapshot,
    update_history,
)
from normlab.nn import FlattenConsecutive, FlattenContext, Kind, layer_kind

# model → what its forward pass writes in place, ("outputs" or "batchnorm", layer name),
# learned by watching its first recording, or a pass of learn_writes (KeepAsIs): later ones
# copy exactly those at the hook
_WRITTEN_IN_PLACE: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


class BatchNormCapture(NamedTuple):
    """A BatchNorm's running statistics as they were before the recorded batch moved them,
    copied at ``arm()`` (``running_statistics``)."""

    running_mean: Tensor  # (C,)
    running_var: Tensor  # (C,)
    eps: float
    momentum: float | None
    batches_tracked: Tensor  # ()


class Diagnostics:
    """Hooks on a model that record one training step's statistics.

    Works on any ``nn.Module``: the outputs of the layers with a kind
    (``normlab.nn.layer_kind``: activations, normalizations, Linear, conv,
    embedding and attention layers, normlab's, torch's or another library's)
    and every parameter are recorded. A layer whose output is a tuple, a dict or
    a dataclass (attention) is recorded by its first tensor. ``arm()`` attaches
    the hooks and ``collect()`` detaches them, so the model runs at full speed
    between recordings; only training-mode passes are recorded, and a layer
    called twice in one pass on its first call. ``arm()`` also copies each parameter
    (for the step's update) and each BatchNorm's running statistics (for their drift from
    the recorded batch), so nothing should move them between ``arm()`` and the recorded
    forward pass. ``history`` keeps the first
    snapshot and the last ``keep`` (so memory does not grow with the recordings),
    ``update_history`` every recording's update:data ratios.

    A model wrapped by ``torch.compile`` is refused: its compiled graph does not
    run the layers' hooks. Record the model itself (``compiled._orig_mod``) on
    steps that run it uncompiled. A model wrapped by DDP is recorded as any other.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> diag = Diagnostics(model)
        >>> diag.arm()  # the next forward, backward and optimizer step are recorded
        >>> model(torch.randn(32, 8)).square().mean().backward()
        >>> optimizer.step()
        >>> snapshot = diag.collect(step=0)
        >>> [(layer.name, layer.kind) for layer in snapshot.layers]
        [('0', 'linear'), ('1', 'tanh')]
    """

    def __init__(self, model: nn.Module, keep: int = 16) -> None:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError(
                "Diagnostics cannot record a model wrapped by torch.compile: its compiled graph "
                "skips the layers' hooks; record model._orig_mod on uncompiled steps instead"
            )
        self.model = model
        kinds = [(n, m, layer_kind(m)) for n, m in model.named_modules()]
        self.layers = [(n, m, kind) for n, m, kind in kinds if kind is not None]
        self._batchnorms = [(n, m) for n, m, kind in self.layers if kind.family == "batchnorm"]
        self.unrecorded = [n for n, m, kind in kinds if kind is None and _is_leaf_with_output(m)]
        self.keep = keep
        self.history: list[Snapshot] = []
        self.update_history: dict[str, list[tuple[int, float]]] = {}
        self._handles: list = []
        self._armed = False
        self._outputs: dict[str, Tensor] = {}
        self._grads: dict[str, Tensor] = {}
        self._batchnorm: dict[str, BatchNormCapture] = {}  # at arm(), of those that track them
        self._batchnorm_inputs: dict[str, Tensor] = {}  # (N, C, *)
        self._params: dict[str, Tensor] = {}  # the model's, at arm()
        self._before = stats.ParamCopies([], None)  # copies of them, at arm()
        self._awaits_backward = False  # a recorded output will receive a gradient
        self._keeper = KeepAsIs()  # active over the model's forward pass while armed
        self._keeping = 0  # depth of the model's calls that entered it
        self._watching = False  # this recording's forward pass runs under the keeper's mode
        self._written: set = set()  # else what it copies at the hooks (_WRITTEN_IN_PLACE's)
        self.overwritten: list[str] = []  # outputs written in place where no hook could see

    # -- hooks
    def _attach(self) -> None:
        if self._handles:  # already attached: attaching again must not double-count
            return
        for name, module, kind in self.layers:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            if kind.family == "batchnorm":
                self._handles.append(module.register_forward_pre_hook(self._bn_hook(name)))
        self._handles.append(self.model.register_forward_pre_hook(self._enter_keeper))
        self._handles.append(self.model.register_forward_hook(self._exit_keeper, always_call=True))

    def _enter_keeper(self, module, _inputs) -> None:
        if self._recording(module):
            if self._keeping == 0:
                self._written = _WRITTEN_IN_PLACE.get(self.model, set())
                self._watching = self.model not in _WRITTEN_IN_PLACE
                if self._watching:
                    self._keeper.__enter__()
            self._keeping += 1

    def _exit_keeper(self, _module, _inputs, _out) -> None:
        if self._keeping:
            self._keeping -= 1
            if self._keeping == 0 and self._watching:
                self._keeper.__exit__(None, None, None)
                written = _WRITTEN_IN_PLACE.setdefault(self.model, set())
                labels = {id(self._outputs): "outputs", id(self._batchnorm_inputs): "batchnorm"}
                written.update((labels[id(store)], key) for store, key in self._keeper.copied)

    def _keep(self, store: dict, label: str, name: str, tensor: Tensor) -> None:
        """Keep ``tensor`` in ``store``: copied now where the model is known to write it in
        place, else watched (or not needed)."""
        copy = not self._watching and (label, name) in self._written
        self._keeper.keep(store, name, tensor, copy=copy, watch=self._watching)

    def detach(self) -> None:
        """Remove every hook; an armed recording is dropped."""
        self._remove_hooks()
        self._clear()

    def _clear(self) -> None:
        self._outputs, self._grads, self._params = {}, {}, {}
        self._before = stats.ParamCopies([], None)
        self._batchnorm, self._batchnorm_inputs = {}, {}
        self._keeper.forget()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False

    @property
    def armed(self) -> bool:
        """A recording is under way: armed, not yet collected."""
        return self._armed

    def _recording(self, module: nn.Module) -> bool:
        return self._armed and module.training

    def _forward_hook(self, name: str):
        def hook(module, _inputs, out):
            if not self._recording(module) or name in self._outputs:
                return
            out = out if type(out) is Tensor else first_tensor(out)
            if out is None:
                return
            self._keep(self._outputs, "outputs", name, out.detach())  # measured in collect()
            if out.requires_grad:
                self._awaits_backward = True
                # on the tensor, not on the node that made it: autograd.grad with respect to the
                # output itself runs the tensor's hooks, not that node's
                out.register_hook(keep_grad)

        def keep_grad(grad: Tensor | None) -> None:
            # None: an output of a node of several, which the loss does not depend on
            if grad is not None and name not in self._grads:  # no mode runs in the backward pass
                self._keeper.keep(self._grads, name, grad.detach(), watch=False)

        return hook

    def _bn_hook(self, name: str):
        def hook(module, inputs):
            # its input on its first call, where arm() copied its running statistics
            recorded = self._recording(module) and name in self._batchnorm
            if not recorded or name in self._batchnorm_inputs:
                return
            x = inputs[0].detach()
            if getattr(module, "channels_last", False):  # (N, *, C) → (N, C, *)
                x = x.movedim(-1, 1)
            self._keep(self._batchnorm_inputs, "batchnorm", name, x)  # measured in collect()

        return hook

    # -- one recording
    def arm(self, state: dict[str, Tensor] | None = None) -> None:
        """Record the next training-mode forward and backward pass and the optimizer step.

        ``state``: the model's parameters and buffers by name, where a traced step runs the
        model on tensors of its own (``torch.func.functional_call``'s), which the recording
        then copies and measures in their place."""
        self._attach()
        self._clear()
        named = self.model.named_parameters()
        self._params = {n: p if state is None else state[n] for n, p in named}
        self._batchnorm = running_statistics(self._batchnorms, state)
        self._before = stats.copy_params(list(self._params.values()))
        self._armed, self._awaits_backward = True, False

    def learn_writes(self, state: dict[str, Tensor], forward: Callable[[], object]) -> None:
        """Learn what the model's forward pass writes in place (``written_in_place``) from one
        training-mode pass, ``forward()``, that runs the model on ``state`` (its parameters
        and buffers by name, as ``arm``'s; copies, which the pass may move), watched as a
        first recording watches it; nothing is recorded."""
        self.arm(state)
        try:
            forward()
        finally:
            self.detach()
        _WRITTEN_IN_PLACE.setdefault(self.model, set())  # known, even where nothing is

    @property
    def written_in_place(self) -> frozenset | None:
        """What its model's forward pass writes in place of the outputs it keeps, as a recording
        watched it; None before one has. A traced recording needs it known: it copies those
        outputs at their hooks and watches nothing."""
        written = _WRITTEN_IN_PLACE.get(self.model)
        return None if written is None else frozenset(written)

    def collect(self, step: int, loss: float | None = None, eval_loss: float | None = None):
        """Finish the armed recording (after ``optimizer.step()``) and return its Snapshot:
        ``measure()``, then ``take()``."""
        with gc_paused():  # its containers are freed by reference counting (nogc)
            return self.take(self.measure(), step, loss, eval_loss)

    def measure(self, grads: list[Tensor | None] | None = None) -> "Measured":
        """Detach the hooks and measure what the armed recording captured, on the device, in
        one tensor; ``grads`` are the parameters' gradients, one per parameter in the model's
        order (None: each one's ``.grad``). Traceable where the statistics' operators apply:
        a traced step returns ``Measured.values`` from its graph (``normlab.lm.compiled``)."""
        if not self._armed:
            raise RuntimeError("Diagnostics.collect() without arm()")
        self._remove_hooks()  # hooks cost time on every call: they stay only for a recording
        if self._awaits_backward and not self._grads:
            raise RuntimeError(
                "Diagnostics.collect(): the armed step ran a forward pass but no backward pass; "
                "call loss.backward() (and the optimizer's step) between arm() and collect()"
            )
        self._drop_overwritten()
        kinds = {name: kind for name, _, kind in self.layers}
        params = list(self._params.values())  # in the order of arm()'s copies
        if grads is None:
            grads = [p.grad for p in params]
        measured = (
            ("out", self._outputs, lambda ns, ts: stats.output_stats([kinds[n] for n in ns], ts)),
            ("grad", self._grads, lambda _, ts: stats.spread_stats(ts)),
            (
                "bn",
                self._batchnorm_inputs,
                lambda ns, xs: stats.batchnorm_stats(xs, [self._batchnorm[n] for n in ns]),
            ),
            ("param", self._params, lambda _, ps: stats.param_stats(self._before, ps, grads)),
        )
        groups = [
            (what, list(named), measure(list(named), list(named.values())))
            for what, named, measure in measured
            if named
        ]
        form = Form(
            stats.layout(groups),
            # dead units: each over batch × positions draws
            {n: out.shape[0] * stats.units(out)[1] for n, out in self._outputs.items()},
            {n: list(p.shape) for n, p in self._params.items()},
        )
        values = stats.flatten(groups)
        self._clear()
        return Measured(values, form)

    def take(
        self,
        measured: "Measured",
        step: int,
        loss: float | None = None,
        eval_loss: float | None = None,
    ) -> Snapshot:
        """The Snapshot of a recording's statistics (``measure``), added to ``history``."""
        with gc_paused():
            snapshot = self._snapshot(measured, step, loss, eval_loss)
            self.extend([snapshot])
        return snapshot

    def _drop_overwritten(self) -> None:
        """Drop what was written in place outside the model's forward pass, where no hook saw
        it (user code between the forward pass and ``collect()``): never measure it wrongly."""
        stores = (self._outputs, self._grads, self._batchnorm_inputs)
        overwritten = sorted({k for store in stores for k in self._keeper.overwritten(store)})
        for store in stores:
            for key in overwritten:
                store.pop(key, None)
        if overwritten:
            where = "after the model's forward pass"
            if not self._watching:  # or in it, unwatched: copied at the hook from now on
                where = "in a forward pass that was not watched, or " + where
                known = _WRITTEN_IN_PLACE.setdefault(self.model, set())
                known.update(
                    (label, key) for label in ("outputs", "batchnorm") for key in overwritten
                )
            warnings.warn(
                f"Diagnostics: not recorded, as written in place {where}: {', '.join(overwritten)}",
                RuntimeWarning,
                stacklevel=4,  # the caller of collect()
            )
        self.overwritten = overwritten

    def extend(self, snapshots: list[Snapshot]) -> None:
        """Add recordings (a new one, or a run's saved ones) to ``history`` and
        ``update_history``; ``history`` then keeps the first and the last ``keep``."""
        for snapshot in snapshots:
            for name, points in update_history([snapshot]).items():
                self.update_history.setdefault(name, []).extend(points)
            self.history.append(snapshot)
            if len(self.history) > self.keep + 1:
                del self.history[1]

    def _snapshot(self, measured: "Measured", step: int, loss, eval_loss) -> Snapshot:
        """The Snapshot of a recording's statistics, brought to the host in one transfer
        (``stats.host_rows``), layers in the model's module order."""
        form = measured.form
        host = stats.host_rows(form.layout, measured.values)
        layers, batchnorms = [], []
        none = stats.HostRows({}, {})
        out, grad, bn = (host.get(what, none) for what in ("out", "grad", "bn"))
        for name, _, kind in self.layers:
            i = out.index.get(name)
            if i is not None:
                layer = _layer_stats(name, kind, out.columns, i, grad.columns, grad.index.get(name))
                layer.samples = form.samples[name]
                layers.append(layer)
            i = bn.index.get(name)
            if i is not None:
                drift, ratio, seen = (
                    bn.columns[c][i] for c in ("mean_drift", "var_ratio", "time_constants")
                )
                batchnorms.append(BatchNormStats(name, drift, ratio, seen))
        param = host.get("param", none)
        params = [
            _param_stats(name, shape, param.columns, param.index[name])
            for name, shape in form.param_shapes.items()
        ]
        return Snapshot(step, loss, eval_loss, layers, params, batchnorms)


class Form(NamedTuple):
    """What a recording's statistics in one tensor hold, fixed by the model's layers and their
    shapes: the columns' layout, and what the snapshot reads besides them."""

    layout: stats.Layout
    samples: dict[str, int]  # per recorded layer: the draws per unit that ``dead`` is over
    param_shapes: dict[str, list[int]]  # per parameter, in the model's order


class Measured(NamedTuple):
    """One recording's statistics (``Diagnostics.measure``), on the device."""

    values: Tensor  # stats.flatten's: every column in one tensor
    form: Form


def running_statistics(
    batchnorms: list[tuple[str, nn.Module]], state: dict[str, Tensor] | None = None
) -> dict[str, BatchNormCapture]:
    """The running statistics of each BatchNorm of ``(name, module)`` that tracks them, as they
    are now: views of one copy of all of them (one call, where a copy each costs a few
    microseconds a layer), in their widest dtype; on a model across devices, a copy each. A
    frozen BatchNorm has running statistics but does not track them; a lazy one has none before
    its first batch. One without a count of its batches has NaN time constants. ``state``: the
    buffers by their names in the model, in place of the modules' own (``Diagnostics.arm``)."""
    tracked, running, counts = [], [], []
    for name, m in batchnorms:
        mean, var, count = (_buffer(m, b, state, name) for b in _RUNNING)
        if (
            mean is not None
            and var is not None
            and getattr(m, "track_running_stats", False)
            and not is_lazy(mean)
        ):
            tracked.append((name, m))
            running += (mean, var)
            if count is None:
                count = torch.tensor(math.nan, device=mean.device)
            counts.append(count)
    if not tracked:
        return {}
    if len({t.device for t in running}) == 1 and len({t.dtype for t in counts}) == 1:
        flat = [t if t.dim() == 1 else t.reshape(-1) for t in running]
        parts = torch.cat(flat).split([t.numel() for t in flat])  # (C,) each: mean, var, ...
        values = [
            v if t.dim() == 1 else v.view(t.shape) for v, t in zip(parts, running, strict=True)
        ]
        batches = torch.stack(counts).unbind()
    else:  # across devices, or some without a count: a copy each
        values, batches = [t.clone() for t in running], [t.clone() for t in counts]
    return {
        name: BatchNormCapture(values[2 * i], values[2 * i + 1], m.eps, m.momentum, batches[i])
        for i, (name, m) in enumerate(tracked)
    }


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _buffer(
    module: nn.Module, name: str, state: dict[str, Tensor] | None = None, prefix: str = ""
) -> Tensor | None:
    """``module.name`` or None, read from its buffers first (``nn.Module.__getattr__`` costs
    a microsecond); a buffer from ``state``, by its name in the model (``prefix.name``), where
    ``state`` holds it."""
    buffers = module._buffers
    if name in buffers:
        if state is not None:
            return state.get(f"{prefix}.{name}" if prefix else name, buffers[name])
        return buffers[name]
    return getattr(module, name, None)


# layers that only pass values on, drop them or reshape them: nothing to report of their own
PASS_THROUGH = (
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.Unflatten,
    FlattenContext,
    FlattenConsecutive,
)


def _is_leaf_with_output(module: nn.Module) -> bool:
    """A layer of its own (no children) that computes something: what goes unrecorded."""
    return not any(m is not None for m in module._modules.values()) and not isinstance(
        module, PASS_THROUGH
    )


def _layer_stats(name: str, kind: Kind, out: dict, i: int, grad: dict, j: int | None) -> LayerStats:
    """The layer's row ``i`` of the outputs' columns, and row ``j`` of the gradients' (None:
    its output had no gradient)."""
    layer = LayerStats(
        name=name,
        kind=kind.name,
        family=kind.family,
        mean=out["mean"][i],
        std=out["std"][i],
        percentiles={c: out[c][i] for c in stats.PERCENTILE_COLUMNS},
        saturated=out["saturated"][i] if kind.family == "saturating" else None,
        dead=out["dead"][i] if kind.family == "rectifying" else None,
        hist_range=out["hist_range"][i],
        hist=out["hist"][i],
    )
    if j is not None:
        layer.grad_mean, layer.grad_std = grad["mean"][j], grad["std"][j]
        layer.grad_hist_range, layer.grad_hist = grad["range"][j], grad["hist"][j]
    return layer


def _param_stats(name: str, shape: list[int], columns: dict, i: int) -> ParamStats:
    """The parameter's row ``i`` of the parameters' columns."""
    data_std = _none_if_nan(columns["data_std"][i])
    update_std = _none_if_nan(columns["update_std"][i])
    grad_std = _none_if_nan(columns["grad_std"][i])
    # a constant tensor (a fresh BatchNorm gain) has no spread to compare with
    spread = data_std is not None and data_std > 1e-6
    return ParamStats(
        name=name,
        shape=shape,
        data_std=data_std or 0.0,
        grad_std=grad_std,
        grad_to_data=grad_std / data_std if spread and grad_std is not None else None,
        update_to_data=update_std / data_std if spread and update_std is not None else None,
        grad_hist_range=_none_if_nan(columns["grad_range"][i]),
        grad_hist=columns["grad_hist"][i] if grad_std is not None else None,
    )


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x
