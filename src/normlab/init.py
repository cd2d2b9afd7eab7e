"""Weight initializers with the names, signatures and semantics of ``torch.nn.init``.

Given the same generator state each function fills exactly the same values as its
torch counterpart, so switching between them is invisible. (LSUV, which runs a
model on data, is an initialization scheme of its own: :mod:`normlab.lsuv`.)
"""

import math
import warnings

import torch
from torch import Tensor

_LINEAR_FNS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
NONLINEARITIES = (*_LINEAR_FNS, "sigmoid", "tanh", "relu", "leaky_relu", "selu")
FAN_MODES = ("fan_in", "fan_out")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    r"""Return the recommended gain for a nonlinearity.

    The gain keeps the variance of a signal roughly constant through
    ``Linear → nonlinearity`` when the weights have std ``gain / sqrt(fan)``.

    ================= ===========================================
    nonlinearity      gain
    ================= ===========================================
    linear, conv*     :math:`1`
    sigmoid           :math:`1`
    tanh              :math:`5/3`
    relu              :math:`\sqrt{2}`
    leaky_relu        :math:`\sqrt{2 / (1 + \text{negative\_slope}^2)}`
    selu              :math:`3/4`
    ================= ===========================================

    Args:
        nonlinearity: the ``torch.nn.functional`` name of the nonlinearity.
        param: the negative slope of ``leaky_relu`` (default 0.01).

    Raises:
        ValueError: for an unknown nonlinearity (the message lists the valid
            ones) or a negative slope that is not a number.

    Example:
        >>> calculate_gain("tanh")
        1.6666666666666667
    """
    if nonlinearity in _LINEAR_FNS or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            negative_slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            negative_slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + negative_slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(
        f"unsupported nonlinearity {nonlinearity!r}; valid choices: {', '.join(NONLINEARITIES)}"
    )


def calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` of a weight in PyTorch's layout.

    The layout is ``(out_features, in_features, *kernel)``, so
    ``fan_in = in_features × receptive field`` and
    ``fan_out = out_features × receptive field``, where the receptive field is
    the product of the kernel dimensions (1 for a ``Linear`` weight).

    Raises:
        ValueError: for a tensor with fewer than 2 dimensions.

    Example:
        >>> calculate_fan_in_and_fan_out(torch.empty(200, 30))
        (30, 200)
    """
    if tensor.dim() < 2:
        raise ValueError(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions "
            f"(got shape {tuple(tensor.shape)})"
        )
    receptive_field = math.prod(tensor.shape[2:])
    return tensor.size(1) * receptive_field, tensor.size(0) * receptive_field


def _fan(tensor: Tensor, mode: str) -> int:
    if mode not in FAN_MODES:
        raise ValueError(f"mode {mode!r} not supported; valid choices: {', '.join(FAN_MODES)}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _kaiming_std(tensor: Tensor, a: float, mode: str, nonlinearity: str) -> float:
    return calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))


def _is_empty(tensor: Tensor) -> bool:
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return True
    return False


def kaiming_normal_(
    tensor: Tensor,
    a: float = 0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`\mathcal{N}(0, \text{std}^2)` (Kaiming / He init).

    From He et al. 2015, "Delving Deep into Rectifiers: Surpassing Human-Level
    Performance on ImageNet Classification":

    .. math::
        \text{std} = \frac{\text{gain}}{\sqrt{\text{fan\_mode}}}

    ``fan_in`` preserves the variance of activations in the forward pass,
    ``fan_out`` that of gradients in the backward pass.

    Args:
        tensor: an n-dimensional tensor, ``n >= 2``, in PyTorch's weight layout.
        a: negative slope of the rectifier after this layer (``leaky_relu`` only).
        mode: ``'fan_in'`` (default) or ``'fan_out'``.
        nonlinearity: the nonlinearity after this layer (see :func:`calculate_gain`).
        generator: the torch generator to draw from.

    Example:
        >>> w = kaiming_normal_(torch.empty(100, 30), nonlinearity="tanh")
        >>> round(w.std().item(), 1)  # (5/3) / sqrt(30) = 0.304
        0.3
    """
    if _is_empty(tensor):
        return tensor
    std = _kaiming_std(tensor, a, mode, nonlinearity)
    with torch.no_grad():
        return tensor.normal_(0, std, generator=generator)


def kaiming_uniform_(
    tensor: Tensor,
    a: float = 0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`\mathcal{U}(-b, b)` (Kaiming / He init).

    From He et al. 2015, "Delving Deep into Rectifiers". The uniform distribution
    with the same standard deviation as :func:`kaiming_normal_`:

    .. math::
        b = \text{gain} \times \sqrt{\frac{3}{\text{fan\_mode}}}

    Args:
        tensor: an n-dimensional tensor, ``n >= 2``, in PyTorch's weight layout.
        a: negative slope of the rectifier after this layer (``leaky_relu`` only).
        mode: ``'fan_in'`` (default) or ``'fan_out'``.
        nonlinearity: the nonlinearity after this layer (see :func:`calculate_gain`).
        generator: the torch generator to draw from.

    Example:
        >>> w = kaiming_uniform_(torch.empty(100, 30), mode="fan_out", nonlinearity="relu")
        >>> bool(w.abs().max() <= math.sqrt(2) * math.sqrt(3 / 100))
        True
    """
    if _is_empty(tensor):
        return tensor
    bound = math.sqrt(3.0) * _kaiming_std(tensor, a, mode, nonlinearity)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def _xavier_std(tensor: Tensor, gain: float) -> float:
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return gain * math.sqrt(2.0 / float(fan_in + fan_out))


def xavier_normal_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`\mathcal{N}(0, \text{std}^2)` (Xavier / Glorot init).

    From Glorot & Bengio 2010, "Understanding the difficulty of training deep
    feedforward neural networks":

    .. math::
        \text{std} = \text{gain} \times \sqrt{\frac{2}{\text{fan\_in} + \text{fan\_out}}}

    Args:
        tensor: an n-dimensional tensor, ``n >= 2``, in PyTorch's weight layout.
        gain: an optional scaling factor (see :func:`calculate_gain`).
        generator: the torch generator to draw from.

    Example:
        >>> w = xavier_normal_(torch.empty(100, 30), gain=calculate_gain("tanh"))
        >>> round(w.std().item(), 1)  # (5/3) * sqrt(2 / 130) = 0.207
        0.2
    """
    std = _xavier_std(tensor, gain)
    with torch.no_grad():
        return tensor.normal_(0, std, generator=generator)


def xavier_uniform_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`\mathcal{U}(-a, a)` (Xavier / Glorot init).

    From Glorot & Bengio 2010, "Understanding the difficulty of training deep
    feedforward neural networks":

    .. math::
        a = \text{gain} \times \sqrt{\frac{6}{\text{fan\_in} + \text{fan\_out}}}

    Args:
        tensor: an n-dimensional tensor, ``n >= 2``, in PyTorch's weight layout.
        gain: an optional scaling factor (see :func:`calculate_gain`).
        generator: the torch generator to draw from.

    Example:
        >>> w = xavier_uniform_(torch.empty(100, 30))
        >>> bool(w.abs().max() <= math.sqrt(6 / 130))
        True
    """
    bound = math.sqrt(3.0) * _xavier_std(tensor, gain)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)
