"""Layers written by hand, as ``torch.nn.Module``s with torch's names, shapes and state dicts.

Batch normalization is the heart of normlab: ``batchnorm`` writes out its
training-mode forward and its closed-form backward once, for every rank and
layout, and every layer matches its ``torch.nn`` counterpart in outputs,
gradients, running statistics, buffers and ``state_dict`` keys, so state dicts
load both ways. Beside the layers: their *kinds*, which LSUV and the
diagnostics go by (``kinds``), and ``set_mode`` and ``kept_buffers`` (``mode``).

The modules: ``linear``, ``batchnorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``),
``instancenorm`` (``InstanceNorm1d/2d``), ``normalization`` (``LayerNorm``,
``GroupNorm``), ``activation`` (``Tanh``, ``ReLU``), ``flatten``
(``FlattenContext``, ``FlattenConsecutive``), ``kinds`` and ``mode``; ``kernel``
runs BatchNorm's training-mode math as one C++ operator on the CPU.
"""

from normlab.nn.activation import ReLU, Tanh
from normlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormFunction,
    SyncBatchNorm,
    batch_norm_twice_differentiable,
    convert_sync_batchnorm,
    twice_differentiable,
)
from normlab.nn.flatten import FlattenConsecutive, FlattenContext
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d
from normlab.nn.kinds import (
    ACTIVATIONS,
    NORMALIZATIONS,
    SATURATION,
    WEIGHTED,
    BatchNormForm,
    Kind,
    batchnorm_form,
    batchnorm_training,
    is_batchnorm,
    layer_kind,
    register_batchnorm,
    register_kind,
)
from normlab.nn.linear import Linear
from normlab.nn.mode import kept_buffers, set_mode
from normlab.nn.normalization import GroupNorm, LayerNorm

__all__ = [
    "ACTIVATIONS",
    "NORMALIZATIONS",
    "SATURATION",
    "WEIGHTED",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormForm",
    "BatchNormFunction",
    "FlattenConsecutive",
    "FlattenContext",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "Kind",
    "LayerNorm",
    "Linear",
    "ReLU",
    "SyncBatchNorm",
    "Tanh",
    "batch_norm_twice_differentiable",
    "batchnorm_form",
    "batchnorm_training",
    "convert_sync_batchnorm",
    "is_batchnorm",
    "kept_buffers",
    "layer_kind",
    "register_batchnorm",
    "register_kind",
    "set_mode",
    "twice_differentiable",
]
