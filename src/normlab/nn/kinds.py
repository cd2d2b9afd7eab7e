"""What each layer does, for the tools that treat layers by kind (diagnostics, LSUV).

A ``Kind`` names a layer and says which *family* it is of:

- ``saturating`` activations (tanh, sigmoid, hardtanh, softsign, hardsigmoid),
  whose outputs pile up at the ends of their range ``[low, high]``;
- ``rectifying`` activations (ReLU, LeakyReLU, ELU, SELU, GELU, SiLU, Mish,
  Softplus, Hardswish, …), flat below 0: a unit whose output never rises above
  the activation's value at 0 (its ``floor``) over a batch is dead;
- ``batchnorm`` and ``norm`` (LayerNorm, GroupNorm, InstanceNorm, RMSNorm);
- ``linear``, ``conv``, ``embedding`` and ``attention``.

Layers are recognized by their type (normlab's and torch's), by a kind a user
registers (``register_kind``), and, for a parameterless module of another
library (say, transformers' ``NewGELUActivation``), by what it does: it is run
on a probe of values from -6 to 6, and an elementwise function that is flat at
both ends is saturating, one that is flat below and rises as its input above is
rectifying. Attention is recognized by name: a module with parameters whose
class name ends in ``Attention``.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from normlab.nn.activation import ReLU, Tanh
from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.instancenorm import _InstanceNorm
from normlab.nn.linear import Linear
from normlab.nn.mode import set_mode
from normlab.nn.normalization import GroupNorm, LayerNorm

ACTIVATIONS = ("saturating", "rectifying")  # the families that are nonlinearities
NORMALIZATIONS = ("batchnorm", "norm")  # the families that divide out their input's scale
WEIGHTED = ("linear", "conv")  # the families whose weights initializers such as LSUV set


@dataclass(frozen=True)
class Kind:
    """What a layer does: its ``name``, its ``family``, and what its measures need."""

    name: str  # "tanh", "gelu", "batchnorm", "conv", ...
    family: (
        str  # saturating | rectifying | batchnorm | norm | linear | conv | embedding | attention
    )
    low: float | None = None  # saturating: the ends of the output range
    high: float | None = None
    floor: float | None = None  # rectifying: the output at 0; never above it over a batch: dead


def _saturating(name: str, low: float, high: float) -> Kind:
    return Kind(name, "saturating", low=low, high=high)


def _rectifying(name: str, floor: float = 0.0) -> Kind:
    return Kind(name, "rectifying", floor=floor)


# the first match wins; register_kind puts a user's kinds before these
_REGISTRY: list[tuple[tuple[type[nn.Module], ...], Kind]] = [
    ((nn.Tanh, Tanh), _saturating("tanh", -1.0, 1.0)),
    ((nn.Sigmoid,), _saturating("sigmoid", 0.0, 1.0)),
    ((nn.Softsign,), _saturating("softsign", -1.0, 1.0)),
    ((nn.Hardsigmoid,), _saturating("hardsigmoid", 0.0, 1.0)),
    ((nn.ReLU6,), _rectifying("relu6")),
    ((nn.Hardtanh,), _saturating("hardtanh", -1.0, 1.0)),  # its own range: see _with_range
    ((nn.ReLU, ReLU), _rectifying("relu")),
    ((nn.LeakyReLU,), _rectifying("leaky_relu")),
    ((nn.PReLU,), _rectifying("prelu")),
    ((nn.ELU,), _rectifying("elu")),
    ((nn.SELU,), _rectifying("selu")),
    ((nn.CELU,), _rectifying("celu")),
    ((nn.GELU,), _rectifying("gelu")),
    ((nn.SiLU,), _rectifying("silu")),
    ((nn.Mish,), _rectifying("mish")),
    ((nn.Softplus,), _rectifying("softplus", math.log(2.0))),  # its own floor: see _with_range
    ((nn.Hardswish,), _rectifying("hardswish")),
    ((_BatchNorm, nn.modules.batchnorm._BatchNorm), Kind("batchnorm", "batchnorm")),
    ((LayerNorm, nn.LayerNorm), Kind("layernorm", "norm")),
    ((GroupNorm, nn.GroupNorm), Kind("groupnorm", "norm")),
    ((_InstanceNorm, nn.modules.instancenorm._InstanceNorm), Kind("instancenorm", "norm")),
    ((nn.RMSNorm,), Kind("rmsnorm", "norm")),
    ((Linear, nn.Linear), Kind("linear", "linear")),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), Kind("conv", "conv")),
    ((nn.Embedding,), Kind("embedding", "embedding")),
    ((nn.MultiheadAttention,), Kind("attention", "attention")),
]


def register_kind(types: type[nn.Module] | tuple[type[nn.Module], ...], kind: Kind) -> None:
    """Recognize ``types`` (and their subclasses) as ``kind``, before every built-in kind.

    Example:
        >>> class Swish(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> register_kind(Swish, Kind("swish", "rectifying", floor=0.0))
        >>> layer_kind(Swish()).family
        'rectifying'
    """
    types = types if isinstance(types, tuple) else (types,)
    _REGISTRY.insert(0, (types, kind))


def _with_range(module: nn.Module, kind: Kind) -> Kind:
    """A kind whose range or floor depends on the module's own arguments."""
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return _saturating(kind.name, float(module.min_val), float(module.max_val))
    if isinstance(module, nn.Softplus):
        return _rectifying(kind.name, math.log(2.0) / module.beta)
    return kind


def layer_kind(module: nn.Module) -> Kind | None:
    """What ``module`` does (see the module docstring), or None for a layer of no known kind.

    Example:
        >>> layer_kind(torch.nn.Tanh()).family, layer_kind(Linear(3, 4)).name
        ('saturating', 'linear')
        >>> layer_kind(torch.nn.Flatten()) is None
        True
    """
    for types, kind in _REGISTRY:
        if isinstance(module, types):
            return _with_range(module, kind)
    if type(module).__name__.endswith("Attention") and any(True for _ in module.parameters()):
        return Kind("attention", "attention")
    return _probe(module)


PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)  # steps of 0.05


@torch.no_grad()
def _probe(module: nn.Module) -> Kind | None:
    """The kind of a parameterless elementwise activation, from its values on ``PROBE``."""
    if any(True for _ in module.parameters()) or any(True for _ in module.children()):
        return None
    try:
        with set_mode(module, training=False):
            y = module(PROBE)
            alone = torch.stack([module(PROBE[i : i + 1])[0] for i in (0, 120, 240)])
    except Exception:  # not a function of one tensor
        return None
    if not (torch.is_tensor(y) and y.shape == PROBE.shape and y.dtype == PROBE.dtype):
        return None
    elementwise = torch.allclose(alone, y[[0, 120, 240]], atol=1e-9)
    if not elementwise or not y.isfinite().all() or torch.allclose(y, PROBE):
        return None
    slope = lambda i: (y[i + 1] - y[i]).item() / 0.05  # noqa: E731
    name = type(module).__name__.lower()
    if abs(slope(0)) < 1e-2 and abs(slope(239)) < 1e-2 and slope(119) > 0.1:
        return _saturating(name, y.min().item(), y.max().item())
    if abs(slope(0)) < 0.1 and abs(slope(239) - 1.0) < 0.05:
        return _rectifying(name, module(torch.zeros(1, dtype=torch.float64)).item())
    return None
