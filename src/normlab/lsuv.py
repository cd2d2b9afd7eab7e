"""LSUV: layer-sequential unit-variance initialization, for any model of Linear or conv layers.

Mishkin & Matas 2016, "All you need is a good init": start every weight
matrix orthonormal, then, layer by layer from the input on, run one real batch
through the model and rescale the layer's weights until its output has the
target variance, within a tolerance and a capped number of iterations.

Three choices differ from the common implementations, which scale every
layer's raw output to variance 1:

- **Where it is measured.** The signal that reaches the next layer is the
  output of the nonlinearity, so that is what is measured when a layer feeds
  one. (The paper's Caffe code did the same by accident: its ReLUs run in
  place, so the "conv output" it measured was already rectified.)
- **The target.** Unit variance after ``tanh`` is impossible short of every
  unit at ±1 (full saturation), and chasing it saturates the net. The target
  after a nonlinearity ``f`` is instead ``Var[f(z)]`` for ``z ~ N(0, 1)``, the
  variance a unit-variance Gaussian pre-activation gives: 0.394 for ``tanh``
  (std 0.628, 3.7% of units beyond ±0.97), 0.341 for ReLU. Without a
  nonlinearity after it, a layer's output is scaled to variance 1, as in the
  paper. So every layer passes on the same, healthy statistics, measured on
  real data rather than assumed Gaussian.
- **Layers that feed a normalization are skipped** (BatchNorm, LayerNorm,
  GroupNorm, a norm-plus-activation layer): the normalization divides any scale
  back out, so rescaling does nothing but move the layer's effective learning rate.

"What a layer feeds" comes from one forward pass (``normlab.dataflow``): the
layers that read its output. A layer whose output goes to one activation alone
is measured after it; one whose output is used by a function (a residual
addition, a reshape) is measured itself. The passes run with BatchNorm in
training mode (the statistics training will see) and every other layer in eval
mode, so that dropout, LayerDrop and stochastic depth are off. A layer the
forward pass does not call (its weight passed to a function, say) is reported
and left as it was, and so is a layer whose output a rescaling of its weight
does not change (weight standardization), or whose weight is parametrized in a
way that does not scale with its parameters.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlab.dataflow import Batch, StopForward, call_model, forward_until_stopped, trace_dataflow
from normlab.errors import first_line
from normlab.nn import (
    ACTIVATIONS,
    NORMALIZATIONS,
    WEIGHTED,
    batchnorm_training,
    kept_buffers,
    layer_kind,
)


@dataclass
class LSUVLayer:
    """What :func:`lsuv_` did to one layer."""

    name: str
    feeds: str  # the kind of layer it feeds ("tanh", "batchnorm", ...), or "output"
    target: float | None  # the variance aimed at; None: skipped
    variance: float | None  # the variance reached, measured where the target applies
    iterations: int  # weight rescalings done
    skipped: str | None = None  # why it was not rescaled (uncalled: not even started)


NAMED = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}


@torch.no_grad()
def activation_variance(activation: str | Callable[[Tensor], Tensor]) -> float:
    r"""``Var[f(z)]`` for ``z ~ N(0, 1)``, by quadrature: what a unit Gaussian gives after ``f``.

    .. math::
        \mathrm{Var}[f(z)] = \int f(z)^2 \varphi(z)\,dz - \left(\int f(z) \varphi(z)\,dz\right)^2

    Args:
        activation: an elementwise function or module, or ``"tanh"``, ``"sigmoid"``
            or ``"relu"``.

    Example:
        >>> round(activation_variance("tanh"), 3), round(activation_variance(torch.nn.GELU()), 3)
        (0.394, 0.346)
    """
    if isinstance(activation, str):
        if activation not in NAMED:
            valid = ", ".join(NAMED)
            raise ValueError(f"unknown activation {activation!r}; valid choices: {valid}")
        activation = NAMED[activation]
    z = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi) * (z[1] - z[0])  # φ(z) dz
    f = activation(z)
    mean = (w * f).sum()
    return float((w * (f - mean) ** 2).sum())


def _family(module: nn.Module | None) -> str | None:
    kind = layer_kind(module) if module is not None else None
    return kind.family if kind is not None else None


def _output_variance(model: nn.Module, x: Batch, probe: nn.Module, forward_fn) -> float:
    """The variance of ``probe``'s output over the whole batch, stopping the pass right after."""
    seen: list[float] = []

    def hook(_module, _inputs, out):
        seen.append(out.double().var(correction=0).item())  # every element, as the paper
        raise StopForward

    handle = probe.register_forward_hook(hook)
    try:
        forward_until_stopped(forward_fn, model, x)
    finally:
        handle.remove()
    return seen[0]


def _set_weight(layer: nn.Module, weight: Tensor) -> str | None:
    """Set ``layer.weight`` to ``weight``, through its parametrization if it has one; or say
    why it cannot be set."""
    if not parametrize.is_parametrized(layer, "weight"):
        layer.weight.copy_(weight)
        return None
    names = ", ".join(type(p).__name__ for p in layer.parametrizations.weight)
    try:
        layer.weight = weight  # the parametrization's right_inverse sets its parameters
    except Exception as e:
        return f"its weight is parametrized ({names}) with no inverse: {first_line(e, 80)}"
    if not torch.allclose(layer.weight, weight, rtol=1e-4, atol=1e-6 * weight.abs().max()):
        return f"its weight is parametrized ({names}) in a way that does not take this weight"
    return None


@torch.no_grad()
def lsuv_(
    model: nn.Module,
    x: Batch,
    layers: list[nn.Module] | None = None,
    tol: float = 0.02,
    max_iter: int = 10,
    generator: torch.Generator | None = None,
    forward_fn: Callable[[nn.Module, Batch], object] = call_model,
) -> list[LSUVLayer]:
    r"""Orthonormal start, then scale each layer in turn to its target variance on one batch.

    For each layer, in forward order, with :math:`v` the variance of what it
    passes on (its nonlinearity's output, see the module docstring) and
    :math:`t` the target:

    .. math::
        W \leftarrow W \sqrt{t / v} \quad \text{until} \quad |v / t - 1| \le \text{tol}
        \text{ or } \text{max\_iter} \text{ rescalings}

    Biases of the given layers start at zero. The passes run with BatchNorm in
    training mode and the rest in eval mode (see the module docstring); BatchNorm
    buffers, the model's mode and the global RNG are left as they were.

    Args:
        model: any module.
        x: one real batch of inputs: a tensor (``model(x)``), a tuple or list
            (``model(*x)``) or a dict (``model(**x)``).
        layers: the layers to initialize, in any order (default: every Linear and
            Conv1d/2d/3d of ``model``, torch's or normlab's).
        tol: relative tolerance on the variance.
        max_iter: the most rescalings per layer.
        generator: draws the orthonormal matrices.
        forward_fn: ``forward_fn(model, x)`` runs the batch, for models called some other way.

    Returns:
        One :class:`LSUVLayer` per layer, in forward order (the layers the pass does not
        call last): what it feeds, the target, the variance reached, the iterations used,
        and for a layer left as it was, why.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 5))
        >>> report = lsuv_(model, torch.randn(1000, 20))
        >>> [(r.name, r.feeds) for r in report]
        [('0', 'tanh'), ('2', 'output')]
    """
    if tol <= 0 or max_iter < 0:
        raise ValueError(f"lsuv_ needs tol > 0 and max_iter >= 0, got {tol} and {max_iter}")
    if layers is None:
        layers = [m for m in model.modules() if _family(m) in WEIGHTED]
    if not layers:
        raise ValueError("lsuv_ found no Linear or convolution layer to initialize")
    names = {m: n for n, m in model.named_modules()}
    devices = [d for d in {b.device for b in model.buffers()} if d.type == "cuda"]
    # the global RNG is forked: a stochastic layer left on must not use it up
    with (
        kept_buffers(model),
        batchnorm_training(model),
        torch.random.fork_rng(devices=devices),
    ):
        flow = trace_dataflow(model, x, forward_fn)
        modules = dict(model.named_modules())
        called = sorted(
            (m for m in layers if names[m] in flow.calls),
            key=lambda m: flow.order.index(names[m]),
        )
        variance_of = lambda probe: _output_variance(model, x, probe, forward_fn)  # noqa: E731
        results = [
            _lsuv_layer(layer, names[layer], flow, modules, variance_of, tol, max_iter, generator)
            for layer in called
        ]
    uncalled = [m for m in layers if names[m] not in flow.calls]
    why = "the forward pass does not call it (its weight may be used by a function)"
    return results + [LSUVLayer(names[m], "output", None, None, 0, why) for m in uncalled]


def _lsuv_layer(layer, name, flow, modules, variance_of, tol, max_iter, generator) -> LSUVLayer:
    """LSUV on one layer: its orthonormal start and its rescalings (see ``lsuv_``);
    ``variance_of(probe)`` runs the batch and measures ``probe``'s output."""
    readers = [r for r in flow.feeds.get(name, []) if r in modules]
    families = [_family(modules[r]) for r in readers]
    feeds = layer_kind(modules[readers[0]]).name if readers else "output"
    w = torch.empty(layer.weight.shape, dtype=layer.weight.dtype)
    nn.init.orthogonal_(w, generator=generator)  # on the CPU: the generator's device
    refused = _set_weight(layer, w.to(layer.weight.device))
    if refused is not None:
        return LSUVLayer(name, feeds, None, None, 0, refused)
    if getattr(layer, "bias", None) is not None:
        layer.bias.zero_()
    if readers and all(f in NORMALIZATIONS for f in families):
        return LSUVLayer(name, feeds, None, None, 0, "it feeds a normalization")
    only = len(readers) == 1 and len(flow.feeds[name]) == 1 and families[0] in ACTIVATIONS
    if only:  # what the nonlinearity passes on
        probe, target = modules[readers[0]], activation_variance(modules[readers[0]])
    else:  # used by another layer, a function or nothing: its own output, as the paper
        probe, target = layer, 1.0
    iterations, var = 0, variance_of(probe)
    if var == 0:
        return LSUVLayer(name, feeds, target, var, 0, "its output is zero whatever its weight")
    while abs(var / target - 1) > tol and iterations < max_iter:
        factor = target / var  # the variance scales as the weight's square
        refused = _set_weight(layer, layer.weight * math.sqrt(factor))
        if refused is not None:
            return LSUVLayer(name, feeds, target, var, iterations, refused)
        iterations += 1
        before, var = var, variance_of(probe)
        # a layer whose output follows less than a tenth of a material rescaling (in log
        # terms; a saturating activation still follows about half) is not scaled by its
        # weight: a standardized weight, a gain elsewhere
        moved = abs(math.log(var / before)) if var > 0 else 0.0
        if abs(math.log(factor)) > 0.05 and moved < 0.1 * abs(math.log(factor)):
            why = "its output does not follow its weight's scale (a standardized weight?)"
            return LSUVLayer(name, feeds, target, var, iterations, why)
    return LSUVLayer(name, feeds, target, var, iterations)
