"""Layers written by hand, as ``torch.nn.Module``s with torch's names, shapes and state dicts.

``BatchNorm1d`` is the heart of normlab: its training-mode forward and its
closed-form backward are written out below, and it matches
``torch.nn.BatchNorm1d`` in every observable way (outputs, gradients, running
statistics, buffers and ``state_dict`` keys), so state dicts load both ways.

Below the layers: the *kind* of every layer the tools recognize (ours and
torch's), which LSUV and the diagnostics go by, and ``set_mode``, which runs a
block of code in train or eval mode and then puts every submodule back.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab import init as nl_init

# ---------------------------------------------------------------------------- Linear


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


# ---------------------------------------------------------------------------- BatchNorm


class BatchNormFunction(torch.autograd.Function):
    r"""Training-mode batch normalization of ``(n, C)`` with its closed-form backward.

    Forward, per feature over the ``n`` rows of the batch:

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

    ``running`` is ``None`` or ``(running_mean, running_var, factor)``: those
    buffers move towards the batch statistics in place (the unbiased variance,
    as torch does), outside of autograd.

    With a process ``group``, the batch is the union of every rank's rows: the
    statistics and the two sums of the backward are all-reduced (``n`` is then
    the global count), so every rank computes what one process would compute
    on the whole batch, and the running statistics stay identical on every rank.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, running, group=None):
        if group is None:
            n = x.size(0)
            mean = x.sum(0) * (1.0 / n)  # (C,); sum·(1/n) is one op fewer than mean() on CPU
            x_centered = x - mean  # (n, C)
            # two passes (mean, then squared deviations): no E[x²] - E[x]² cancellation,
            # and on CPU much faster than torch.var_mean along the batch axis
            var = x_centered.square().sum(0) * (1.0 / n)  # (C,), biased
        else:
            n, mean, var = _global_moments(x, group)  # over the rows of every rank
            x_centered = x - mean  # (n_local, C)
        invstd = (var + eps).rsqrt_()  # (C,)
        if weight is None:
            scale, y = invstd, x_centered * invstd
        else:
            scale = invstd * weight  # γ / σ
            y = torch.addcmul(bias, x_centered, scale)  # (n, C)
        if running is not None:
            running_mean, running_var, factor = running
            running_mean.lerp_(mean, factor)
            running_var.lerp_(var * (n / (n - 1)), factor)
        ctx.save_for_backward(x_centered, invstd, scale)
        ctx.n, ctx.group = n, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x_centered, invstd, scale = ctx.saved_tensors
        grad_bias = grad_y.sum(0)  # Σ g, (C,)
        grad_weight = (grad_y * x_centered).sum(0) * invstd  # Σ g·x̂, (C,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            sum_g, sum_g_xhat = grad_bias, grad_weight
            if ctx.group is not None:  # the sums over every rank's rows; the parameter
                # gradients stay this rank's own share (DDP sums those)
                C = grad_bias.size(0)
                sums = torch.cat((grad_bias, grad_weight))  # (2C,)
                dist.all_reduce(sums, group=ctx.group)
                sum_g, sum_g_xhat = sums[:C], sums[C:]
            # (γ/σ)(g - Σg/n - x̂·Σg·x̂/n) with x̂ = (x - μ)/σ, as two fused passes
            minus_scale_n = scale * (-1.0 / ctx.n)
            grad_x = torch.addcmul(
                minus_scale_n * sum_g, x_centered, minus_scale_n * invstd * sum_g_xhat
            )
            grad_x.addcmul_(grad_y, scale)
        grad_weight = grad_weight if ctx.needs_input_grad[1] else None
        grad_bias = grad_bias if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


def _global_moments(x: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    r"""Count, mean and biased variance of each feature over the rows of every rank in ``group``.

    One all-reduce of :math:`(n, \sum x, \sum x^2)` per call, summed in float64 so that
    :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2` loses nothing that float32 inputs carry. A rank
    may hold any number of rows, none included. Returns ``n`` (0-dim, float64) and the
    ``(C,)`` mean and variance in ``x``'s dtype.
    """
    C = x.size(1)
    x64 = x.double()  # (n_local, C)
    count = x64.new_full((1,), x.size(0))
    stats = torch.cat((count, x64.sum(0), x64.square().sum(0)))  # (1 + 2C,)
    dist.all_reduce(stats, group=group)
    n = stats[0]
    mean = stats[1 : C + 1] / n
    var = (stats[C + 1 :] / n - mean.square()).clamp_min_(0.0)
    return n, mean.to(x.dtype), var.to(x.dtype)


class BatchNorm1d(nn.Module):
    r"""Batch normalization over a 2-D or 3-D input (Ioffe & Szegedy 2015).

    In training mode each feature is normalized with the mean and the biased
    variance of the batch (and length), then scaled and shifted:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    and the running statistics move towards the batch's, not by backprop:
    ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased variance. ``momentum=None`` gives the cumulative average
    (``momentum = 1 / num_batches_tracked``). In eval mode the running
    statistics replace the batch's, so one example at a time works. With
    ``track_running_stats=False`` the batch statistics are used in both modes.

    Args:
        num_features: ``C``, the number of features.
        eps: added to the variance for numerical stability.
        momentum: the running-statistics factor, or ``None`` for a cumulative average.
        affine: learn a gain :math:`\gamma` (ones) and a bias :math:`\beta` (zeros).
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` buffers.
        sync: under ``torch.distributed``, combine the statistics of every rank.
        process_group: the ranks to combine over (default: all of them).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``
        - Output: same shape as the input

    Example:
        >>> bn = BatchNorm1d(100)
        >>> bn(torch.randn(32, 100)).shape
        torch.Size([32, 100])
    """

    _version = 2  # torch's _NormBase version, so state dict metadata matches

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.sync = sync
        self.process_group = process_group
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in (2, 3) or x.size(1) != self.num_features:
            raise ValueError(
                f"BatchNorm1d expected input of shape (N, {self.num_features}) or "
                f"(N, {self.num_features}, L), got {x.dim()}D input of shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.dim() == 3:  # (N, C, L): every (example, position) is one row of features
            N, C, L = x.shape
            rows = x.transpose(1, 2).reshape(N * L, C)  # (N·L, C)
            return self._normalize_rows(rows).view(N, L, C).transpose(1, 2).contiguous()
        return self._normalize_rows(x)

    def _normalize_rows(self, x: Tensor) -> Tensor:
        """The forward pass on (n, C): the feature statistics are over the n rows."""
        if not (self.training or not self.track_running_stats):  # eval: running statistics
            scale = torch.rsqrt(self.running_var + self.eps)  # (C,)
            if self.weight is not None:
                scale = scale * self.weight
            shift = -self.running_mean * scale
            if self.bias is not None:
                shift = shift + self.bias
            return torch.addcmul(shift, x, scale)

        group = self._sync_group()
        if group is None and x.size(0) <= 1:
            raise ValueError(
                f"BatchNorm1d needs at least 2 values per feature in a training batch, got input "
                f"of shape {tuple(x.shape)}; put the model in eval mode (model.eval()) to run "
                "single examples with the running statistics"
            )
        running = None
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            running = (self.running_mean, self.running_var, factor)
        return BatchNormFunction.apply(x, self.weight, self.bias, self.eps, running, group)

    def _sync_group(self):
        """The process group whose rows make up the batch, or None for this process's alone."""
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

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


# ---------------------------------------------------------------------------- LayerNorm, GroupNorm


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
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

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
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

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
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


# ---------------------------------------------------------------------------- small pieces


class Tanh(nn.Module):
    """Elementwise ``tanh``; saturated units (``|t|`` near 1) pass almost no gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class ReLU(nn.Module):
    """Elementwise ``max(x, 0)``; a unit that is never positive passes no gradient (dead)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class FlattenContext(nn.Module):
    """Concatenate the embeddings of a context window: ``(B, T, C) -> (B, T * C)``."""

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T * C)


# ---------------------------------------------------------------------------- layer kinds

# What a layer does, for the tools that treat layers by kind (diagnostics, LSUV); the first
# match wins. A layer of no kind is passed over.
KINDS: tuple[tuple[str, tuple[type[nn.Module], ...]], ...] = (
    ("tanh", (nn.Tanh, Tanh)),
    ("sigmoid", (nn.Sigmoid,)),
    ("relu", (nn.ReLU, ReLU)),
    ("batchnorm", (BatchNorm1d, nn.modules.batchnorm._BatchNorm)),
    ("norm", (LayerNorm, GroupNorm, nn.LayerNorm, nn.GroupNorm)),
    ("linear", (Linear, nn.Linear)),
)
ACTIVATIONS = ("tanh", "sigmoid", "relu")  # the kinds that are nonlinearities
NORMALIZATIONS = ("batchnorm", "norm")  # the kinds that divide out their input's scale


def layer_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` (see ``KINDS``), or None for a layer of no known kind.

    Example:
        >>> layer_kind(torch.nn.Tanh()), layer_kind(BatchNorm1d(3)), layer_kind(torch.nn.Flatten())
        ('tanh', 'batchnorm', None)
    """
    for kind, types in KINDS:
        if isinstance(module, types):
            return kind
    return None


# ---------------------------------------------------------------------------- modes


@contextlib.contextmanager
def set_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run a block with ``module`` in train (``True``) or eval mode, then restore every
    submodule's own mode, also when the block raises.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
        >>> with set_mode(model, training=False):
        ...     model[1].training
        False
        >>> model[1].training
        True
    """
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, training_before in modes:
            m.training = training_before
