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
registers (``register_kind``), by the qualified class name of a few layers of
other libraries (``THIRD_PARTY``: no import of those libraries), and, for a
parameterless module of another library (say, transformers'
``NewGELUActivation``), by what it does: it is run on a probe of values from
-6 to 6, and an elementwise function that is flat at both ends is saturating,
one that is flat below and rises as its input above is rectifying. Attention is
recognized by name: a module with parameters whose class name ends in
``Attention``, and so are norms whose class name ends in ``LayerNorm`` or
``RMSNorm`` (T5's, Llama's).
"""

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
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
SATURATION = 0.97  # a saturating unit beyond this of its half range (|tanh| > 0.97): < 6% gradient


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


# layers of other libraries, by qualified class name, so that normlab never imports them: every
# tool (audit, the callbacks, fold, LSUV) then knows them whether or not the user imported them
THIRD_PARTY: dict[str, Kind] = {
    "transformers.pytorch_utils.Conv1D": Kind("linear", "linear"),  # GPT-2's, weight transposed
    "torchvision.ops.misc.FrozenBatchNorm2d": Kind("batchnorm", "batchnorm"),
    "timm.layers.norm_act.FrozenBatchNormAct2d": Kind("batchnorm", "batchnorm"),
}
# a normalization of another library named for what it computes (T5LayerNorm, LlamaRMSNorm)
NAMED_NORMS = {"LayerNorm": Kind("layernorm", "norm"), "RMSNorm": Kind("rmsnorm", "norm")}


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
    _KNOWN.clear()  # a module's kind may be this one now


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
    try:
        return _KNOWN[module]
    except KeyError:
        pass
    except TypeError:  # a module that cannot be a key (its class defines __eq__, not __hash__)
        return _work_out_kind(module)
    kind = _KNOWN[module] = _work_out_kind(module)
    return kind


def _work_out_kind(module: nn.Module) -> Kind | None:
    kind = _declared_kind(module)
    return kind if kind is not None else _probe(module)


# module → its kind, worked out once per module (a recording asks for every module's kind, and
# a model's modules keep theirs); register_kind clears it
_KNOWN: "weakref.WeakKeyDictionary[nn.Module, Kind | None]" = weakref.WeakKeyDictionary()


def _declared_kind(module: nn.Module) -> Kind | None:
    """The kind of ``module`` from its type or its class name, without running it."""
    for types, kind in _REGISTRY:
        if isinstance(module, types):
            return _with_range(module, kind)
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" in THIRD_PARTY:
        return THIRD_PARTY[f"{cls.__module__}.{cls.__qualname__}"]
    weighted = any(True for _ in module.parameters())
    if cls.__name__.endswith("Attention") and weighted:
        return Kind("attention", "attention")
    suffix = next((s for s in NAMED_NORMS if cls.__name__.endswith(s)), None)
    if suffix is not None and weighted:
        return NAMED_NORMS[suffix]
    return None


# ---------------------------------------------------------------------------- BatchNorm's forms


@dataclass(frozen=True)
class BatchNormForm:
    r"""How a BatchNorm-like layer computes in eval mode, for the tools that fold it: the map
    :math:`x \mapsto s x + t` of its running statistics (``normlab.nn.batchnorm.running_affine``),
    then ``after(layer)``, what the layer runs on that (timm's fused activation), if anything."""

    after: Callable[[nn.Module], nn.Module] | None = None

    @property
    def affine(self) -> bool:
        """Its output is the affine map alone, so a layer after it can absorb it too."""
        return self.after is None


def _dropout_then_activation(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer.drop, layer.act)  # timm's BatchNormAct2d: bn → drop → act


# BatchNorm-like classes whose forward is not torch's, by qualified class name; a subclass of
# torch's or normlab's BatchNorm that keeps their forward needs no entry
_BATCHNORM_FORMS: dict[str, BatchNormForm] = {
    "torchvision.ops.misc.FrozenBatchNorm2d": BatchNormForm(),
    "timm.layers.norm_act.BatchNormAct2d": BatchNormForm(_dropout_then_activation),
    "timm.layers.norm_act.SyncBatchNormAct": BatchNormForm(_dropout_then_activation),
    "timm.layers.norm_act.FrozenBatchNormAct2d": BatchNormForm(_dropout_then_activation),
}
_BATCHNORM_FORWARDS = (
    _BatchNorm.forward,
    nn.modules.batchnorm._BatchNorm.forward,
    nn.SyncBatchNorm.forward,
)


def register_batchnorm(
    cls: type[nn.Module], after: Callable[[nn.Module], nn.Module] | None = None
) -> None:
    """Declare that ``cls`` computes ``after(layer)(s x + t)`` in eval mode, with ``s, t`` its
    running statistics' map (``after=None``: the map alone), so that ``fold_batchnorm`` folds it.

    Example:
        >>> class BatchNormReLU(torch.nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         return torch.relu(super().forward(x))
        >>> register_batchnorm(BatchNormReLU, after=lambda layer: torch.nn.ReLU())
        >>> batchnorm_form(BatchNormReLU(4)).affine
        False
    """
    _BATCHNORM_FORMS[f"{cls.__module__}.{cls.__qualname__}"] = BatchNormForm(after)


def is_batchnorm(module: nn.Module) -> bool:
    """A layer of the batchnorm family (``layer_kind``): torch's, normlab's, any subclass of
    them, and the BatchNorm-like layers of other libraries normlab knows."""
    kind = _declared_kind(module)  # the probe finds activations only: no need to run it
    return kind is not None and kind.family == "batchnorm"


def batchnorm_form(module: nn.Module) -> BatchNormForm | None:
    """How the BatchNorm ``module`` computes (``BatchNormForm``), or None where normlab does not
    know: a subclass that overrides ``forward`` and is not registered is never guessed at."""
    cls = type(module)
    for klass in cls.__mro__:  # the nearest registered class, else torch's own forward
        form = _BATCHNORM_FORMS.get(f"{klass.__module__}.{klass.__qualname__}")
        if form is not None:
            return form
        if klass.__dict__.get("forward") is not None:
            return BatchNormForm() if klass.forward in _BATCHNORM_FORWARDS else None
    return None


PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)  # steps of 0.05
_PROBED: dict[tuple, Kind | None] = {}  # (class, its settings) → what the probe found


def _probe(module: nn.Module) -> Kind | None:
    """The kind of a parameterless elementwise activation, from its values on ``PROBE``.

    A model holds many instances of a few activation classes, so the answer is kept per class
    and settings (the module's plain attributes: ``negative_slope``, ``approximate``, ...). A
    module with any other state (tensors, callables) is probed every time.
    """
    if any(True for _ in module.parameters()) or any(True for _ in module.children()):
        return None
    settings = [(k, v) for k, v in vars(module).items() if not k.startswith("_")]
    if not all(isinstance(v, bool | int | float | str | None) for _, v in settings):
        return _run_probe(module)
    key = (type(module), tuple(sorted((k, v) for k, v in settings if k != "training")))
    if key not in _PROBED:
        _PROBED[key] = _run_probe(module)
    return _PROBED[key]


@torch.no_grad()
def _run_probe(module: nn.Module) -> Kind | None:
    try:
        with set_mode(module, training=False):
            y = module(PROBE)
            alone = torch.stack([module(PROBE[i : i + 1])[0] for i in (0, 120, 240)])
            at_zero = module(torch.zeros(1, dtype=PROBE.dtype))
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
        return _rectifying(name, at_zero.item())
    return None


@contextlib.contextmanager
def batchnorm_training(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with the BatchNorm layers of ``model`` in training mode and every other
    layer in eval mode: its normalizations use the batch's statistics, and nothing is random
    (no dropout, LayerDrop or stochastic depth). Every module's mode is restored afterwards.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5))
        >>> with batchnorm_training(model):
        ...     model[0].training, model[1].training
        (True, False)
    """
    with set_mode(model, training=False):
        for m in model.modules():
            if is_batchnorm(m):
                m.train()
        yield model
