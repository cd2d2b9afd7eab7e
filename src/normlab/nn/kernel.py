"""normlab's C++ kernels for the CPU (``csrc/``), where they were built: BatchNorm, and the
diagnostics' statistics.

``torch.ops.normlab.batch_norm`` is ``BatchNormFunction``'s training-mode math
(the batch's statistics, the running statistics and the batch count, the
closed-form backward, and that backward's own, ``BatchNormBackward``'s) as
one operator with its autograd nodes in C++: a dozen ATen operators' overhead,
which dominates at the sizes these networks have, becomes one call each way.
Its sums run over blocks of values in the input's dtype and in float64 across
blocks, in one fixed order per channel whatever the thread count.

``torch.ops.normlab.copy_moments``, ``moments``, ``output_summary``, ``spread``,
``param_spread`` and ``batchnorm_drift`` (``csrc/stats.cpp``) compute a recording's statistics
for a whole list of tensors in one call each, a tensor measured whole before the next
(``normlab.diagnostics.stats``). All but ``copy_moments`` (whose list of copies inductor cannot
return) have fake kernels, their outputs' shapes and dtypes, so a traced step can call them and
inductor compile it (``normlab.lm.compiled``'s recording graph).

``pip install --no-build-isolation`` builds them against the installed torch
(``setup.py``; the Makefile does so). An install without them, a library that does
not load against this torch or a BatchNorm operator built from other sources (with one
line that says so), or ``NORMLAB_BATCHNORM_KERNEL=0`` (``NORMLAB_STATS_KERNEL=0``) in the
environment leave BatchNorm (the statistics) on the ATen operators, which also serve every
other device and dtype, SyncBatchNorm, and whatever traces the model (``torch.compile``,
``make_fx``, export).
"""

import functools
import importlib.util
import os

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64)
# the operator's arguments, as BatchNorm calls it
ARGUMENTS = [
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "momentum",
    "eps",
    "channel_dim",
]


@functools.cache
def library() -> bool:
    """Load the kernels' library (``torch.ops.normlab``) once: False where there is none, or
    it does not load against this torch (one line says so)."""
    spec = importlib.util.find_spec("normlab.nn._kernels_cpu")
    if spec is None or spec.origin is None:
        return False
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:  # built against another torch: dlopen's one line says why
        print(f"normlab: the C++ kernels did not load ({e}); everything runs on ATen operators")
        return False
    return True


@functools.cache
def ops():
    """BatchNorm's operator (``torch.ops.normlab``), or None where there is no kernel."""
    if os.environ.get("NORMLAB_BATCHNORM_KERNEL", "1") == "0" or not library():
        return None
    arguments = [a.name for a in torch.ops.normlab.batch_norm.default._schema.arguments]
    if arguments != ARGUMENTS:  # a build left from other sources (setup.py build_ext --inplace)
        print(
            "normlab: BatchNorm's C++ kernel is out of date (rebuild it: pip install "
            "--no-build-isolation -e .); it runs on ATen operators"
        )
        return None
    return torch.ops.normlab


@functools.cache
def stats_ops():
    """The statistics' operators (``torch.ops.normlab``), or None where there is no kernel."""
    if os.environ.get("NORMLAB_STATS_KERNEL", "1") == "0" or not library():
        return None
    if not hasattr(torch.ops.normlab, "moments"):  # a library built before them
        return None
    _register_fakes()
    return torch.ops.normlab


def _register_fakes() -> None:
    """The statistics' fake kernels: what each returns, for tracers (``make_fx``, inductor).
    Each measures a list of G tensors into float64 moments (G, 4) or columns (K, G), float32
    ranges (G,) and float32 counts (G, bins), on the CPU."""

    def f64(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=torch.float64)

    def f32(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=torch.float32)

    def output_summary(xs, mid, half, end, floor, units, positions, saturation, q, *bins_sample):
        _fine_bins, bins, _sample = bins_sample
        # (5 + P, G) columns: mean, std, range, saturated, dead, then each percentile
        return f64(5 + len(q), len(xs)), f32(len(xs), bins)

    fakes = {
        "moments": lambda xs: f64(len(xs), 4),
        "spread": lambda xs, bins, sample: (f64(len(xs), 4), f32(len(xs)), f32(len(xs), bins)),
        "param_spread": lambda before, params, grads, bins, sample: (
            f64(len(before), 4),
            f64(len(before), 4),
            f32(len(before)),
            f32(len(before), bins),
        ),
        "batchnorm_drift": lambda xs, means, variances, eps: f64(len(xs), 2),
        "output_summary": output_summary,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"normlab::{name}")(fake)


def traced(x: Tensor) -> bool:
    """Whether ``x`` is being traced (``make_fx``, ``torch.compile``, export) rather than
    computed: a fake or proxy tensor, a dispatch mode that records operators, or a compile
    under way."""
    return type(x) is not Tensor or _recording_modes() or torch.compiler.is_compiling()


def _recording_modes() -> bool:
    """A dispatch mode is active that records operators: any but those that declare
    ``computes_as_is`` (they watch the operators run, as the diagnostics' ``KeepAsIs``)."""
    if torch._C._len_torch_dispatch_stack() == 0:
        return False
    modes = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
    return any(not getattr(mode, "computes_as_is", False) for mode in modes)


def applies(x: Tensor, weight, bias, running_mean, running_var) -> bool:
    """Whether the kernel computes BatchNorm of ``x`` with these parameters and running
    statistics (each may be None): a contiguous CPU tensor in float32 or float64, the others
    contiguous and of its dtype, a bias only with a gain, and nothing tracing (the kernel is
    opaque to tracers, the ATen operators are not). Anything else takes the ATen operators."""
    return (
        x.is_cpu
        and x.dtype in DTYPES
        and x.is_contiguous()
        and _like(weight, x)
        and _like(bias, x)
        and _like(running_mean, x)
        and _like(running_var, x)
        and (weight is not None or bias is None)
        and not traced(x)
        and ops() is not None
    )


def _like(t: Tensor | None, x: Tensor) -> bool:
    """``t`` is absent, or contiguous and of ``x``'s dtype."""
    return t is None or (t.dtype == x.dtype and t.is_contiguous())
