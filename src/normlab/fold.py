r"""Folding BatchNorms into the Linear or convolution beside them, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map,
:math:`\hat{x} = s x + t` with :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}` and
:math:`t = \beta - \mu s`, so it can join the layer before it (any Linear or
Conv1d/2d/3d, any stride, padding, dilation and groups: exact) or the layer
after it (exact for a Linear, and for a convolution that pads with copies of its
input or not at all; zero padding would not see the shift ``t``, so such a pair
is left alone).

The pairs come from what feeds what in an actual forward pass on an example batch
(``normlab.dataflow``), so any model folds, whatever its ``forward`` does, and the
copy keeps its class, its ``forward`` and its attribute names: a folded BatchNorm
becomes ``nn.Identity`` (or, for a BatchNorm with an activation fused in, such as
timm's ``BatchNormAct2d``, what it runs after its normalization).
"""

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from normlab import nn as nl
from normlab.dataflow import Batch, Dataflow, call_model, trace_dataflow
from normlab.errors import first_line
from normlab.nn import BatchNormForm, batchnorm_form, is_batchnorm
from normlab.nn.batchnorm import running_affine

LINEARS = (nn.Linear, nl.Linear)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
logger = logging.getLogger(__name__)


def _channels_last(bn: nn.Module) -> bool:
    return getattr(bn, "channels_last", False)


def _why_not(layer: nn.Module, bn: nn.Module, bn_first: bool) -> str | None:
    """Why ``bn`` cannot fold into ``layer`` (before it, or after it with ``bn_first``), or None."""
    if bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False)"
    channels = bn.running_mean.numel()
    if isinstance(layer, LINEARS):
        features = layer.in_features if bn_first else layer.out_features
        if channels != features:
            return f"its {channels} channels are not the Linear's {features} features"
        return None
    if isinstance(layer, CONVS):
        expected = layer.in_channels if bn_first else layer.out_channels
        if _channels_last(bn) or channels != expected:
            return f"its channels are not the convolution's {expected} channels"
        if bn_first and layer.padding_mode == "zeros" and any(p != 0 for p in _padding(layer)):
            return "it pads with zeros, which the BatchNorm's shift would not reach"
        return None
    return "not a Linear or a convolution"


def _padding(conv: nn.Module) -> tuple:
    if isinstance(conv.padding, str):  # "same" pads (unless the kernel is 1), "valid" does not
        return (0,) if conv.padding == "valid" else tuple(k - 1 for k in conv.kernel_size)
    return conv.padding


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module, bn_first: bool) -> nn.Module:
    """A copy of ``layer`` that computes ``layer(bn(x))`` (``bn_first``) or ``bn(layer(x))``."""
    s, t = running_affine(bn)
    W = layer.weight  # (out, in / groups, *kernel)
    b = layer.bias if layer.bias is not None else W.new_zeros(W.shape[0])
    new = copy.deepcopy(layer)
    kernel = [1] * (W.dim() - 2)
    if not bn_first:  # each output channel scaled and shifted
        new.weight = nn.Parameter(W * s.view(-1, 1, *kernel))
        new.bias = nn.Parameter(b * s + t)
        return new
    groups = getattr(layer, "groups", 1)
    out, per_group = W.shape[0], W.shape[1]
    # the input channel that weight[o, j] reads: group (o // (out / groups)), then its j-th
    s_in = s.view(groups, per_group).repeat_interleave(out // groups, dim=0)  # (out, in / g)
    t_in = t.view(groups, per_group).repeat_interleave(out // groups, dim=0)
    new.weight = nn.Parameter(W * s_in.view(out, per_group, *kernel))
    new.bias = nn.Parameter(b + (W * t_in.view(out, per_group, *kernel)).flatten(1).sum(1))
    return new


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _choose(model: nn.Module, bn: nn.Module, candidates: list[tuple[str, bool]]):
    """The first (name, bn_first) of ``candidates`` that ``bn`` folds into, and else every
    reason why not."""
    reasons = []
    for name, bn_first in candidates:
        reason = _why_not(model.get_submodule(name), bn, bn_first)
        if reason is None:
            return (name, bn_first), ""
        reasons.append(f"{name} {'after' if bn_first else 'before'} it: {reason}")
    return None, "; ".join(reasons)


def _neighbours_in_sequentials(model: nn.Module, name: str, form: BatchNormForm, no_flow: str):
    """``(before, after)`` names of the BatchNorm ``name`` in a plain ``nn.Sequential``, which
    runs its children one into the next (a subclass may not), or why there are none
    (``no_flow``: why no forward pass could find them)."""
    parent_name, _, key = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if type(parent) is not nn.Sequential:
        return [], f"not in a Sequential; {no_flow}"
    keys = list(parent._modules)
    i = keys.index(key)
    found = []
    if i > 0:
        found.append((_qualified(parent_name, keys[i - 1]), False))
    if i + 1 < len(keys) and form.affine:
        found.append((_qualified(parent_name, keys[i + 1]), True))
    return found, "" if found else "no layer beside it in its Sequential"


def _qualified(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _neighbours_in_flow(flow: Dataflow, name: str, form: BatchNormForm):
    """``(before, after)`` names of the BatchNorm ``name`` from the forward pass: the layer whose
    output only it reads, and (for a BatchNorm whose output is its affine map alone) the layer
    that alone reads its output; or why there are none."""
    if name in flow.uncalled:
        return [], "the forward pass on the example does not call it"
    found, reasons = [], []
    producer = flow.fed_by.get(name)
    if producer is None:
        reasons.append("its input is not a layer's output")
    elif (why := flow.why_not_alone(producer, name)) is None:
        found.append((producer, False))
    else:
        reasons.append(why)
    readers = flow.feeds.get(name, [])
    if not form.affine:
        reasons.append("it runs an activation after its normalization")
    elif len(readers) == 1 and (why := flow.why_not_alone(name, readers[0])) is None:
        found.append((readers[0], True))
    elif len(readers) == 1:
        reasons.append(why)
    elif readers:
        reasons.append(f"its output goes to {', '.join(readers)}")
    return found, "; ".join(reasons)


def _fold_into_tree(
    model: nn.Module,
    flow: Dataflow | None,
    say: Callable[[str], None],
    no_flow: str = "give an example batch to find its neighbours",
) -> None:
    """Fold every BatchNorm of ``model`` that can be folded, in place, in the order the forward
    pass runs them (``flow``; without one, ``no_flow`` says why); one line each through ``say``."""
    batchnorms = [n for n, m in model.named_modules() if is_batchnorm(m)]
    if flow is not None:  # forward order: a layer folded into is already what it computes now
        rank = {n: i for i, n in enumerate(flow.order)}
        batchnorms.sort(key=lambda n: rank.get(n, len(rank)))
    for name in batchnorms:
        bn = model.get_submodule(name)
        label = f"{name} ({type(bn).__name__})"
        form = batchnorm_form(bn)
        if form is None:
            say(
                f"left {label}: normlab does not know what its forward computes "
                "(declare it with normlab.nn.register_batchnorm)"
            )
            continue
        if bn.running_mean is None:
            say(f"left {label}: it has no running statistics (track_running_stats=False)")
            continue
        if flow is None:
            found, why = _neighbours_in_sequentials(model, name, form, no_flow)
        else:
            found, why = _neighbours_in_flow(flow, name, form)
        target, reasons = _choose(model, bn, found)
        if target is None:
            say(f"left {label}: {'; '.join(r for r in (why, reasons) if r)}")
            continue
        into, bn_first = target
        _set_module(model, into, _folded(model.get_submodule(into), bn, bn_first))
        _set_module(model, name, form.after(bn) if form.after is not None else nn.Identity())
        say(f"folded {label} into {into}")


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module,
    example: Batch | None = None,
    log: Callable[[str], None] | None = None,
    strict: bool = False,
    forward_fn: Callable[[nn.Module, Batch], object] = call_model,
) -> nn.Module:
    r"""Return an eval-mode copy of ``model`` with each foldable BatchNorm folded into its
    neighbour; ``model`` itself is not changed.

    With the BatchNorm's eval-mode map :math:`x \mapsto s x + t` (see the module
    docstring), a layer :math:`y = W x + b` before it becomes

    .. math::
        W' = s W, \qquad b' = s b + t

    (per output channel, as ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and
    ``fuse_linear_bn_eval``), and a layer after it becomes :math:`W' = W s`
    (per input channel), :math:`b' = b + W t`. A BatchNorm folds into the layer
    before it where it can, else into the one after it.

    The pairs come from one eval-mode forward pass on ``example``
    (``normlab.dataflow``): a BatchNorm folds into the layer whose output it alone
    reads, or into the layer that alone reads its output, each called once. Without
    an example, only neighbours in a plain ``nn.Sequential`` are paired. The copy
    keeps the model's class and attribute names: a folded BatchNorm becomes
    ``nn.Identity``, or what a norm-plus-activation layer runs after its
    normalization (``normlab.nn.batchnorm_form``). A BatchNorm-like class whose
    forward normlab does not know is left alone, and said so.

    A Linear and a BatchNorm1d are folded as if the BatchNorm's channels were the Linear's
    features: true on (N, C) input, and for a ``channels_last`` BatchNorm on (N, *, C). A
    channels-first BatchNorm1d after a Linear on (N, L, features) normalizes over L instead
    (it runs only where L equals its ``num_features``); nothing in the modules says which
    input they get, so check such a pair on an input, as the example does.

    Args:
        model: any module with BatchNorms next to Linear or Conv1d/2d/3d layers.
        example: a batch as ``model`` takes it (a tensor, tuple, list or dict; see
            ``normlab.dataflow.call_model``), run once to see what feeds what.
        log: called with one line per BatchNorm: what it was folded into, or why
            it was left (default: the ``normlab.fold`` logger, at INFO).
        strict: raise ``ValueError`` naming the first BatchNorm left, and why.
        forward_fn: ``forward_fn(model, example)`` runs the example, for models called
            some other way.

    Example:
        >>> from normlab.nn import BatchNorm2d
        >>> conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchNorm2d(8)).eval()
        >>> X = torch.randn(2, 3, 8, 8)
        >>> folded = fold_batchnorm(conv, X, log=print)
        folded 1 (BatchNorm2d) into 0
        >>> torch.allclose(folded(X), conv(X), atol=1e-6)
        True
    """
    lines: list[str] = []
    folded = copy.deepcopy(model).eval()
    flow, no_flow = None, "give an example batch to find its neighbours"
    if example is not None and any(is_batchnorm(m) for m in folded.modules()):
        try:
            flow = trace_dataflow(folded, example, forward_fn)
        except Exception as e:
            reason = f"{type(e).__name__}: {first_line(e, 120)}"
            lines.append(f"the forward pass on the example failed ({reason}); pairs in Sequentials")
            no_flow = "its neighbours could not be checked, as the forward pass failed"
    _fold_into_tree(folded, flow, lines.append, no_flow)
    for line in lines:
        (log if log is not None else logger.info)(line)
    left = [line for line in lines if line.startswith("left ")]
    if strict and left:
        raise ValueError(f"fold_batchnorm {left[0]}")
    return folded
