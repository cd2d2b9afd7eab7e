"""``set_mode``: a block of code in train or eval mode, then every submodule as it was."""

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
    module.train(training)
    try:
        yield module
    finally:
        for m, training_before in modes:
            m.training = training_before
