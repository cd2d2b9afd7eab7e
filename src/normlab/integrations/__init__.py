"""normlab's diagnostics inside other trainers, as optional extras.

- ``normlab.integrations.lightning.DiagnosticsCallback`` for ``lightning.Trainer``
  (``pip install 'normlab[lightning]'``);
- ``normlab.integrations.transformers.DiagnosticsCallback`` for ``transformers.Trainer``
  (``pip install 'normlab[transformers]'``).

Each records every N optimizer steps, and every M the second-order statistics
(``normlab.second_order``: sharpness, Hessian trace, gradient noise scale) into that
recording; logs the scalars (and, to TensorBoard, the histograms) through the trainer's own
loggers, prints the verdicts and writes ``report.html`` at the end of training.
``Recorder`` is what they share.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from normlab.auditor import Audit
from normlab.diagnostics import (
    Diagnostics,
    SecondOrderStats,
    Snapshot,
    Thresholds,
    judge_recording,
)
from normlab.second_order import measure_second_order


class Recorder:
    """Recordings every ``every_n_steps`` optimizer steps, and the report at the end.

    A trainer's callback arms it before a step's forward pass (``arm``) and
    collects the recording after the optimizer's step, before the gradients are
    zeroed (``collect``). On the steps of every ``second_order_every`` (0: never) it
    measures the second-order statistics first (``measure``), on the step's batch, and the
    recording carries them.
    """

    def __init__(
        self,
        every_n_steps: int,
        thresholds: Thresholds | None,
        keep: int,
        second_order_every: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if second_order_every < 0:
            raise ValueError(f"second_order_every must be 0 or more, got {second_order_every}")
        self.every_n_steps = every_n_steps
        self.second_order_every = second_order_every
        self.thresholds = thresholds
        self.keep = keep
        self.diagnostics: Diagnostics | None = None
        self.step = 0  # the optimizer step being recorded
        self._second_order: SecondOrderStats | None = None  # measured for the armed step

    def start(self, model: nn.Module) -> None:
        self.diagnostics = Diagnostics(model, keep=self.keep)

    def measures_second_order_at(self, step: int) -> bool:
        every = self.second_order_every
        return self.diagnostics is not None and every > 0 and step % every == 0

    def arm(self, step: int) -> None:
        """Record the step about to run, if ``step`` is one of every ``every_n_steps`` (or of
        every ``second_order_every``)."""
        records = step % self.every_n_steps == 0 or self.measures_second_order_at(step)
        if self.diagnostics is not None and records:
            self.diagnostics.arm()
            self.step = step

    def measure(
        self,
        model: nn.Module,
        loss_fn: Callable,
        batch,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """The second-order statistics of ``loss_fn(model, batch)`` before the step about to
        run, for its recording; call it after ``arm`` on the steps it measures."""
        self._second_order = measure_second_order(model, loss_fn, batch, optimizer)

    def collect(self, loss: float | None = None) -> Snapshot | None:
        """The armed step's recording (None if none was armed)."""
        if self.diagnostics is None or not self.diagnostics.armed:
            return None
        snapshot = self.diagnostics.collect(self.step, loss)
        snapshot.second_order, self._second_order = self._second_order, None
        return snapshot

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
