"""What feeds what in any model, from one actual forward pass; and how a batch calls a model.

``torch.fx`` reads the code of ``forward`` and fails on much of what users bring
(control flow on values, shape arithmetic, weights passed to functions). This
records a real forward pass instead, at the level of the layers that have a kind
(``normlab.nn.layer_kind``): hooks say when each layer call starts and ends and
which tensor it returned, and a ``TorchDispatchMode`` sees every operation that
reads a tensor. A layer's output *feeds* the outermost layer call, started after
the output was made, that is running when an operation reads it; a read outside
every such call is a functional use (a residual addition, a reshape, a
concatenation), named by its operation. ``nn.Identity`` and dropout in eval mode
return their input itself, so they are transparent.

Fold, LSUV and calibration all ask this one record what feeds what and in which
order layers run.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from normlab.nn import layer_kind

Batch = Tensor | tuple | list | dict


def call_model(model: nn.Module, batch: Batch):
    """``model(batch)`` for a tensor, ``model(*batch)`` for a tuple or list, ``model(**batch)``
    for a dict."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def batch_loss(model: nn.Module, batch: Batch, loss_fn: Callable | None = None) -> Tensor:
    """The loss of ``model`` on ``batch`` (called as ``call_model`` calls it):
    ``loss_fn(output, batch)``; else the model's own (a 0-dim ``loss`` in its output, as
    transformers' models return given labels); else, for a model that returns only outputs,
    the mean square of its first output tensor, which runs every layer's backward pass as a
    loss would.

    >>> batch_loss(nn.Identity(), torch.full((2, 3), 2.0))
    tensor(4.)
    """
    output = call_model(model, batch)
    if loss_fn is not None:
        return loss_fn(output, batch)
    own = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if torch.is_tensor(own) and own.dim() == 0:
        return own
    first = first_tensor(output)
    if first is None:
        raise ValueError("the model returned no tensor; give a loss_fn(output, batch)")
    return first.float().square().mean()


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """``batch`` (a tensor, or a tuple, list or dict of them) in pieces of ``size`` rows; what
    is not a tensor goes to every piece as it is."""
    if torch.is_tensor(batch):
        return list(batch.split(size))
    n = -(-batch_rows(batch) // size)
    if isinstance(batch, dict):
        parts = {
            k: split_batch(v, size) if torch.is_tensor(v) else [v] * n for k, v in batch.items()
        }
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    parts = [split_batch(v, size) if torch.is_tensor(v) else [v] * n for v in batch]
    return [type(batch)(p[i] for p in parts) for i in range(n)]


def batch_rows(batch: Batch) -> int:
    """The batch's size: its first tensor's first dimension."""
    if torch.is_tensor(batch):
        return len(batch)
    values = batch.values() if isinstance(batch, dict) else batch
    return len(next(v for v in values if torch.is_tensor(v)))


class StopForward(Exception):
    """Raised from a hook to end a forward pass early, once what it measures has been seen."""


def forward_until_stopped(forward_fn: Callable, model: nn.Module, batch: Batch) -> None:
    """``forward_fn(model, batch)``, ended without an error where a hook raises ``StopForward``."""
    with contextlib.suppress(StopForward):
        forward_fn(model, batch)


def first_tensor(out) -> Tensor | None:
    """A layer's output as a tensor: itself, or the first tensor of a tuple, list, dict or
    dataclass (transformers' outputs are dicts and dataclasses).

    >>> first_tensor((None, torch.ones(2))).shape
    torch.Size([2])
    """
    if torch.is_tensor(out):
        return out
    if hasattr(out, "__dataclass_fields__") and not isinstance(out, type):
        out = [getattr(out, name) for name in out.__dataclass_fields__]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple | list) else ()
    return next((v for v in values if torch.is_tensor(v)), None)


@dataclass
class Dataflow:
    """One forward pass, seen at its layers (the modules with a kind).

    ``order`` lists the layers by the start of their first call (a layer's start, not its
    end: a norm-plus-activation layer ends after the activation inside it). ``feeds[name]``
    lists what the layer's output went to, in the order first read: other layers' names, or
    ``"aten.<op>"`` for a functional use. ``fed_by[name]`` is the layer whose output object
    was this layer's first tensor argument, if any. ``uncalled`` lists the layers that never
    ran (a weight passed to a function, a layer skipped by LayerDrop).
    """

    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    feeds: dict[str, list[str]] = field(default_factory=dict)
    fed_by: dict[str, str | None] = field(default_factory=dict)
    uncalled: list[str] = field(default_factory=list)

    def why_not_alone(self, producer: str, consumer: str) -> str | None:
        """Why the pair does not compute ``consumer(producer(x))`` with nothing else seeing
        the middle, or None where it does: ``producer``'s output goes to ``consumer`` alone
        and is its input, each called once."""
        for name in (producer, consumer):
            if self.calls.get(name, 0) != 1:
                return f"{name} is called {self.calls.get(name, 0)} times"
        others = [r for r in self.feeds.get(producer, []) if r != consumer]
        if others:
            return f"{producer}'s output also goes to {', '.join(others)}"
        if self.fed_by.get(consumer) != producer:
            return f"{consumer}'s input is not {producer}'s output"
        return None


class _Reads(TorchDispatchMode):
    """Calls ``on_read(tensor, op)`` for every tensor argument of every operation."""

    def __init__(self, on_read: Callable[[Tensor, str], None]) -> None:
        super().__init__()
        self.on_read = on_read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in tree_leaves((args, kwargs)):
            if isinstance(arg, Tensor):
                self.on_read(arg, func.overloadpacket.__name__)
        return func(*args, **kwargs)


@torch.no_grad()
def trace_dataflow(
    model: nn.Module,
    batch: Batch,
    forward_fn: Callable[[nn.Module, Batch], object] = call_model,
    is_layer: Callable[[nn.Module], bool] = lambda m: layer_kind(m) is not None,
) -> Dataflow:
    """Run ``forward_fn(model, batch)`` once (in the model's current mode, without gradients)
    and return its :class:`Dataflow` over the modules ``is_layer`` picks.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
        ...                             torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> flow = trace_dataflow(model.eval(), torch.randn(2, 3, 6, 6))
        >>> flow.order, flow.feeds["0"], flow.feeds["2"]
        (['0', '1', '2', '4'], ['1'], ['aten.view'])
    """
    names = {m: n for n, m in model.named_modules() if is_layer(m)}
    flow = Dataflow()
    open_calls: list[tuple[str, int]] = []  # (layer, its start), outermost first
    made: dict[int, tuple[str, int, Tensor]] = {}  # id(output) → (layer, when made, the output)
    clock = [0]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def before(module, args, kwargs):
        name = names[module]
        if name not in flow.calls:
            flow.order.append(name)
            first = first_tensor(list(args) + list(kwargs.values()))
            producer = made.get(id(first)) if first is not None else None
            flow.fed_by[name] = producer[0] if producer is not None else None
        flow.calls[name] = flow.calls.get(name, 0) + 1
        open_calls.append((name, tick()))

    def after(module, _args, _kwargs, out):
        name = names[module]
        while open_calls and open_calls[-1][0] != name:  # a call that raised inside this one
            open_calls.pop()
        if open_calls:
            open_calls.pop()
        out = first_tensor(out)
        if out is not None:
            made[id(out)] = (name, tick(), out)  # holding ``out`` keeps its id unique

    def on_read(tensor: Tensor, op: str):
        entry = made.get(id(tensor))
        if entry is None:
            return
        producer, when, _ = entry
        reader = next((n for n, start in open_calls if start > when), f"aten.{op}")
        readers = flow.feeds.setdefault(producer, [])
        if reader not in readers:
            readers.append(reader)

    hooks = []
    for module in names:
        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    try:
        with _Reads(on_read):
            forward_fn(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    flow.uncalled = [n for n in names.values() if n not in flow.calls]
    return flow
