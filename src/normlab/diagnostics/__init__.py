"""Per-layer health of activations and gradients, for any ``torch.nn.Module``.

What the makemore lecture looks at by hand, measured on one training step:

- every layer's output: mean, std, percentiles, a histogram; the saturated
  fraction of tanh (``|t| > 0.97``) and sigmoid outputs; the dead fraction of
  ReLU units (never positive over the batch);
- the gradient of every layer's output: mean, std, a histogram;
- every parameter: grad std, the grad:data ratio, and the update:data ratio
  measured from the parameter's actual change across the optimizer step, so it
  is right for Adam as for SGD;
- every BatchNorm: how far its running statistics are from the batch's.

Usage::

    diag = Diagnostics(model)          # diag.arm() attaches hooks, diag.collect() removes them
    diag.arm()                         # the next training-mode forward/backward is recorded
    loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
    diag.collect(step, loss.item())
    print(format_table(judge_recording(diag, num_classes=27)))

The modules, in the order they build on each other: ``snapshot`` (what a
recording holds), ``stats`` (the tensor statistics, computed on the device and
brought to the host in one transfer per recording), ``recorder`` (the hooks),
``rules`` (the verdicts' rules and thresholds, and judging) and ``table`` (the text).
"""

from normlab.diagnostics.recorder import Diagnostics
from normlab.diagnostics.rules import (
    Report,
    Thresholds,
    Verdict,
    judge,
    judge_recording,
    stability_line,
    verdicts,
)
from normlab.diagnostics.snapshot import (
    BatchNormStats,
    LayerStats,
    ParamStats,
    SecondOrderStats,
    Snapshot,
    finite,
    snapshot_from_dict,
    snapshot_to_dict,
    update_history,
)
from normlab.diagnostics.table import format_table

__all__ = [
    "BatchNormStats",
    "Diagnostics",
    "LayerStats",
    "ParamStats",
    "Report",
    "SecondOrderStats",
    "Snapshot",
    "Thresholds",
    "Verdict",
    "finite",
    "format_table",
    "judge",
    "judge_recording",
    "snapshot_from_dict",
    "snapshot_to_dict",
    "stability_line",
    "update_history",
    "verdicts",
]
