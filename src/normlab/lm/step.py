"""One training step: the only place where a batch becomes an update.

``normlab train``, ``experiment``, ``bench`` and ``diagnose`` all train through
``TrainStep``: forward, loss, backward, the optimizer's update (BatchNorm's
running statistics move in the forward pass), the weights' moving average,
and on request a diagnostics recording. The step itself is one function,
``CompiledStep._gradients`` (``normlab.lm.compiled``): traced and compiled unless
``--no-compile``, which runs it as it is, on the parameters themselves.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.diagnostics import Diagnostics, SecondOrderStats, Snapshot
from normlab.diagnostics.recorder import Measured
from normlab.lm.compiled import CompiledStep
from normlab.lm.distributed import SINGLE, Ranks, broadcast_state
from normlab.lm.model import LanguageModel


@dataclass
class Recording:
    """A step's recording, measured (``CompiledStep.record``) and not yet made into its
    Snapshot: ``take`` makes it, into the recorder's history."""

    recorder: Diagnostics
    measured: Measured
    index: int  # the step it recorded
    loss: float  # the mean loss of this process's rows
    eval_loss: float
    second_order: SecondOrderStats | None = None  # measured before the step, where it was

    def take(self) -> Snapshot:
        snapshot = self.recorder.take(self.measured, self.index, self.loss, self.eval_loss)
        snapshot.second_order = self.second_order
        return snapshot


@dataclass
class StepResult:
    loss: Tensor  # this process's share of the global batch's mean loss (0-dim, on the device)
    snapshot: Snapshot | None  # the recording, on a recording step (None with take=False)
    recording: Recording | None = None  # with take=False, the recording, to take later


class TrainStep:
    """``step(x, y, lr, recorder=None, index=0) -> StepResult``: one optimizer step on a batch.

    Each process's loss is its rows' summed cross-entropy over the *global*
    batch size, so on one process it is the batch mean, and with the gradients
    summed over the processes the gradient is the global batch's exactly, also
    with unequal slices.

    Args:
        model: the model to train.
        optimizer: its optimizer (``normlab.lm.optim.make_optimizer``).
        batch_size: the global batch size.
        ranks: this process's place among several.
        averaged: a moving average of the weights to update after every step, or None.
        compile: trace and compile the step (``CompiledStep``), or run it as it is.
        compile_recordings: with ``compile``, recordings too, as a graph of their own where
            they can (``CompiledStep.record``): for a run that records often enough to repay
            the compile.

    Example:
        >>> from normlab.lm.config import ModelConfig, TrainConfig
        >>> from normlab.lm.optim import make_optimizer
        >>> model = LanguageModel(ModelConfig(block_size=3, n_layer=2, n_hidden=16), verbose=False)
        >>> optimizer = make_optimizer(model, TrainConfig())
        >>> step = TrainStep(model, optimizer, batch_size=32, compile=False)
        >>> x, y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
        >>> result = step(x, y, lr=0.1)
        >>> result.loss.shape, result.snapshot
        (torch.Size([]), None)
    """

    def __init__(
        self,
        model: LanguageModel,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        ranks: Ranks = SINGLE,
        averaged: torch.optim.swa_utils.AveragedModel | None = None,
        compile: bool = True,
        compile_recordings: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.averaged = averaged
        if ranks.distributed:  # as DDP's constructor: every rank starts from rank 0's state
            broadcast_state(model)
        group = dist.group.WORLD if ranks.distributed else None
        # the step itself: one function, traced and compiled unless compile=False
        self.core = CompiledStep(
            model,
            optimizer,
            compile,
            batch_size=batch_size,
            group=group,
            compile_recordings=compile_recordings,
        )
        self.distributed = ranks.distributed

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        lr: float,
        recorder: Diagnostics | None = None,
        index: int = 0,
        recording_step: bool = False,
        take: bool = True,
    ) -> StepResult:
        """Train on the batch ``(x, y)`` with learning rate ``lr``; with ``recorder``, record the
        step into it as step ``index`` (``CompiledStep.record``), and ``take`` its Snapshot, or
        leave that to the caller (``StepResult.recording``). Under several processes rank 0
        alone records, untraced, and the others pass ``recording_step`` on its recording
        steps, so that they run the step untraced too and their collectives match."""
        snapshot = recording = None
        if recorder is not None:
            loss, eval_loss, measured = self.core.record(x, y, lr, recorder)
            rows_loss = self._rows_loss(loss, len(x))
            recording = Recording(recorder, measured, index, rows_loss, float(eval_loss))
            if take:
                snapshot, recording = recording.take(), None
        elif recording_step and self.distributed:  # rank 0 records, untraced
            loss = self.core.untraced(x, y, lr).loss
        else:
            loss = self.core(x, y, lr)
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        return StepResult(loss, snapshot, recording)

    def _rows_loss(self, loss: Tensor, rows: int) -> float:
        """The mean loss of this process's rows (what a recording's hooks saw)."""
        if rows == self.batch_size:
            return loss.item()
        return loss.item() * self.batch_size / rows
