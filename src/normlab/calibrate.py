"""BatchNorm statistics after training: exact calibration over a data set, for any model.

``calibrate_batchnorm`` is the lecture's post-training calibration done
exactly: every BatchNorm layer (of any rank, normlab's or torch's) gets the
population mean and variance of its input over the whole data set, layer by
layer in forward order, with the layers before it already calibrated. Under
``torch.distributed`` the statistics are those of every process's data
together. Folding BatchNorms into their neighbours for inference is
``normlab.fold``.
"""

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from normlab.dataflow import (
    Batch,
    StopForward,
    call_model,
    forward_until_stopped,
    trace_dataflow,
)
from normlab.errors import first_line
from normlab.nn import batchnorm_training, is_batchnorm, set_mode


class _MomentAccumulator:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64.

    Chan et al.'s parallel update keeps the variance exact without the
    cancellation of ``E[x²] - E[x]²``; the same update merges processes.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor, channel_dim: int) -> None:
        x = x.detach().double()
        dims = tuple(d for d in range(x.dim()) if d != channel_dim % x.dim())
        n = x.numel() // x.size(channel_dim)
        if n == 0:
            return
        mean = x.mean(dims)  # (C,)
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        m2 = ((x - mean.view(shape)) ** 2).sum(dims)  # (C,)
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if n == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def merge_processes(self, group=None) -> None:
        """Every process's counts and moments merged, in rank order, on every process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
            return
        C = torch.tensor([0 if self.mean is None else self.mean.numel()])
        dist.all_reduce(C, op=dist.ReduceOp.MAX, group=group)
        mine = torch.zeros(1 + 2 * int(C), dtype=torch.float64)
        if self.mean is not None:
            mine = torch.cat((mine.new_tensor([self.count]), self.mean.cpu(), self.m2.cpu()))
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        device = None if self.mean is None else self.mean.device
        self.count, self.mean, self.m2 = 0, None, None
        for row in everyone:
            c = int(C)
            self.merge(int(row[0]), row[1 : 1 + c].to(device), row[1 + c :].to(device))

    def variance(self) -> Tensor:
        return self.m2 / self.count  # the population (biased) variance


def _batches(data: Tensor | Iterable[Batch], batch_size: int) -> Iterable[Batch]:
    if isinstance(data, Tensor):
        return (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    return data


def _channel_dim(layer: nn.Module) -> int:
    return -1 if getattr(layer, "channels_last", False) else 1


def _forward_passes(
    model: nn.Module, data, batch_size: int, forward_fn: Callable
) -> Iterator[tuple[int, Batch]]:
    """Run ``forward_fn(model, batch)`` on every batch, naming the batch the model rejects."""
    for i, batch in enumerate(_batches(data, batch_size)):
        try:
            forward_until_stopped(forward_fn, model, batch)
        except Exception as e:
            reason = first_line(e)
            raise ValueError(f"calibrate_batchnorm: the model rejected batch {i}: {reason}") from e
        yield i, batch


def batchnorm_layers(
    model: nn.Module, data, batch_size: int = 4096, forward_fn: Callable = call_model
) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` in the order its forward pass runs them on the first
    batch of ``data`` (a tensor, or an iterable of batches); ``[]`` for no data."""
    first = next(iter(_batches(data, batch_size)), None)
    if first is None:
        return []
    with set_mode(model, training=False):
        try:
            flow = trace_dataflow(model, first, forward_fn, is_layer=_keeps_statistics)
        except Exception as e:
            reason = first_line(e)
            raise ValueError(f"calibrate_batchnorm: the model rejected batch 0: {reason}") from e
    modules = dict(model.named_modules())
    return [modules[name] for name in flow.order]


def _keeps_statistics(module: nn.Module) -> bool:
    """A BatchNorm whose running statistics are its own to track (not a frozen one)."""
    return is_batchnorm(module) and hasattr(module, "track_running_stats")


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    batch_size: int = 4096,
    forward_fn: Callable[[nn.Module, Batch], object] = call_model,
    progress: bool | None = None,
) -> list[nn.Module]:
    r"""Set every BatchNorm's running statistics to the exact population statistics of ``data``.

    For each BatchNorm layer, in forward order, the data set is passed through
    the model in eval mode (so every upstream BatchNorm already uses its
    calibrated statistics) up to that layer, and its input's moments per
    channel, over every other dimension, are accumulated in float64:

    .. math::
        \mu = \frac{1}{N}\sum_i x_i, \qquad \sigma^2 = \frac{1}{N}\sum_i (x_i - \mu)^2

    ``running_mean ← μ`` and ``running_var ← σ²``, the population variance: the
    statistics a single batch holding all of ``data`` would normalize with, so
    eval-mode outputs equal train-mode outputs on that one batch. (Unlike
    ``torch.optim.swa_utils.update_bn``, upstream layers are not left in train
    mode while a layer is measured.)

    Cost: where ``data`` is one batch, one forward pass for every layer at once:
    with the BatchNorms in training mode (and every other layer in eval mode), each
    normalizes with its input's own statistics, which are the population statistics
    once those before it are, so one pass measures every layer's input as the
    layer-by-layer passes would (to float rounding). Over several batches, one pass
    over the data per BatchNorm, each stopping at the layer it measures: for L
    layers, at most L forward passes. Exactness needs them: a layer's input depends
    on the statistics of the BatchNorms before it, which are known only once all the
    data has passed through those. Under ``torch.distributed``
    every process passes its own data, and the counts and moments of every
    process are merged after each layer, so every process gets the statistics
    of all the data, whatever each holds. If any batch fails, the model's
    statistics are put back as they were. The model's train/eval modes are restored.

    Args:
        model: any module with BatchNorm layers (normlab's or torch's, any rank,
            ``SyncBatchNorm`` included) that track running statistics.
        data: a tensor ``(N, *)``, passed to ``model`` in slices of ``batch_size``;
            or any iterable of batches, such as a ``DataLoader``. A batch that is a
            tensor is passed as ``model(batch)``, a tuple or list as
            ``model(*batch)``, a dict as ``model(**batch)``.
        batch_size: the slice size for a tensor; it changes speed, not the result.
        forward_fn: ``forward_fn(model, batch)`` runs a batch, for models called
            some other way (say, ``lambda m, b: m(b[0])`` for ``(inputs, labels)`` pairs).
        progress: show a tqdm bar (``None``: only for long passes on a terminal).

    Returns:
        The calibrated BatchNorm layers, in forward order.

    Raises:
        ValueError: the model has no BatchNorm, one has no running statistics, the
            data set is empty, or the model rejects a batch (the message names it).

    Example:
        >>> from normlab.nn import BatchNorm2d
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), BatchNorm2d(8))
        >>> X = torch.randn(64, 3, 8, 8)
        >>> _ = calibrate_batchnorm(model, X, batch_size=16)
        >>> torch.allclose(model.eval()(X), model.train()(X), atol=1e-5)
        True
    """
    if not isinstance(data, Tensor) and iter(data) is data:
        raise ValueError(
            "calibrate_batchnorm passes over the data once per BatchNorm: give a tensor, a "
            "list or a DataLoader, not an iterator"
        )
    layers = batchnorm_layers(model, data, batch_size, forward_fn)
    if not layers:
        if next(iter(_batches(data, batch_size)), None) is None:
            raise ValueError("calibrate_batchnorm needs a non-empty data set")
        raise ValueError("calibrate_batchnorm: the model runs no BatchNorm layer")
    names = {m: n for n, m in model.named_modules()}
    untracked = [names[m] for m in layers if m.running_mean is None]
    if untracked:
        raise ValueError(
            f"calibrate_batchnorm: BatchNorm {', '.join(untracked)} has "
            "track_running_stats=False: no running statistics to calibrate"
        )
    saved = [[t.clone() for t in _statistics(m)] for m in layers]
    batches = list(itertools.islice(_batches(data, batch_size), 2))
    if len(batches) == 1 and not _distributed():
        if _in_one_pass(model, layers, batches[0], forward_fn):
            return layers
        _put_back(layers, saved)  # what the failed pass moved; the layer passes say why
    try:
        with set_mode(model, training=False):
            for layer in tqdm(layers, desc="calibrate", unit="layer", disable=_quiet(progress)):
                _calibrate_layer(model, layer, data, batch_size, forward_fn, names[layer])
    except BaseException:  # never half calibrated
        _put_back(layers, saved)
        raise
    return layers


def _statistics(layer: nn.Module) -> list[Tensor]:
    """What calibration and a training-mode pass may change: the running statistics and count."""
    counted = [layer.num_batches_tracked] if layer.num_batches_tracked is not None else []
    return [layer.running_mean, layer.running_var, *counted]


def _put_back(layers: list[nn.Module], saved: list[list[Tensor]]) -> None:
    for layer, before in zip(layers, saved, strict=True):
        for t, value in zip(_statistics(layer), before, strict=True):
            t.copy_(value)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _in_one_pass(model, layers, batch, forward_fn) -> bool:
    """Calibrate every layer from one training-mode pass over ``batch``, the whole data set
    (see ``calibrate_batchnorm``'s cost); False where the pass fails (a channel of one
    value, which training mode refuses), the layers' statistics then as the pass left them."""
    accumulators = {layer: _MomentAccumulator() for layer in layers}

    def measure(layer, args):
        accumulators[layer].add(args[0], _channel_dim(layer))

    counts = [layer.num_batches_tracked.clone() for layer in layers]
    hooks = [layer.register_forward_pre_hook(measure) for layer in layers]
    try:
        with batchnorm_training(model):
            forward_fn(model, batch)
    except Exception:
        return False
    finally:
        for hook in hooks:
            hook.remove()
    for layer, acc, count in zip(layers, accumulators.values(), counts, strict=True):
        layer.num_batches_tracked.copy_(count)  # the pass counted one batch; calibration none
        layer.running_mean.copy_(acc.mean)
        layer.running_var.copy_(acc.variance())
    return True


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: a bar only on a terminal


def _calibrate_layer(model, layer, data, batch_size, forward_fn, name: str) -> None:
    """Measure ``layer``'s input over the data set and set its running statistics."""
    acc = _MomentAccumulator()

    def measure(_m, args):
        acc.add(args[0], _channel_dim(layer))
        raise StopForward  # the rest of the forward pass is not needed

    hook = layer.register_forward_pre_hook(measure)
    try:
        for _ in _forward_passes(model, data, batch_size, forward_fn):
            pass
    finally:
        hook.remove()
    acc.merge_processes(getattr(layer, "process_group", None))
    if acc.count == 0:
        raise ValueError(f"calibrate_batchnorm: the data set never reached BatchNorm {name}")
    layer.running_mean.copy_(acc.mean)
    layer.running_var.copy_(acc.variance())
