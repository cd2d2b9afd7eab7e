"""One training step: the only place where a batch becomes an update.

``normlab train``, ``experiment``, ``bench`` and ``diagnose`` all train through
``TrainStep``: forward, loss, backward, the optimizer's update (BatchNorm's
running statistics move in the forward pass), the weights' moving average,
and on request a diagnostics recording. Unless ``--no-compile``, the same
call runs the compiled step (``normlab.lm.compiled``) instead, recording steps
included. Under several processes the autograd path runs the forward through
DDP.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.diagnostics import Diagnostics, Snapshot
from normlab.lm.compiled import CompiledStep
from normlab.lm.config import TrainConfig
from normlab.lm.distributed import SINGLE, Ranks, broadcast_state, wrap_ddp
from normlab.lm.model import LanguageModel, next_char_loss
from normlab.nn import set_mode


@dataclass
class StepResult:
    loss: Tensor  # this process's share of the global batch's mean loss (0-dim, on the device)
    snapshot: Snapshot | None  # the recording, on a recording step


class TrainStep:
    """``step(x, y, lr, recorder=None, index=0) -> StepResult``: one optimizer step on a batch.

    Each process's loss is its rows' summed cross-entropy over the *global*
    batch size, so on one process it is the batch mean, and under DDP (which
    sums gradients, see ``normlab.lm.distributed``) the gradient is the global
    batch's exactly, also with unequal slices.

    Args:
        model: the model to train.
        optimizer: its optimizer (``normlab.lm.optim.make_optimizer``).
        batch_size: the global batch size.
        ranks: this process's place among several (DDP when there are, unless compiled).
        averaged: a moving average of the weights to update after every step, or None.
        compiled: the compiled step for this model and optimizer, or None.

    Example:
        >>> from normlab.lm.config import ModelConfig, TrainConfig
        >>> from normlab.lm.optim import make_optimizer
        >>> model = LanguageModel(ModelConfig(block_size=3, n_layer=2, n_hidden=16), verbose=False)
        >>> step = TrainStep(model, make_optimizer(model, TrainConfig()), batch_size=32)
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
        compiled: CompiledStep | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.averaged = averaged
        self.compiled = compiled
        # the hooks a rank that does not record traces its recording steps with
        self._stand_in = Diagnostics(model) if compiled is not None and ranks.distributed else None
        device = next(model.parameters()).device
        self.forward_model = model
        if ranks.distributed and compiled is None:
            self.forward_model = wrap_ddp(model, device)
        elif ranks.distributed:  # the compiled step sums the gradients itself: no DDP
            broadcast_state(model)

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        lr: float,
        recorder: Diagnostics | None = None,
        index: int = 0,
        recording_step: bool = False,
    ) -> StepResult:
        """Train on the batch ``(x, y)`` with learning rate ``lr``; with ``recorder``, record the
        step into it as step ``index``. Under several processes rank 0 alone records; the
        others pass ``recording_step`` on its recording steps, so that every process runs the same
        graph and their collectives match."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if recorder is not None:
            recorder.arm()
        eval_loss = None
        if self.compiled is None:
            logits, _ = self.forward_model(x)
            loss = next_char_loss(logits, y, over=self.batch_size)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recorder is not None:
                eval_loss = _eval_mode_loss(self.model, x, y)
            self.optimizer.step()
        elif recorder is not None:
            loss, eval_loss = self.compiled.recorded(x, y, lr, recorder)
        elif recording_step and self._stand_in is not None:  # rank 0 records: run its graph
            self._stand_in.arm()
            loss, _ = self.compiled.recorded(x, y, lr, self._stand_in)
            self._stand_in.detach()
        else:
            loss = self.compiled(x, y, lr)
        snapshot = None
        if recorder is not None:
            snapshot = recorder.collect(index, self._rows_loss(loss, len(x)), float(eval_loss))
            if self.compiled is not None:  # the gradients recorded: the compiled step needs none
                self.optimizer.zero_grad(set_to_none=True)
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        return StepResult(loss, snapshot)

    def _rows_loss(self, loss: Tensor, rows: int) -> float:
        """The mean loss of this process's rows (what a recording's hooks saw)."""
        if rows == self.batch_size:
            return loss.item()
        return loss.item() * self.batch_size / rows


@torch.no_grad()
def _eval_mode_loss(model: LanguageModel, x: Tensor, y: Tensor) -> Tensor:
    """The loss of a batch in eval mode: against the train-mode loss, BatchNorm's mismatch."""
    with set_mode(model, training=False):
        _, loss = model(x, y)
    return loss


def compiled_step(
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    train_config: TrainConfig,
    ranks: Ranks,
) -> CompiledStep | None:
    """The compiled step, or None with ``--no-compile``. Build it after loading a checkpoint."""
    if not train_config.compile:
        return None
    group = dist.group.WORLD if ranks.distributed else None
    return CompiledStep(model, optimizer, batch_size=train_config.batch_size, group=group)
