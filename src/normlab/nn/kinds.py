"""The kind of every layer the tools recognize, normlab's and torch's: what LSUV and the
diagnostics go by."""

from torch import nn

from normlab.nn.activation import ReLU, Tanh
from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.instancenorm import _InstanceNorm
from normlab.nn.linear import Linear
from normlab.nn.normalization import GroupNorm, LayerNorm

# What a layer does, for the tools that treat layers by kind (diagnostics, LSUV); the first
# match wins. A layer of no kind is passed over.
KINDS: tuple[tuple[str, tuple[type[nn.Module], ...]], ...] = (
    ("tanh", (nn.Tanh, Tanh)),
    ("sigmoid", (nn.Sigmoid,)),
    ("relu", (nn.ReLU, ReLU)),
    ("batchnorm", (_BatchNorm, nn.modules.batchnorm._BatchNorm)),
    (
        "norm",
        (
            LayerNorm,
            GroupNorm,
            _InstanceNorm,
            nn.LayerNorm,
            nn.GroupNorm,
            nn.modules.instancenorm._InstanceNorm,
        ),
    ),
    ("linear", (Linear, nn.Linear)),
    ("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
)
ACTIVATIONS = ("tanh", "sigmoid", "relu")  # the kinds that are nonlinearities
NORMALIZATIONS = ("batchnorm", "norm")  # the kinds that divide out their input's scale
WEIGHTED = ("linear", "conv")  # the kinds whose weights initializers such as LSUV set


def layer_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` (see ``KINDS``), or None for a layer of no known kind.

    Example:
        >>> layer_kind(torch.nn.Tanh()), layer_kind(Linear(3, 4)), layer_kind(torch.nn.Flatten())
        ('tanh', 'linear', None)
    """
    for kind, types in KINDS:
        if isinstance(module, types):
            return kind
    return None
