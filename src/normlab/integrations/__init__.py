"""normlab's diagnostics inside other trainers, as optional extras.

- ``normlab.integrations.lightning.DiagnosticsCallback`` for ``lightning.Trainer``
  (``pip install 'normlab[lightning]'``);
- ``normlab.integrations.transformers.DiagnosticsCallback`` for ``transformers.Trainer``
  (``pip install 'normlab[transformers]'``).

Each records every N optimizer steps, logs the scalars (and, to TensorBoard, the
histograms) through the trainer's own loggers, prints the verdicts and writes
``report.html`` at the end of training. ``Recorder`` is what they share.
"""

from pathlib import Path

from torch import nn

from normlab.auditor import Audit
from normlab.diagnostics import Diagnostics, Snapshot, Thresholds, judge_recording


class Recorder:
    """Recordings every ``every_n_steps`` optimizer steps, and the report at the end.

    A trainer's callback arms it before a step's forward pass (``arm``) and
    collects the recording after the optimizer's step, before the gradients are
    zeroed (``collect``).
    """

    def __init__(self, every_n_steps: int, thresholds: Thresholds | None, keep: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.thresholds = thresholds
        self.keep = keep
        self.diagnostics: Diagnostics | None = None
        self.step = 0  # the optimizer step being recorded

    def start(self, model: nn.Module) -> None:
        self.diagnostics = Diagnostics(model, keep=self.keep)

    def arm(self, step: int) -> None:
        """Record the step about to run, if ``step`` is one of every ``every_n_steps``."""
        if self.diagnostics is not None and step % self.every_n_steps == 0:
            self.diagnostics.arm()
            self.step = step

    def collect(self, loss: float | None = None) -> Snapshot | None:
        """The armed step's recording (None if none was armed)."""
        if self.diagnostics is None or not self.diagnostics.armed:
            return None
        return self.diagnostics.collect(self.step, loss)

    def finish(self, path: Path, title: str) -> Audit | None:
        """Print the last recording's verdicts and write the report to ``path``."""
        if self.diagnostics is None or not self.diagnostics.history:
            return None
        result = Audit(
            judge_recording(self.diagnostics, thresholds=self.thresholds), self.diagnostics, title
        )
        fired = [f"{v.kind} ({v.layer}): {v.message}" for v in result.verdicts]
        print(
            f"normlab diagnostics at step {result.report.snapshot.step:,}: "
            + ("; ".join(fired) or "no verdict fired")
        )
        result.to_html(path)
        print(f"normlab diagnostics report: {path}")
        return result
