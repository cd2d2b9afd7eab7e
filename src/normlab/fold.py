r"""Folding BatchNorms into the Linear or convolution beside them, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map,
:math:`\hat{x} = s x + t` with :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}` and
:math:`t = \beta - \mu s`, so it can join the layer before it (any Linear or
Conv1d/2d/3d, any stride, padding, dilation and groups: exact) or the layer
after it (exact for a Linear, and for a convolution that pads with copies of its
input or not at all; zero padding would not see the shift ``t``, so such a pair
is left alone).
"""

import copy
import inspect
import logging
from collections.abc import Callable

import torch
from torch import fx, nn

from normlab import nn as nl
from normlab.calibrate import BATCHNORM_TYPES
from normlab.errors import first_line
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
    if isinstance(layer, LINEARS):
        features = layer.in_features if bn_first else layer.out_features
        if bn.num_features != features:
            return f"its {bn.num_features} channels are not the Linear's {features} features"
        return None
    if isinstance(layer, CONVS):
        channels = layer.in_channels if bn_first else layer.out_channels
        if _channels_last(bn) or bn.num_features != channels:
            return f"its channels are not the convolution's {channels} channels"
        if bn_first and layer.padding_mode == "zeros" and any(p != 0 for p in _padding(layer)):
            return "the convolution after it pads with zeros, which its shift would not reach"
        return None
    return f"{type(layer).__name__} is neither a Linear nor a convolution"


def _padding(conv: nn.Module) -> tuple:
    if isinstance(conv.padding, str):  # "same" pads (unless the kernel is 1), "valid" does not
        return (0,) if conv.padding == "valid" else tuple(k - 1 for k in conv.kernel_size)
    return conv.padding


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module, bn_first: bool) -> nn.Module:
    """A copy of ``layer`` that computes ``layer(bn(x))`` (``bn_first``) or ``bn(layer(x))``."""
    s, t = running_affine(bn)
    W = layer.weight  # (out, in / groups, *kernel)
    b = layer.bias if layer.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
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


def _qualified(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fold_sequentials(model: nn.Module, say: Callable[[str], None]) -> int:
    """Fold consecutive (layer, BatchNorm) and (BatchNorm, layer) children of Sequentials."""
    folded = 0
    for prefix, container in list(model.named_modules()):
        if not isinstance(container, nn.Sequential):
            continue
        keys = list(container._modules)
        for i, key in enumerate(keys):
            bn = container._modules[key]
            if not isinstance(bn, BATCHNORM_TYPES):
                continue
            before = container._modules[keys[i - 1]] if i > 0 else None
            after = container._modules[keys[i + 1]] if i + 1 < len(keys) else None
            neighbours = [(before, False), (after, True)]
            target, reasons = _choose(bn, [(n, first) for n, first in neighbours if n is not None])
            if target is None:
                say(f"left {_qualified(prefix, key)} ({type(bn).__name__}): {reasons}")
                continue
            layer, bn_first = target
            other = keys[i + (1 if bn_first else -1)]
            container._modules[other] = _folded(layer, bn, bn_first)
            container._modules[key] = nn.Identity()
            folded_name, into = _qualified(prefix, key), _qualified(prefix, other)
            say(f"folded {folded_name} ({type(bn).__name__}) into {into}")
            folded += 1
    return folded


def _choose(bn: nn.Module, candidates: list[tuple[nn.Module, bool]]):
    """The first (layer, bn_first) that ``bn`` folds into, and else every reason why not."""
    reasons = []
    for layer, bn_first in candidates:
        reason = _why_not(layer, bn, bn_first)
        if reason is None:
            return (layer, bn_first), ""
        reasons.append(f"{'the layer after' if bn_first else 'the layer before'}: {reason}")
    return None, "; ".join(reasons) or "no Linear or convolution next to it"


def _fold_graph(gm: fx.GraphModule, say: Callable[[str], None]) -> int:
    """Fold BatchNorms into the module that alone feeds them, or that alone they feed."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], BATCHNORM_TYPES):
            continue
        bn = modules[node.target]
        candidates, reasons = [], []
        producer, users = node.args[0], list(node.users)
        for other, bn_first in ((producer, False), (users[0] if len(users) == 1 else None, True)):
            if not (isinstance(other, fx.Node) and other.op == "call_module"):
                continue
            alone = (len(other.users) == 1) if not bn_first else other.args[0] is node
            if calls[other.target] > 1 or not alone:
                reasons.append(f"{other.target} is used elsewhere too")
                continue
            candidates.append((other, bn_first))
        target, why = _choose(bn, [(modules[n.target], first) for n, first in candidates])
        if target is None:
            say(f"left {node.target} ({type(bn).__name__}): {'; '.join([*reasons, why])}")
            continue
        layer, bn_first = target
        name = next(n.target for n, _ in candidates if modules[n.target] is layer)
        modules[name] = _folded(layer, bn, bn_first)  # a later BatchNorm may fold into it too
        _set_module(gm, name, modules[name])
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        say(f"folded {node.target} ({type(bn).__name__}) into {name}")
        folded += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, log: Callable[[str], None] | None = None, strict: bool = False
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

    The pairs are found with ``torch.fx`` where the model traces (a
    ``GraphModule`` is returned, the BatchNorms gone from it; arguments of
    ``forward`` that default to None are traced as left out); otherwise in
    ``nn.Sequential`` containers, whose BatchNorms become ``nn.Identity``. A
    layer that something else uses too is not folded into. A model without
    BatchNorms comes back as an eval-mode copy.

    A Linear and a BatchNorm1d are folded as if the BatchNorm's channels were the Linear's
    features: true on (N, C) input, and for a ``channels_last`` BatchNorm on (N, *, C). A
    channels-first BatchNorm1d after a Linear on (N, L, features) normalizes over L instead
    (it runs only where L equals its ``num_features``); nothing in the modules says which
    input they get, so check such a pair on an input, as the example does.

    Args:
        model: any module with BatchNorms (normlab's or torch's) next to Linear or
            Conv1d/2d/3d layers.
        log: called with one line per BatchNorm: what it was folded into, or why
            it was left (default: the ``normlab.fold`` logger, at INFO).
        strict: raise ``ValueError`` naming the first BatchNorm left, and why.

    Example:
        >>> from normlab.nn import BatchNorm2d
        >>> conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchNorm2d(8)).eval()
        >>> folded = fold_batchnorm(conv, log=print)
        folded 1 (BatchNorm2d) into 0
        >>> X = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(X), conv(X), atol=1e-6)
        True
    """
    lines: list[str] = []
    folded = _fold(copy.deepcopy(model).eval(), lines.append)
    for line in lines:
        (log if log is not None else logger.info)(line)
    left = [line for line in lines if line.startswith("left ")]
    if strict and left:
        raise ValueError(f"fold_batchnorm {left[0]}")
    return folded


def _fold(model: nn.Module, say: Callable[[str], None]) -> nn.Module:
    """Fold ``model`` in place (its BatchNorms all in Sequentials, or a model fx cannot
    trace), or as a GraphModule."""
    parents = [p for p in model.modules() for c in p.children() if isinstance(c, BATCHNORM_TYPES)]
    if not parents:
        return model  # nothing to fold: the model as it is, not a trace of it
    if all(isinstance(p, nn.Sequential) for p in parents):  # the walk sees every BatchNorm
        _fold_sequentials(model, say)
        return model
    # arguments that default to None (``targets=None``) are traced as left out: otherwise fx
    # would take the branch where they are given
    parameters = inspect.signature(model.forward).parameters.values()
    absent = {p.name: None for p in parameters if p.default is None}
    try:
        gm = fx.symbolic_trace(model, concrete_args=absent)
    except Exception as e:  # control flow or shape arithmetic on inputs: fx cannot trace it
        reason = first_line(e, 120)
        say(f"the model does not trace with torch.fx ({reason}); folding within Sequentials")
        _fold_sequentials(model, say)
        for name, module in model.named_modules():
            parent = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, BATCHNORM_TYPES) and not isinstance(parent, nn.Sequential):
                say(f"left {name} ({type(module).__name__}): not in a Sequential")
        return model
    _fold_graph(gm, say)
    return gm.eval()
