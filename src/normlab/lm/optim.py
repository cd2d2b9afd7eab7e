"""The optimizer, its learning-rate schedule, and the weights' moving average."""

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from normlab.lm.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on matrices (embeddings, Linear weights), not gains and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: the whole update in one kernel per dtype and device, several times faster than
    # the default per-tensor loop on CPU (SGD's is bitwise the same; AdamW's within rounding)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=True)


IMPLEMENTATION_KEYS = ("fused", "foreach")  # how an optimizer runs, not what it computes


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """The saved state and hyperparameters, run by the implementation built now.

    ``load_state_dict`` takes the saved groups' settings whole, so a checkpoint
    of an unfused optimizer would turn ``fused`` off for good; the fused AdamW
    keeps its step counts as float32 on the parameters' device.
    """
    built = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, implementation in zip(optimizer.param_groups, built, strict=True):
        group.update(implementation)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if group.get("fused") and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step ``step`` (counted from 0).

    Example:
        >>> cfg = TrainConfig(lr=0.1, schedule="step", decay_step=100)
        >>> lr_at(99, cfg), round(lr_at(100, cfg), 6)
        (0.1, 0.01)
    """
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if cfg.decay_step is not None and step >= cfg.decay_step else 1.0)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    r"""``--ema``: a copy of ``model`` whose weights and BatchNorm statistics follow
    :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta` after every step
    (the first step copies), or None when ``decay`` is 0.

    Late in training the weights jitter around a minimum; their average sits
    nearer its middle, and usually evaluates a little lower.
    """
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
