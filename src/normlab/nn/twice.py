r"""Training-mode batch normalization whose backward has a derivative of its own: what a
Hessian-vector product through a BatchNorm needs (``normlab.curvature``).

``BatchNormFunction``'s backward is written once and has no derivative. Here the backward is
an autograd Function of its own, ``BatchNormBackward``, with the backward's backward in
closed form. The C++ kernel (``csrc/batchnorm.cpp``) computes the same math where it applies
(the CPU, float32 and float64), as one call each way; these ATen operators serve the rest.
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
implementations to torch's own double backward, in float32 and float64.
"""

import contextlib
from contextvars import ContextVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_SECOND_ORDER = ContextVar("normlab_batchnorm_second_order", default=False)


@contextlib.contextmanager
def twice_differentiable():
    """Within it, normlab's BatchNorms that the C++ kernel does not compute (another device or
    dtype, SyncBatchNorm's processes aside) compute in training mode with
    ``batch_norm_twice_differentiable``, instead of ``BatchNormFunction``, whose backward has no
    derivative of its own. The outputs are the same to rounding."""
    token = _SECOND_ORDER.set(True)
    try:
        yield
    finally:
        _SECOND_ORDER.reset(token)


def second_order() -> bool:
    """Whether BatchNorms compute with ``batch_norm_twice_differentiable`` here."""
    return _SECOND_ORDER.get()


def batch_norm_twice_differentiable(
    x, weight, bias, eps: float, running, group=None, channel_dim: int = 1
):
    r"""``BatchNormFunction``'s forward, :math:`y = \gamma \hat{x} + \beta`, with the same
    arguments and running statistics, whose backward has a derivative of its own (the
    module's docstring). One process only: there is no second derivative across processes."""
    if group is not None:
        raise ValueError("SyncBatchNorm has no second derivative across processes")
    return BatchNormTwice.apply(x, weight, bias, eps, running, channel_dim % x.dim())


class _Layout:
    """Where a channel's values lie in ``x``: the dimensions its sums run over, the shape a
    per-channel (C,) tensor takes to broadcast against ``x``, and the count ``n``."""

    def __init__(self, x: Tensor, channel_dim: int) -> None:
        self.dims = tuple(d for d in range(x.dim()) if d != channel_dim)
        self.shape = [1] * x.dim()
        self.shape[channel_dim] = x.size(channel_dim)
        self.n = x.numel() // x.size(channel_dim)

    def mean(self, t: Tensor) -> Tensor:
        """(C,): ``t``'s mean over each channel's values."""
        return t.sum(self.dims) * (1.0 / self.n)

    def wide(self, c: Tensor) -> Tensor:
        """A per-channel (C,) tensor, shaped to broadcast against the input."""
        return c.view(self.shape)


class BatchNormTwice(torch.autograd.Function):
    """``BatchNormFunction``'s forward; its backward is ``BatchNormBackward``, which autograd
    differentiates again."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, running, channel_dim: int):
        at = _Layout(x, channel_dim)
        mean = at.mean(x)  # (C,)
        x_centered = x - at.wide(mean)
        var = at.mean(x_centered.square())  # (C,), biased
        invstd = (var + eps).rsqrt_()  # r, (C,)
        x_hat = x_centered * at.wide(invstd)
        y = x_hat if weight is None else x_hat * at.wide(weight)
        if bias is not None:
            y = y + at.wide(bias)
        if running is not None:
            running_mean, running_var, factor = running
            running_mean.lerp_(mean, factor)
            running_var.lerp_(var * (at.n / (at.n - 1)), factor)
        ctx.save_for_backward(x, weight, x_hat, invstd)
        ctx.at, ctx.affine = at, (weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, x_hat, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = BatchNormBackward.apply(
            grad_y, x, weight, x_hat, invstd, ctx.at
        )
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
    """``(g, x, γ) -> (g_x, g_γ, g_β)``, the first backward, as a function autograd can
    differentiate: its backward is the second derivative in closed form. ``x_hat`` and
    ``invstd`` are the forward's, saved: their dependence on ``x`` is in that closed form."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, x_hat, invstd, at: _Layout):
        grad_bias = grad_y.sum(at.dims)  # Σ g, (C,)
        grad_weight = (grad_y * x_hat).sum(at.dims)  # Σ g x̂, (C,)
        scale = invstd if weight is None else invstd * weight  # γ r
        # γ r (g - ḡ - x̂ m₁)
        grad_x = torch.addcmul(
            at.wide(grad_bias * (-1.0 / at.n)), x_hat, at.wide(grad_weight * (-1.0 / at.n))
        )
        grad_x = grad_x.add_(grad_y).mul_(at.wide(scale))
        ctx.save_for_backward(grad_y, weight, x_hat, invstd, grad_bias, grad_weight)
        ctx.at = at
        ctx.set_materialize_grads(False)  # an output nothing used: None, not a tensor of zeros
        return grad_x, grad_weight, grad_bias

    @staticmethod
    @once_differentiable
    def backward(ctx, u, u_weight, u_bias):
        grad_y, weight, x_hat, invstd, sum_g, sum_g_xhat = ctx.saved_tensors
        at = ctx.at
        n = at.n
        r = invstd
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
        return grad_grad_y, grad_x, grad_weight, None, None, None
