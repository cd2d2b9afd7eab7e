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
  GroupNorm): the normalization divides any scale back out, so rescaling
  does nothing but move the layer's effective learning rate.

"What a layer feeds" is the next recognized layer the forward pass calls, as
in any ``Sequential``-style model. Residual additions are not seen: for a
residual block the nonlinearity's output is scaled, not the sum.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.nn import ACTIVATIONS, NORMALIZATIONS, WEIGHTED, layer_kind, set_mode


@dataclass
class LSUVLayer:
    """What :func:`lsuv_` did to one layer."""

    name: str
    feeds: str  # the kind of layer it feeds ("tanh", "batchnorm", ...), or "output"
    target: float | None  # the variance aimed at; None: skipped (it feeds a normalization)
    variance: float | None  # the variance reached, measured where the target applies
    iterations: int  # weight rescalings done


class _Stop(Exception):
    """Raised from a hook once the measured layer has produced its output."""


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


def _forward_order(model: nn.Module, x: Tensor) -> list[nn.Module]:
    """The recognized layers (``layer_kind``) in the order the forward pass calls them."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda m, _i, _o: order.append(m) if m not in order else None)
        for m in model.modules()
        if layer_kind(m) is not None
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def _output_variance(model: nn.Module, x: Tensor, probe: nn.Module) -> float:
    """The variance of ``probe``'s output over the whole batch, stopping the pass right after."""
    seen: list[float] = []

    def hook(_module, _inputs, out):
        seen.append(out.double().var(correction=0).item())  # every element, as the paper
        raise _Stop

    handle = probe.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("lsuv_: a layer to initialize is not called by the model's forward pass")
    return seen[0]


@torch.no_grad()
def lsuv_(
    model: nn.Module,
    x: Tensor,
    layers: list[nn.Module] | None = None,
    tol: float = 0.02,
    max_iter: int = 10,
    generator: torch.Generator | None = None,
) -> list[LSUVLayer]:
    r"""Orthonormal start, then scale each layer in turn to its target variance on one batch.

    For each layer, in forward order, with :math:`v` the variance of what it
    passes on (its nonlinearity's output, see the module docstring) and
    :math:`t` the target:

    .. math::
        W \leftarrow W \sqrt{t / v} \quad \text{until} \quad |v / t - 1| \le \text{tol}
        \text{ or } \text{max\_iter} \text{ rescalings}

    Biases of the given layers start at zero. The pass runs in training mode
    (the statistics training will see); BatchNorm buffers, the model's mode
    and the global RNG are left as they were.

    Args:
        model: any module; ``model(x)`` must run its forward pass.
        x: one real batch of inputs.
        layers: the layers to initialize, in any order (default: every Linear and
            Conv1d/2d/3d of ``model``, torch's or normlab's).
        tol: relative tolerance on the variance.
        max_iter: the most rescalings per layer.
        generator: draws the orthonormal matrices.

    Returns:
        One :class:`LSUVLayer` per layer, in forward order: what it feeds,
        the target, the variance reached, the iterations used.

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
    for layer in layers:
        w = torch.empty(layer.weight.shape, dtype=layer.weight.dtype)
        nn.init.orthogonal_(w, generator=generator)  # on the CPU: the generator's device
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.zero_()

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        # training mode: the statistics training will see; dropout must not use up the global RNG
        with set_mode(model, training=True), torch.random.fork_rng(devices=devices):
            order = _forward_order(model, x)
            missing = [names[m] for m in layers if m not in order]
            if missing:
                raise ValueError(f"lsuv_: layers not called by the forward pass: {missing}")
            results = []
            for layer in sorted(layers, key=order.index):
                i = order.index(layer)
                nxt = order[i + 1] if i + 1 < len(order) else None
                kind = layer_kind(nxt) if nxt is not None else None
                feeds = kind.name if kind is not None else "output"
                if _family(nxt) in NORMALIZATIONS:
                    results.append(LSUVLayer(names[layer], feeds, None, None, 0))
                    continue
                if _family(nxt) in ACTIVATIONS:  # what the nonlinearity passes on
                    probe, target = nxt, activation_variance(nxt)
                else:  # another weighted layer or the output: its own output, as the paper
                    probe, target = layer, 1.0
                iterations, var = 0, _output_variance(model, x, probe)
                while abs(var / target - 1) > tol and iterations < max_iter and var > 0:
                    layer.weight.mul_(math.sqrt(target / var))
                    iterations += 1
                    var = _output_variance(model, x, probe)
                results.append(LSUVLayer(names[layer], feeds, target, var, iterations))
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return results
