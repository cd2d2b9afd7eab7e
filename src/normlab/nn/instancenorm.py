"""Instance normalization: each example's channels normalized over their own length or pixels.

Ulyanov, Vedaldi & Lempitsky 2016. It is batch normalization of a batch of one
with ``N · C`` channels, so it runs on ``BatchNormFunction``, as torch's
``instance_norm`` runs on its ``batch_norm``. The running statistics, where kept,
move towards the batch's average over its examples.
"""

import warnings

import torch
from torch import Tensor

from normlab.nn.batchnorm import BatchNormFunction, _NormBase, _stat_shape, running_affine


class _InstanceNorm(_NormBase):
    r"""What InstanceNorm1d and 2d share; they differ in the ranks they take.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with the mean and biased variance over each example's channel: its length
    or its pixels. In eval mode with ``track_running_stats`` the running
    statistics replace them; they move by ``momentum`` towards the average over
    the batch of each example's statistics (``momentum=None``: they do not move).

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance for numerical stability.
        momentum: the running-statistics factor.
        affine: learn a per-channel gain (ones) and bias (zeros); off by default, as in torch.
        track_running_stats: keep running statistics and use them in eval mode.
        bias: learn the bias (with ``affine``).
    """

    spatial_dims = 0  # a subclass's number of dimensions after the channel

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        )

    def _check_input(self, x: Tensor) -> None:
        rank = self.spatial_dims + 2
        if x.dim() not in (rank - 1, rank):
            raise ValueError(
                f"{type(self).__name__} expected {rank - 1}D (unbatched) or {rank}D input, "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )
        channels = x.size(-self.spatial_dims - 1)
        if channels != self.num_features:
            message = (
                f"{type(self).__name__}({self.num_features}) got input with {channels} "
                f"channels, shape {tuple(x.shape)}"
            )
            if self.affine:
                raise ValueError(message)
            warnings.warn(
                message + "; without affine parameters it normalizes them anyway", stacklevel=3
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.dim() == self.spatial_dims + 1:  # one example without a batch dimension
            return self.forward(x.unsqueeze(0)).squeeze(0)
        N, C = x.shape[:2]
        if not self.training and self.track_running_stats:  # eval: running statistics
            shape = _stat_shape(x, 1)
            scale, shift = running_affine(self)
            return torch.addcmul(shift.view(shape), x, scale.view(shape))
        if x[0, 0].numel() <= 1 and self.training:
            raise ValueError(
                f"{type(self).__name__} needs more than 1 value per channel of an example in "
                f"training, got input of shape {tuple(x.shape)}"
            )
        one = x.reshape(1, N * C, *x.shape[2:])  # a batch of one with N·C channels
        repeat = lambda t: None if t is None else t.repeat(N)  # noqa: E731
        running = None
        if self.training and self.track_running_stats:
            factor = self.momentum if self.momentum is not None else 0.0
            running = (repeat(self.running_mean), repeat(self.running_var), factor)
        y = BatchNormFunction.apply(one, repeat(self.weight), repeat(self.bias), self.eps, running)
        if running is not None:  # each example's statistics moved its copy: their average
            with torch.no_grad():
                self.running_mean.copy_(running[0].view(N, C).mean(0))
                self.running_var.copy_(running[1].view(N, C).mean(0))
        return y.view_as(x)


class InstanceNorm1d(_InstanceNorm):
    r"""Instance normalization of each example's channels over their length; see
    ``_InstanceNorm``.

    Shape:
        - Input: ``(N, C, L)`` or ``(C, L)``
        - Output: same shape as the input

    Example:
        >>> InstanceNorm1d(4)(torch.randn(2, 4, 10)).shape
        torch.Size([2, 4, 10])
    """

    spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    r"""Instance normalization of each example's channels over their pixels; see
    ``_InstanceNorm``.

    Shape:
        - Input: ``(N, C, H, W)`` or ``(C, H, W)``
        - Output: same shape as the input

    Example:
        >>> InstanceNorm2d(3, affine=True)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    spatial_dims = 2
