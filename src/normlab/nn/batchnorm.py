"""Batch normalization of every rank and layout, on one hand-written autograd Function.

``BatchNormFunction`` normalizes each channel over every other dimension of its
input: the batch, and the length or the pixels. ``BatchNorm1d``, ``2d`` and
``3d`` differ only in the ranks they accept; ``channels_last=True`` takes the
channel from the last dimension instead of the second, so ``(B, T, C)``
sequences normalize over ``(B, T)`` (makemore part 5's layout).
``SyncBatchNorm`` takes its statistics over the rows of every process, on any
backend (gloo on the CPU too); ``convert_sync_batchnorm`` swaps it in for
normlab's BatchNorms and torch's. Every module has torch's constructor, buffers,
``state_dict`` keys and version, so state dicts load both ways. Within
``twice_differentiable()`` (``normlab.curvature``), ``BatchNormTwice`` runs the same math with
a backward that autograd differentiates again (``BatchNormBackward``).
"""

import contextlib
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.nn import kernel


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
        out = _normalized(x, weight, bias, eps, running, group, channel_dim % x.dim())
        ctx.save_for_backward(out.x_centered, out.invstd, out.scale)
        ctx.at, ctx.group = out.at, group
        return out.y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x_centered, invstd, scale = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _gradients(
            grad_y, x_centered, invstd, scale, ctx.at, ctx.group, ctx.needs_input_grad[0]
        )
        grad_weight = grad_weight if ctx.needs_input_grad[1] else None
        grad_bias = grad_bias if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


class _Layout(NamedTuple):
    """Where a channel's values lie in the input: the dimensions its sums run over, the shape a
    per-channel (C,) tensor takes to broadcast against it, and the count ``n`` (over every
    rank's values, with a process group)."""

    dims: tuple[int, ...]
    shape: list[int]
    n: int | Tensor

    def mean(self, t: Tensor) -> Tensor:
        """(C,): ``t``'s mean over each channel's values (on this process)."""
        return t.sum(self.dims) * (1.0 / self.n)

    def wide(self, c: Tensor) -> Tensor:
        """A per-channel (C,) tensor, shaped to broadcast against the input."""
        return c.view(self.shape)


class _Normalized(NamedTuple):
    """``_normalized``'s output ``y`` and what its backward reads."""

    y: Tensor
    x_centered: Tensor  # x - μ
    invstd: Tensor  # 1/σ, (C,)
    scale: Tensor  # γ/σ, (C,)
    at: _Layout


def _normalized(x, weight, bias, eps: float, running, group, channel_dim: int) -> _Normalized:
    """``BatchNormFunction``'s forward math (``channel_dim`` non-negative), outside of autograd;
    moves the running statistics."""
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
    return _Normalized(y, x_centered, invstd, scale, _Layout(dims, shape, n))


def _gradients(grad_y, x_centered, invstd, scale, at: _Layout, group, input_grad: bool):
    """``BatchNormFunction``'s backward math: the gradients of x (None without
    ``input_grad``), γ and β (each process's own share, with a ``group``)."""
    dims, shape = at.dims, at.shape
    grad_bias = grad_y.sum(dims)  # Σ g, (C,)
    grad_weight = (grad_y * x_centered).sum(dims) * invstd  # Σ g·x̂, (C,)
    grad_x = None
    if input_grad:
        sum_g, sum_g_xhat = grad_bias, grad_weight
        if group is not None:  # the sums over every rank's values; the parameter
            # gradients stay this rank's own share (the data-parallel step sums those)
            C = grad_bias.size(0)
            sums = _summed_over(torch.cat((grad_bias, grad_weight)), group)
            sum_g, sum_g_xhat = sums[:C], sums[C:]  # (C,) each
        # (γ/σ)(g - Σg/n - x̂·Σg·x̂/n) with x̂ = (x - μ)/σ, as two fused passes
        minus_scale_n = scale * (-1.0 / at.n)
        grad_x = torch.addcmul(
            (minus_scale_n * sum_g).view(shape),
            x_centered,
            (minus_scale_n * invstd * sum_g_xhat).view(shape),
        )
        grad_x.addcmul_(grad_y, scale.view(shape))
    return grad_x, grad_weight, grad_bias


_SECOND_ORDER = ContextVar("normlab_batchnorm_second_order", default=False)


@contextlib.contextmanager
def twice_differentiable():
    """Within it, normlab's BatchNorms that the C++ kernel does not compute (another device or
    dtype) compute in training mode with ``batch_norm_twice_differentiable``, instead of
    ``BatchNormFunction``, whose backward has no derivative of its own: what a Hessian-vector
    product needs (``normlab.curvature``). The outputs are the same to rounding."""
    token = _SECOND_ORDER.set(True)
    try:
        yield
    finally:
        _SECOND_ORDER.reset(token)


def batch_norm_twice_differentiable(
    x, weight, bias, eps: float, running, group=None, channel_dim: int = 1
):
    r"""``BatchNormFunction`` with a backward that has a derivative of its own
    (``BatchNormBackward``): the same arguments, outputs and running statistics. One process
    only: there is no second derivative across processes."""
    if group is not None:
        raise ValueError("SyncBatchNorm has no second derivative across processes")
    return BatchNormTwice.apply(x, weight, bias, eps, running, channel_dim % x.dim())


class BatchNormTwice(torch.autograd.Function):
    """``BatchNormFunction``'s forward; its backward is ``BatchNormBackward``, which autograd
    differentiates again."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, running, channel_dim: int):
        out = _normalized(x, weight, bias, eps, running, None, channel_dim)
        ctx.save_for_backward(x, weight, out.x_centered, out.invstd, out.scale)
        ctx.at, ctx.affine = out.at, (weight is not None, bias is not None)
        return out.y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *saved = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = BatchNormBackward.apply(grad_y, x, weight, *saved, ctx.at)
        has_weight, has_bias = ctx.affine
        return (
            grad_x,
            grad_weight if has_weight else None,
            grad_bias if has_bias else None,
            None,
            None,
            None,
        )


class BatchNormBackward(torch.autograd.Function):
    r"""``(g, x, γ) -> (g_x, g_γ, g_β)``, ``BatchNormFunction``'s backward as a function that
    autograd can differentiate: its own backward is the second derivative in closed form. The
    C++ kernel computes the same math where it applies (``csrc/batchnorm.cpp``,
    ``backward_backward``), as one call; these ATen operators serve the rest.

    Per channel, over its :math:`n` values, with :math:`\hat{x} = (x - \mu) r`,
    :math:`r = (\sigma^2 + \epsilon)^{-1/2}` and the first backward

    .. math::
        g_\beta = \sum g, \quad g_\gamma = \sum g\hat{x}, \quad
        g_x = \gamma r \left(g - \bar{g} - \hat{x}\,m_1\right), \quad
        \bar{g} = \tfrac{1}{n}\textstyle\sum g, \quad m_1 = \tfrac{1}{n}\textstyle\sum g\hat{x},

    the backward of :math:`\langle u, g_x\rangle + u_\gamma g_\gamma + u_\beta g_\beta` (the
    cotangents :math:`u, u_\gamma, u_\beta` of the three) is, with
    :math:`m_2 = \tfrac{1}{n}\sum u\hat{x}`, :math:`\bar{u} = \tfrac{1}{n}\sum u` and
    :math:`s = \tfrac{1}{n}\sum ug - \bar{g}\bar{u} - m_1 m_2`:

    .. math::
        \frac{\partial}{\partial g} &= u_\beta + u_\gamma \hat{x}
            + \gamma r \left(u - \bar{u} - \hat{x}\,m_2\right), \qquad
        \frac{\partial}{\partial \gamma} = n\,r\,s, \\
        \frac{\partial}{\partial x} &= r\left(a - \bar{a} - \hat{x}\,\overline{a\hat{x}}\right)
            - \gamma r^2 \hat{x}\, s, \qquad
        a = u_\gamma g - \gamma r \left(u\,m_1 + g\,m_2\right),

    the last through :math:`\partial\hat{x}_i/\partial x_j = r(\delta_{ij} - \tfrac{1}{n} -
    \hat{x}_i\hat{x}_j/n)` and :math:`\partial r/\partial x_j = -r^2\hat{x}_j/n`. Every mean
    above is a sum over the channel's values, so the whole second derivative is two reads of the
    data for its sums and one for each gradient. ``tests/test_curvature.py`` holds both
    implementations to torch's own double backward, in float32 and float64. ``x_centered`` and
    ``invstd`` are the forward's, saved: their dependence on ``x`` is in that closed form.
    """

    @staticmethod
    def forward(ctx, grad_y, x, weight, x_centered, invstd, scale, at: _Layout):
        grad_x, grad_weight, grad_bias = _gradients(
            grad_y, x_centered, invstd, scale, at, None, True
        )
        ctx.save_for_backward(grad_y, weight, x_centered, invstd, grad_bias, grad_weight)
        ctx.at = at
        ctx.set_materialize_grads(False)  # an output nothing used: None, not a tensor of zeros
        return grad_x, grad_weight, grad_bias

    @staticmethod
    @once_differentiable
    def backward(ctx, u, u_weight, u_bias):
        grad_y, weight, x_centered, invstd, sum_g, sum_g_xhat = ctx.saved_tensors
        at = ctx.at
        n, r = at.n, invstd
        x_hat = x_centered * at.wide(r)
        gamma_r = r if weight is None else r * weight  # γ r, (C,)
        g_mean, m1 = sum_g * (1.0 / n), sum_g_xhat * (1.0 / n)  # ḡ, m₁
        if u is None:
            u = torch.zeros_like(grad_y)
        u_mean, m2, ug_mean = at.mean(u), at.mean(u * x_hat), at.mean(u * grad_y)  # ū, m₂
        s = ug_mean - g_mean * u_mean - m1 * m2  # (C,)
        # ∂/∂g = u_β + u_γ x̂ + γ r (u - ū - x̂ m₂)
        grad_grad_y = torch.addcmul(at.wide(-u_mean), x_hat, at.wide(-m2)).add_(u)
        grad_grad_y.mul_(at.wide(gamma_r))
        if u_weight is not None:
            grad_grad_y.addcmul_(x_hat, at.wide(u_weight))
        if u_bias is not None:
            grad_grad_y.add_(at.wide(u_bias))
        # a = u_γ g - γ r (u m₁ + g m₂), and its channel means ā and (a x̂)‾ from the sums
        a = torch.addcmul(u * at.wide(-gamma_r * m1), grad_y, at.wide(-gamma_r * m2))
        a_mean = -gamma_r * (m1 * u_mean + m2 * g_mean)
        a_xhat_mean = -2.0 * gamma_r * m1 * m2
        if u_weight is not None:
            a.addcmul_(grad_y, at.wide(u_weight))
            a_mean = a_mean + u_weight * g_mean
            a_xhat_mean = a_xhat_mean + u_weight * m1
        # ∂/∂x = r (a - ā - x̂ (a x̂)‾) - γ r² x̂ s
        x_hat_coeff = r * a_xhat_mean + gamma_r * r * s
        grad_x = a.sub_(at.wide(a_mean)).mul_(at.wide(r))
        grad_x.addcmul_(x_hat, at.wide(-x_hat_coeff))
        grad_weight = n * r * s if weight is not None else None  # ∂/∂γ = n r s
        return grad_grad_y, grad_x, grad_weight, None, None, None, None


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
        if _SECOND_ORDER.get():  # BatchNormFunction's backward has no derivative
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
