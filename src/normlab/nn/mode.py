"""A block of code with a model in another state, then the model as it was: ``set_mode`` (train
or eval mode), ``kept_buffers`` (running statistics a block may move)."""

import contextlib
from collections.abc import Iterator

from torch import nn


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
    # setting a module's attribute costs about a microsecond (nn.Module.__setattr__): a model
    # already in the mode, the common case, is left alone, and only what moved is restored
    if any(training_before != training for _, training_before in modes):
        module.train(training)
    try:
        yield module
    finally:
        for m, training_before in modes:
            if m.training != training_before:
                m.training = training_before


@contextlib.contextmanager
def kept_buffers(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with every buffer of ``module`` (running statistics, counts) swapped for a
    copy, which the block's forward passes may move; the module's own buffers are back
    afterwards, untouched, also when the block raises. Swapping, not copying the old values
    back in place, leaves alone the tensors that autograd saved for a later backward (torch's
    BatchNorm saves its running statistics for its double backward).

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with kept_buffers(bn):
        ...     _ = bn(torch.randn(8, 2) + 5)
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    owned = [
        (m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None
    ]
    for m, name, b in owned:
        m._buffers[name] = b.detach().clone()
    try:
        yield module
    finally:
        for m, name, b in owned:
            m._buffers[name] = b
