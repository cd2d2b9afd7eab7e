"""Per-example normalizations: ``LayerNorm`` and ``GroupNorm``, the same in train and eval mode."""

import torch
from torch import Tensor, nn

from normlab.nn.batchnorm import _affine_parameters


class LayerNorm(nn.Module):
    r"""Layer normalization (Ba, Kiros & Hinton 2016): normalize each example over its last dims.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with the mean and biased variance taken over the last ``len(normalized_shape)``
    dimensions of each example, so it behaves the same in train and eval mode
    and needs no running statistics.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for one dim).
        eps: added to the variance for numerical stability.
        elementwise_affine: learn a gain (ones) and a bias (zeros) of ``normalized_shape``.
        bias: learn the bias (when ``elementwise_affine``).

    Shape:
        - Input: ``(N, *)``, ending in ``normalized_shape``
        - Output: same shape as the input

    Example:
        >>> LayerNorm(100)(torch.randn(32, 100)).shape
        torch.Size([32, 100])
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        _affine_parameters(self, self.normalized_shape, elementwise_affine, bias, factory)

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"LayerNorm expected input ending in shape {self.normalized_shape}, "
                f"got {tuple(x.shape)}"
            )
        dims = tuple(range(-k, 0))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He 2018): normalize each example over groups of channels.

    The ``C`` channels are split into ``num_groups`` groups of ``C / num_groups``;
    each example is normalized over each group (and its spatial dims) with the
    mean and biased variance, then a per-channel gain and bias are applied.
    ``num_groups=1`` is LayerNorm over ``(C, *)``; ``num_groups=C`` is instance norm.

    Args:
        num_groups: the number of groups; must divide ``num_channels``.
        num_channels: ``C``.
        eps: added to the variance for numerical stability.
        affine: learn a per-channel gain (ones) and bias (zeros).
        bias: learn the bias (with ``affine``).

    Shape:
        - Input: ``(N, C, *)``
        - Output: same shape as the input

    Example:
        >>> GroupNorm(4, 100)(torch.randn(32, 100)).shape
        torch.Size([32, 100])
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        _affine_parameters(self, num_channels, affine, bias, factory)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.size(1) != self.num_channels:
            raise ValueError(
                f"GroupNorm expected input of shape (N, {self.num_channels}, *), "
                f"got {tuple(x.shape)}"
            )
        N = x.size(0)
        grouped = x.reshape(N, self.num_groups, -1)  # (N, G, C/G * spatial)
        var, mean = torch.var_mean(grouped, dim=2, correction=0, keepdim=True)
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).view_as(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
