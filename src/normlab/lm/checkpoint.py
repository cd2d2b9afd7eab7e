"""Checkpoints written atomically (``normlab.files``) that load without running code.

Checkpoints are read with ``torch.load(weights_only=True)``, which unpickles only
tensors and plain containers, so a checkpoint can never execute code.
"""

import io
from pathlib import Path

import torch

from normlab.errors import NormlabError
from normlab.files import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "normlab-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "model_config",
    "train_config",
    "vocab",
    "data_sha256",
    "progress",
    "model",
    "optimizer",
    "rng",
)


class CheckpointError(NormlabError):
    """A checkpoint that is missing, corrupt, truncated or not normlab's."""


def save_checkpoint(folder: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(Path(folder) / CHECKPOINT_NAME, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint file, or a run folder's checkpoint; a one-line error on anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files: all mean "not loadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a loadable checkpoint (corrupt, truncated or foreign): {reason[:200]}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a normlab checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('format_version')}, "
            f"this normlab reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {', '.join(missing)})")
    return state
