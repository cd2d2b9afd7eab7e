"""Batch normalization of every rank and layout, on one hand-written autograd Function.

``BatchNormFunction`` normalizes each channel over every other dimension of its
input: the batch, and the length or the pixels. ``BatchNorm1d``, ``2d`` and
``3d`` differ only in the ranks they accept; ``channels_last=True`` takes the
channel from the last dimension instead of the second, so ``(B, T, C)``
sequences normalize over ``(B, T)`` (makemore part 5's layout).
``SyncBatchNorm`` takes its statistics over the rows of every process, on any
backend (gloo on the CPU too); ``convert_sync_batchnorm`` swaps it in for
normlab's BatchNorms and torch's. Every module has torch's constructor, buffers,
``state_dict`` keys and version, so state dicts load both ways.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.nn import kernel
from normlab.nn.twice import batch_norm_twice_differentiable, second_order


def _stat_shape(x: Tensor, channel_dim: int) -> list[int]:
    """The shape a per-channel statistic takes to broadcast against ``x``: 1 but for the channel."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.size(channel_dim)
    return shape


class BatchNormFunction(torch.autograd.Function):
    r"""Training-mode batch normalization with its closed-form backward.

    Each channel ``c`` (dimension ``channel_dim`` of ``x``) is normalized over the
    ``n`` values it has in every other dimension:

    .. math::
        \mu = \frac{1}{n}\sum_i x_i, \quad
        \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2, \quad
        \hat{x}_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
        y_i = \gamma \hat{x}_i + \beta

    Backward, with :math:`g_i = \partial L / \partial y_i`:

    .. math::
        \frac{\partial L}{\partial \beta} = \sum_i g_i, \quad
        \frac{\partial L}{\partial \gamma} = \sum_i g_i \hat{x}_i, \quad
        \frac{\partial L}{\partial x_i} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
            \left(g_i - \frac{1}{n}\frac{\partial L}{\partial \beta}
            - \frac{\hat{x}_i}{n}\frac{\partial L}{\partial \gamma}\right)

    ``weight`` and ``bias`` (:math:`\gamma, \beta`) may each be None.
    ``running`` is ``None`` or ``(running_mean, running_var, factor)``: those
    buffers move towards the batch statistics in place (the unbiased variance,
    as torch does), outside of autograd.

    With a process ``group``, the batch is the union of every rank's values: the
    statistics and the two sums of the backward are all-reduced (``n`` is then
    the global count), so every rank computes what one process would compute
    on the whole batch, and the running statistics stay identical on every rank.
    Where the step is traced (``normlab.lm.compiled``), the all-reduces are functional
    collectives, which the graph holds as it holds the arithmetic.

    The BatchNorm modules run this math on the CPU, in float32 and float64, as one
    C++ operator each way (``normlab.nn.kernel``), where nothing traces them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, running, group=None, channel_dim: int = 1):
        channel_dim %= x.dim()
        dims = tuple(d for d in range(x.dim()) if d != channel_dim)
        shape = _stat_shape(x, channel_dim)
        if group is None:
            n = x.numel() // x.size(channel_dim)
            mean = x.sum(dims) * (1.0 / n)  # (C,); sum·(1/n) is one op fewer than mean() on CPU
            x_centered = x - mean.view(shape)
            # two passes (mean, then squared deviations): no E[x²] - E[x]² cancellation,
            # and on CPU much faster than torch.var_mean along the batch axis
            var = x_centered.square().sum(dims) * (1.0 / n)  # (C,), biased
        else:
            n, mean, var = _global_moments(x, dims, group)  # over the values of every rank
            x_centered = x - mean.view(shape)
        invstd = (var + eps).rsqrt_()  # (C,)
        scale = invstd if weight is None else invstd * weight  # γ / σ
        if bias is None:
            y = x_centered * scale.view(shape)
        else:
            y = torch.addcmul(bias.view(shape), x_centered, scale.view(shape))
        if running is not None:
            running_mean, running_var, factor = running
            running_mean.lerp_(mean, factor)
            running_var.lerp_(var * (n / (n - 1)), factor)
        ctx.save_for_backward(x_centered, invstd, scale)
        ctx.n, ctx.group, ctx.dims, ctx.shape = n, group, dims, shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x_centered, invstd, scale = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        grad_bias = grad_y.sum(dims)  # Σ g, (C,)
        grad_weight = (grad_y * x_centered).sum(dims) * invstd  # Σ g·x̂, (C,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            sum_g, sum_g_xhat = grad_bias, grad_weight
            if ctx.group is not None:  # the sums over every rank's values; the parameter
                # gradients stay this rank's own share (the data-parallel step sums those)
                C = grad_bias.size(0)
                sums = _summed_over(torch.cat((grad_bias, grad_weight)), ctx.group)
                sum_g, sum_g_xhat = sums[:C], sums[C:]  # (C,) each
            # (γ/σ)(g - Σg/n - x̂·Σg·x̂/n) with x̂ = (x - μ)/σ, as two fused passes
            minus_scale_n = scale * (-1.0 / ctx.n)
            grad_x = torch.addcmul(
                (minus_scale_n * sum_g).view(shape),
                x_centered,
                (minus_scale_n * invstd * sum_g_xhat).view(shape),
            )
            grad_x.addcmul_(grad_y, scale.view(shape))
        grad_weight = grad_weight if ctx.needs_input_grad[1] else None
        grad_bias = grad_bias if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _summed_over(t: Tensor, group) -> Tensor:
    """``t`` summed over the processes of ``group``: as a functional collective where traced
    (an in-place collective cannot be), in place with ``dist.all_reduce`` where computed, which
    costs less there: a functional collective's result wraps every later operator until it
    is waited on."""
    if kernel.traced(t):
        return funcol.all_reduce(t, "sum", group)
    dist.all_reduce(t, group=group)
    return t


def _global_moments(x: Tensor, dims: tuple[int, ...], group) -> tuple[Tensor, Tensor, Tensor]:
    r"""Count, mean and biased variance of each channel over ``dims`` of every rank in ``group``.

    One all-reduce of :math:`(n, \sum x, \sum x^2)` per call, summed in float64 so that
    :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2` loses nothing that float32 inputs carry. A rank
    may hold any number of values, none included. Returns ``n`` (0-dim, float64) and the
    ``(C,)`` mean and variance in ``x``'s dtype.
    """
    x64 = x.double()
    C = x64.sum(dims).numel()
    count = x64.new_full((1,), x.numel() // C)
    stats = torch.cat((count, x64.sum(dims), x64.square().sum(dims)))  # (1 + 2C,)
    stats = _summed_over(stats, group)
    n = stats[0]
    mean = stats[1 : C + 1] / n
    var = (stats[C + 1 :] / n - mean.square()).clamp_min_(0.0)
    return n, mean.to(x.dtype), var.to(x.dtype)


def _affine_parameters(module: nn.Module, shape, affine: bool, bias: bool, factory: dict) -> None:
    """A gain (ones) and a bias (zeros) of ``shape`` on ``module``: None where left out."""
    gain = nn.Parameter(torch.ones(shape, **factory)) if affine else None
    module.register_parameter("weight", gain)
    module.register_parameter(
        "bias", nn.Parameter(torch.zeros(shape, **factory)) if gain is not None and bias else None
    )


def _running_buffers(module: nn.Module, C: int, track: bool, factory: dict) -> None:
    """``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked`` (0) of
    ``C`` channels on ``module``, or None for each without ``track``: torch's buffers."""
    module.register_buffer("running_mean", torch.zeros(C, **factory) if track else None)
    module.register_buffer("running_var", torch.ones(C, **factory) if track else None)
    count = torch.tensor(0, dtype=torch.long, device=factory["device"]) if track else None
    module.register_buffer("num_batches_tracked", count)


def running_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    r"""The eval-mode map :math:`x \mapsto s x + t` of a normalization with running
    statistics, per channel: :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}`,
    :math:`t = \beta - \mu s` (without a gain or a bias, :math:`\gamma = 1`, :math:`\beta = 0`).
    """
    scale = torch.rsqrt(norm.running_var + norm.eps)  # (C,)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


class _NormBase(nn.Module):
    """What BatchNorm and InstanceNorm share, as torch's ``_NormBase``: the gain and the bias,
    the running-statistics buffers, and torch's state-dict version."""

    _version = 2  # torch's _NormBase version, so state dict metadata matches

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        device=None,
        dtype=None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        _affine_parameters(self, num_features, affine, bias, factory)
        _running_buffers(self, num_features, track_running_stats, factory)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # as torch does: state dicts saved before version 2 lack num_batches_tracked
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class _BatchNorm(_NormBase):
    r"""What every BatchNorm shares; the subclasses say which input ranks they take.

    In training mode each channel is normalized with the mean and the biased
    variance of the batch (over every dimension but the channel), then scaled
    and shifted:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    and the running statistics move towards the batch's, not by backprop:
    ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased variance. ``momentum=None`` gives the cumulative average
    (``momentum = 1 / num_batches_tracked``). In eval mode the running
    statistics replace the batch's, so one example at a time works. With
    ``track_running_stats=False`` the batch statistics are used in both modes.
    A batch of no examples gives an empty output and leaves the statistics as
    they are, as torch's does.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance for numerical stability.
        momentum: the running-statistics factor, or ``None`` for a cumulative average.
        affine: learn a gain :math:`\gamma` (ones) and a bias :math:`\beta` (zeros).
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` buffers.
        bias: learn :math:`\beta` (with ``affine``); ``False`` keeps the gain alone.
        channels_last: the channel is the input's last dimension, not its second.
    """

    ranks: tuple[int, ...] = ()  # the input ranks a subclass takes
    shapes = ""  # and how its error message names them, C the channels

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        )
        self.channels_last = channels_last

    @property
    def channel_dim(self) -> int:
        return -1 if self.channels_last else 1

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self.ranks or x.size(self.channel_dim) != self.num_features:
            C = self.num_features
            shapes = f"(N, *, {C})" if self.channels_last else self.shapes.format(C=C)
            raise ValueError(
                f"{type(self).__name__} expected input of shape {shapes}, "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )

    def _group(self):
        """The process group whose values make up the batch (SyncBatchNorm), or None."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        channel_dim = self.channel_dim % x.dim()  # non-negative: the kernel takes it as an index
        if not (self.training or not self.track_running_stats):  # eval: running statistics
            shape = _stat_shape(x, channel_dim)
            scale, shift = running_affine(self)
            return torch.addcmul(shift.view(shape), x, scale.view(shape))

        tracking = self.training and self.track_running_stats
        weight, bias = self.weight, self.bias
        stats = (self.running_mean, self.running_var) if tracking else (None, None)
        group = self._group()
        per_channel = x.numel() // x.size(channel_dim) if x.numel() else 0  # values per channel
        if group is None and per_channel > 1 and kernel.applies(x, weight, bias, *stats):
            # the same math in C++, which also counts the batch, and differentiates twice
            counter = self.num_batches_tracked if tracking else None
            args = (counter, self.momentum, self.eps, channel_dim)
            return kernel.ops().batch_norm(x, weight, bias, *stats, *args)

        running = None
        if tracking:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            running = (*stats, factor)
        if group is None:
            if x.numel() == 0:  # no examples: no statistics, as torch
                return (
                    x * weight.view(_stat_shape(x, channel_dim))
                    if weight is not None
                    else x.clone()
                )
            if per_channel <= 1:
                raise ValueError(
                    f"{type(self).__name__} needs at least 2 values per channel in a training "
                    f"batch, got input of shape {tuple(x.shape)}; put the model in eval mode "
                    "(model.eval()) to run single examples with the running statistics"
                )
        args = (self.eps, running, group, channel_dim)
        if second_order():  # BatchNormFunction's backward has no derivative
            return batch_norm_twice_differentiable(x, weight, bias, *args)
        return BatchNormFunction.apply(x, weight, bias, *args)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2-D or 3-D input (Ioffe & Szegedy 2015); see ``_BatchNorm``.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``; with ``channels_last``, ``(N, L, C)``,
          normalized over ``(N, L)``
        - Output: same shape as the input

    Example:
        >>> BatchNorm1d(100)(torch.randn(32, 100)).shape
        torch.Size([32, 100])
        >>> BatchNorm1d(24, channels_last=True)(torch.randn(32, 8, 24)).shape  # (B, T, C)
        torch.Size([32, 8, 24])
    """

    ranks = (2, 3)
    shapes = "(N, {C}) or (N, {C}, L)"


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4-D input, per channel over ``(N, H, W)``; see ``_BatchNorm``.

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: same shape as the input

    Example:
        >>> BatchNorm2d(16)(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    ranks = (4,)
    shapes = "(N, {C}, H, W)"


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5-D input, per channel over ``(N, D, H, W)``; see
    ``_BatchNorm``.

    Shape:
        - Input: ``(N, C, D, H, W)``
        - Output: same shape as the input

    Example:
        >>> BatchNorm3d(4)(torch.randn(2, 4, 3, 5, 5)).shape
        torch.Size([2, 4, 3, 5, 5])
    """

    ranks = (5,)
    shapes = "(N, {C}, D, H, W)"


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the values of every process (any rank), on any backend.

    Under ``torch.distributed`` with more than one process in ``process_group``,
    the batch is the union of every process's values: one all-reduce of the
    count, sums and sums of squares (in float64) in the forward pass, one of the
    two sums in the backward pass. So N processes compute what one process
    computes on the whole batch, the running statistics stay equal on every
    process, and a process may hold any number of examples, none included.
    Without a process group it is a plain BatchNorm. Unlike torch's, it runs on
    the CPU (gloo) as on CUDA (NCCL).

    Args:
        process_group: the processes to combine (default: all of them).
        The others as for ``BatchNorm1d``.

    Shape:
        - Input: ``(N, C, *)``; with ``channels_last``, ``(N, *, C)``
        - Output: same shape as the input

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> SyncBatchNorm.convert_sync_batchnorm(model)[1]
        SyncBatchNorm(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """

    ranks = (2, 3, 4, 5)
    shapes = "(N, {C}, *)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            channels_last=channels_last,
        )
        self.process_group = process_group

    def _group(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every BatchNorm (normlab's or torch's) made a ``SyncBatchNorm`` that
        holds the same parameters and buffers; the module itself if it is one. As
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""
        converted = module
        torch_batchnorm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if isinstance(module, _BatchNorm | nn.modules.batchnorm._BatchNorm):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None or not module.affine,
                channels_last=False if torch_batchnorm else module.channels_last,
            )
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


convert_sync_batchnorm = SyncBatchNorm.convert_sync_batchnorm
