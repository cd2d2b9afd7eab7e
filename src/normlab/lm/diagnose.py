"""``normlab diagnose``: one recorded training step of a model, at initialization or from a run."""

import torch

from normlab.diagnostics import Diagnostics, Report, judge_recording
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import Dataset
from normlab.lm.distributed import SINGLE
from normlab.lm.model import batch_mean_loss
from normlab.lm.optim import lr_at
from normlab.lm.start import start_training
from normlab.second_order import measure_second_order


def diagnose(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: Dataset,
    ckpt: dict | None = None,
    quiet: bool = False,
) -> tuple[Report, Diagnostics]:
    """Record one training step (forward, backward, update) on a fixed batch and judge it,
    with the batch's second-order statistics before the step (``normlab.second_order``);
    returns the judgement and the recording.

    Without ``ckpt`` the model is as a run starts it (LSUV included); with one,
    as the run left it, at its learning rate of that step. The batch is drawn
    from its own generator (seed 0), so every diagnosis of a model sees the
    same examples.
    """
    t = start_training(model_config, train_config, data, SINGLE, ckpt=ckpt, quiet=quiet)
    t.step.core.compile_recordings = False  # one recording: a graph's compile would not repay
    X, Y = data.splits["train"]
    g = torch.Generator().manual_seed(0)
    ix = torch.randint(0, len(X), (train_config.batch_size,), generator=g)
    device = next(t.model.parameters()).device
    step = t.progress.step
    x, y = X[ix].to(device), Y[ix].to(device)
    lr = lr_at(step, train_config)
    second_order = measure_second_order(t.model, batch_mean_loss, (x, y), t.optimizer, lr=lr)
    record = Diagnostics(t.model)
    t.step(x, y, lr, record, step).snapshot.second_order = second_order
    return judge_recording(record, num_classes=data.vocab.size), record
