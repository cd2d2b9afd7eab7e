"""A finished run, loaded to sample, evaluate, diagnose or export: model, data, checkpoint."""

from pathlib import Path

import torch
from torch import nn

from normlab.lm.checkpoint import CheckpointError, load_checkpoint
from normlab.lm.config import ModelConfig
from normlab.lm.data import DataError, Dataset, Vocab, load_dataset
from normlab.lm.distributed import resolve_device
from normlab.lm.model import LanguageModel
from normlab.lm.optim import load_optimizer_state


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: dict) -> None:
    """Load a checkpoint's weights (and optimizer state); a mismatch is a one-line error.

    With an optimizer (to train on), the weights being trained; without one (to
    evaluate or sample), the weights the run evaluates: under ``--ema``, their average.
    """
    weights = ckpt["model"] if optimizer is None else ckpt.get("train_model", ckpt["model"])
    try:
        model.load_state_dict(weights)
        if optimizer is not None:
            load_optimizer_state(optimizer, ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"the checkpoint does not fit its own config: {reason}") from None


def load_run_data(ckpt: dict, path: str | None = None) -> Dataset:
    """The data a checkpoint was trained on (from ``path`` if it moved), checked by SHA-256."""
    path = path if path is not None else ckpt["train_config"]["data"]
    block_size = ckpt["model_config"]["block_size"]
    data = load_dataset(path, block_size, vocab=Vocab(tuple(ckpt["vocab"])))
    if data.sha256 != ckpt["data_sha256"]:
        raise DataError(f"data file {data.path} has changed since this run started")
    return data


def load_run(
    path: Path, data_path: str | None = None, device: str = "auto"
) -> tuple[LanguageModel, Dataset, dict]:
    """A finished run's model (in eval mode, on ``device``), its data and its checkpoint."""
    ckpt = load_checkpoint(path)
    data = load_run_data(ckpt, data_path)
    model = LanguageModel(ModelConfig.from_dict(ckpt["model_config"]), verbose=False)
    load_state(model, None, ckpt)
    return model.to(resolve_device(device)).eval(), data, ckpt
