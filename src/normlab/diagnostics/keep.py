"""Tensors kept as a hook saw them, copied only when something is about to write them.

The recorder measures the layers' outputs after the step, a group at a time,
but the forward pass may write an output in place before then: torchvision's
``ReLU(inplace=True)`` after a BatchNorm, a residual ``out += identity``, a
squeeze-excite ``x.mul_(gate)``. Copying every output at its hook would double
the activations' memory on every recording; ``KeepAsIs`` copies only the ones
that are written. It is a ``TorchDispatchMode`` over the forward pass: before
any operation whose schema marks an argument as written (``relu_``, ``add_``,
``copy_``, an ``out=`` argument: ``alias_info.is_write``) writes memory that a
kept tensor shares, that tensor is copied, and the copy is what the store holds.
A write that no mode saw (after the forward pass) moves the tensor's version counter, which
``overwritten`` reports, so a corrupted value is never measured silently.

Watching costs a Python call on every operation of the forward pass, which on a model of
many small layers is as much again as the pass itself. A model's forward pass writes the same
outputs in place every time, so the recorder watches a model's first recording only, learns
from ``copied`` which outputs were written, and on later recordings copies exactly those at
their hooks (``keep(..., copy=True)``) with no mode at all; the version counters still catch
an output that a later pass wrote and the first did not.
"""

from collections.abc import MutableMapping

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_WRITES: dict = {}  # operator → ((position, name) of each argument it writes)


def _written(func) -> tuple[tuple[int, str], ...]:
    writes = _WRITES.get(func)
    if writes is None:
        writes = tuple(
            (i, a.name)
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
        _WRITES[func] = writes
    return writes


def _storage(t: Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # no storage of its own (a wrapper subclass)
        return None


class KeepAsIs(TorchDispatchMode):
    """Keeps ``store[key] = tensor`` as ``tensor`` is now, through later in-place writes seen
    while the mode is active."""

    computes_as_is = True  # it only watches: BatchNorm's C++ kernel still runs under it

    def __init__(self) -> None:
        super().__init__()
        self._watched: dict = {}  # storage → [(store, key)]
        self._versions: dict = {}  # (id(store), key) → the version counter when kept
        self.copied: list = []  # (store, key) of each tensor copied before a write it watched

    def keep(
        self, store: MutableMapping, key, tensor: Tensor, copy: bool = False, watch: bool = True
    ) -> None:
        """Set ``store[key] = tensor``, to stay as it is now: copied now with ``copy``, else
        watched while the mode is active (``watch=False``: it will not be active, and only the
        version counter keeps watch)."""
        if copy:
            tensor = tensor.clone()
        elif watch:
            storage = _storage(tensor)
            if storage is None:  # nothing to watch: copy now
                tensor = tensor.clone()
            else:
                self._watched.setdefault(storage, []).append((store, key))
        store[key] = tensor
        self._versions[(id(store), key)] = tensor._version

    def overwritten(self, store: MutableMapping) -> list:
        """The keys of ``store`` whose tensors were written since they were kept, unseen."""
        return [
            key
            for key, t in store.items()
            if self._versions.get((id(store), key), t._version) != t._version
        ]

    def forget(self) -> None:
        self._watched, self._versions, self.copied = {}, {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._watched:
            for position, name in _written(func):
                arg = args[position] if position < len(args) else kwargs.get(name)
                for t in arg if isinstance(arg, list | tuple) else (arg,):  # _foreach_*_ ops
                    if isinstance(t, Tensor):
                        self._copy_before_write(t)
        return func(*args, **kwargs)

    def _copy_before_write(self, t: Tensor) -> None:
        for store, key in self._watched.pop(_storage(t), ()):
            copy = store[key].clone()  # dispatched below this mode: no recursion
            store[key] = copy
            self._versions[(id(store), key)] = copy._version
            self.copied.append((store, key))
