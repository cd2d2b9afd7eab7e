"""BatchNorm statistics after training: exact calibration over a data set, and folding.

``calibrate_batchnorm`` is the lecture's post-training calibration done exactly:
every BatchNorm layer gets the population mean and variance of its input over
the whole data set, layer by layer in forward order. ``fold_batchnorm`` turns
each ``Linear → BatchNorm1d`` pair into one ``Linear`` for inference.
"""

import contextlib
import copy
import itertools

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from normlab import nn as nl
from normlab.nn import set_mode

BATCHNORM_TYPES = (nl.BatchNorm1d, nn.modules.batchnorm._BatchNorm)
LINEAR_TYPES = (nl.Linear, nn.Linear)


class _StopForward(Exception):
    """Raised from a hook once the layer being calibrated has seen its input."""


class _MomentAccumulator:
    """Per-feature count, mean and sum of squared deviations, merged batch by batch in float64.

    Chan et al.'s parallel update keeps the variance exact without the
    cancellation of ``E[x²] - E[x]²``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().double()
        dims = (0,) if x.dim() == 2 else (0, 2)
        n = x.numel() // x.size(1)
        mean = x.mean(dims)  # (C,)
        m2 = ((x - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dims)  # (C,)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def variance(self) -> Tensor:
        return self.m2 / self.count  # the population (biased) variance


def batchnorm_layers(model: nn.Module, example: Tensor) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` in the order its forward pass runs them."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, _args: order.append(m) if m not in order else None)
        for m in model.modules()
        if isinstance(m, BATCHNORM_TYPES)
    ]
    try:
        with set_mode(model, training=False), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return order


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    inputs: Tensor,
    batch_size: int = 4096,
    progress: bool | None = None,
) -> list[nn.Module]:
    r"""Set every BatchNorm's running statistics to the exact population statistics of ``inputs``.

    For each BatchNorm layer, in forward order, the whole data set is passed
    through the model in eval mode (so every upstream BatchNorm already uses its
    calibrated statistics) and the layer's input moments are accumulated in
    float64:

    .. math::
        \mu = \frac{1}{N}\sum_i x_i, \qquad \sigma^2 = \frac{1}{N}\sum_i (x_i - \mu)^2

    ``running_mean ← μ`` and ``running_var ← σ²``, the population variance: the
    statistics a single batch holding all of ``inputs`` would normalize with, so
    eval-mode outputs equal train-mode outputs on that one full batch. (Unlike
    ``torch.optim.swa_utils.update_bn``, upstream layers are not left in train
    mode while a layer is measured.) The model's train/eval mode is restored.

    Args:
        model: any module whose BatchNorm layers track running statistics.
        inputs: the data set, ``(N, *)``, passed to ``model`` in slices.
        batch_size: the slice size; it changes speed, not the result.
        progress: show a tqdm bar (``None``: only for long passes on a terminal).

    Returns:
        The calibrated BatchNorm layers, in forward order.

    Example:
        >>> from normlab.nn import BatchNorm1d
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), BatchNorm1d(8))
        >>> X = torch.randn(1000, 4)
        >>> _ = calibrate_batchnorm(model, X, batch_size=256)
        >>> torch.allclose(model.eval()(X), model.train()(X), atol=1e-5)
        True
    """
    if len(inputs) == 0:
        raise ValueError("calibrate_batchnorm needs a non-empty data set")
    layers = batchnorm_layers(model, inputs[:2])
    untracked = [m for m in layers if m.running_mean is None]
    if untracked:
        raise ValueError(
            f"{len(untracked)} BatchNorm layer(s) have track_running_stats=False: "
            "nothing to calibrate"
        )
    n_batches = (len(inputs) + batch_size - 1) // batch_size
    # tqdm's disable=None shows the bar only on a terminal
    long_pass = len(layers) * n_batches > 50
    disable = (None if long_pass else True) if progress is None else not progress
    with set_mode(model, training=False):
        bar = tqdm(total=len(layers) * n_batches, desc="calibrate", unit="batch", disable=disable)
        for layer in layers:
            acc = _MomentAccumulator()

            def measure(_m, args, acc=acc):
                acc.add(args[0])
                raise _StopForward  # the rest of the forward pass is not needed

            hook = layer.register_forward_pre_hook(measure)
            try:
                for start in range(0, len(inputs), batch_size):
                    with contextlib.suppress(_StopForward):
                        model(inputs[start : start + batch_size])
                    bar.update()
            finally:
                hook.remove()
            layer.running_mean.copy_(acc.mean)
            layer.running_var.copy_(acc.variance())
        bar.close()
    return layers


def _fold(linear: nn.Module, bn: nn.Module) -> nl.Linear:
    """One Linear equal to ``bn(linear(x))`` in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = linear.bias if linear.bias is not None else torch.zeros_like(bn.running_mean)
    shift = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    W = linear.weight
    folded = nl.Linear(  # zeros_: the values are set below, and no random numbers are drawn
        linear.in_features, linear.out_features, init=nn.init.zeros_, device=W.device, dtype=W.dtype
    )
    with torch.no_grad():
        folded.weight.copy_(W * scale.unsqueeze(1))  # (out, in) * (out, 1)
        folded.bias.copy_(shift)
    return folded


def _fold_children(module: nn.Module) -> None:
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in itertools.pairwise(names):
            linear, bn = module._modules[a], module._modules[b]
            if (
                isinstance(linear, LINEAR_TYPES)
                and isinstance(bn, BATCHNORM_TYPES)
                and bn.running_mean is not None
                and bn.num_features == linear.out_features
            ):
                module._modules[a] = _fold(linear, bn)
                module._modules[b] = nn.Identity()
    for child in module.children():
        _fold_children(child)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    r"""Return an eval-mode copy of ``model`` with each ``Linear → BatchNorm1d`` pair folded.

    With the BatchNorm's running statistics :math:`\mu, \sigma^2`, gain
    :math:`\gamma` and bias :math:`\beta`, the pair becomes

    .. math::
        W' = W \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        b' = (b - \mu)\frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta

    as ``torch.nn.utils.fusion.fuse_linear_bn_eval`` does; the BatchNorm becomes
    ``nn.Identity``. Pairs are found as consecutive children of ``nn.Sequential``
    containers (normlab's or torch's Linear and BatchNorm1d, 2-D activations);
    a BatchNorm without running statistics is left as it is. ``model`` itself is
    not changed.

    Example:
        >>> from normlab.nn import BatchNorm1d
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchNorm1d(8)).eval()
        >>> folded = fold_batchnorm(model)
        >>> folded
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): Identity()
        )
        >>> X = torch.randn(16, 4)
        >>> torch.allclose(folded(X), model(X), atol=1e-6)
        True
    """
    folded_model = copy.deepcopy(model).eval()
    _fold_children(folded_model)
    return folded_model
