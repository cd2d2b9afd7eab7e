"""``gc_paused``: a block of code with Python's cyclic garbage collector off."""

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Run a block with the cyclic garbage collector off, then turn it back on if it was on.

    A recording makes thousands of short-lived containers on a model of many layers (a
    Python tensor for each layer's output, gradient and running statistics, each
    parameter's copy, the snapshot's rows), which reference counting frees. Each few hundred
    of them set off a collection, and those that survive it feed the next full one, which
    walks every object the process holds: in a process that has imported torchvision, timm
    or transformers, hundreds of thousands, for nothing to free. Paused, the collector
    counts only what outlives the block.

    Example:
        >>> import gc
        >>> with gc_paused():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
