"""``Linear``: an affine map, initialized for the nonlinearity after it."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from normlab import init as nl_init


class Linear(nn.Module):
    r"""Affine map :math:`y = x W^T + b`, initialized for the nonlinearity that follows it.

    The weight has torch's layout ``(out_features, in_features)`` and is drawn
    by :func:`normlab.init.kaiming_normal_` (``std = gain / sqrt(in_features)``)
    with the gain of ``nonlinearity``, or by ``init`` when given. The bias starts
    at zero. Leave the bias out (``bias=False``) when a BatchNorm follows: its
    mean subtraction cancels any bias.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        nonlinearity: the nonlinearity after this layer, for the gain
            (see :func:`normlab.init.calculate_gain`).
        init: an in-place initializer ``init(weight)`` used instead of Kaiming.
        generator: the torch generator for the initial weights.

    Shape:
        - Input: ``(*, in_features)``
        - Output: ``(*, out_features)``

    Example:
        >>> layer = Linear(30, 100, bias=False, nonlinearity="tanh")
        >>> layer(torch.randn(32, 30)).shape
        torch.Size([32, 100])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nonlinearity: str = "linear",
        init: Callable[[Tensor], object] | None = None,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.nonlinearity = nonlinearity
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if init is None:
            nl_init.kaiming_normal_(self.weight, nonlinearity=nonlinearity, generator=generator)
        else:
            with torch.no_grad():
                init(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
