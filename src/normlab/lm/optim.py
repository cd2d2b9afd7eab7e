"""The optimizer, its learning-rate schedule, and the weights' moving average."""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from normlab.lm.config import TrainConfig
from normlab.lm.mup import rate_scales


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on matrices (embeddings, Linear weights), not gains and biases.
    Under ``--param mup`` each parameter's group scales the rate and the decay by μP's table
    (``normlab.lm.mup``), as its ``lr_scale`` (``set_learning_rate``)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if getattr(model, "config", None) is not None and model.config.param == "mup":
        groups = _mup_groups(model, cfg)
    # fused: the whole update in one kernel per dtype and device, several times faster than
    # the default per-tensor loop on CPU (SGD's is bitwise the same; AdamW's within rounding)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each param group's learning rate for this step: the schedule's ``lr`` times the group's
    ``lr_scale`` (1 where a group has none), a per-group multiplier that a schedule keeps.

    Example:
        >>> w, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
        >>> sgd = torch.optim.SGD([{"params": [w], "lr_scale": 0.5}, {"params": [b]}], lr=1.0)
        >>> set_learning_rate(sgd, 0.1)
        >>> [group["lr"] for group in sgd.param_groups]
        [0.05, 0.1]
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class FunctionalUpdate:
    """``update(grads)``: ``optimizer``'s own update of ``params`` from gradients given in a
    list (None where a parameter has none, which it then leaves alone, as torch.optim does),
    group by group with each group's settings as they are at the call, by the fused kernels of
    torch.optim's fused SGD and AdamW (``torch._fused_sgd_``, ``torch._fused_adamw_``), called
    as torch.optim calls them for each device and dtype. ``optimizer.step()`` computes the
    same, bit for bit, from ``.grad``; this form spares the per-step cost of setting and
    clearing the ``.grad`` of every parameter, and of sorting the tensors by device and dtype.

    It covers what ``make_optimizer`` builds: ``torch.optim.SGD`` without momentum and
    ``torch.optim.AdamW`` without amsgrad. AdamW's state is the optimizer's own, created at a
    parameter's first gradient in the format of ``AdamW(fused=True)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        self.adamw = isinstance(optimizer, torch.optim.AdamW)
        if not self.adamw and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"the step has SGD and AdamW, not {type(optimizer).__name__}")
        if any(g.get("momentum") or g.get("amsgrad") for g in optimizer.param_groups):
            raise ValueError("the step has SGD without momentum, and AdamW without amsgrad")
        place = {id(p): i for i, p in enumerate(params)}
        if any(id(p) not in place for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer holds parameters that are not the model's")
        self.optimizer = optimizer
        self.params = params
        self.places = [[place[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        # each group's places by device and dtype, as torch.optim's fused form sorts them on
        # every step (a tenth of a small step's time: docs/PERFORMANCE.md, section 1b), once
        self.kinds = [_by_kind(params, places) for places in self.places]

    def __call__(self, grads: list[torch.Tensor | None]) -> None:
        self.on(grads)()

    def on(self, grads: list[torch.Tensor | None]) -> Callable[[], None]:
        """``update()``: the update from ``grads``, tensors that the caller rewrites in place
        before each call (the compiled step's gradients' buffer: ``normlab.lm.compiled``), with
        the kernels' lists of tensors built once."""
        calls = []  # (group, params, grads): one fused kernel call each
        for group, kinds in zip(self.optimizer.param_groups, self.kinds, strict=True):
            for kind in kinds:
                present = [i for i in kind if grads[i] is not None]
                if present:
                    params = [self.params[i] for i in present]
                    calls.append((group, params, [grads[i] for i in present]))

        def update() -> None:
            with torch.no_grad():
                for group, params, group_grads in calls:
                    self._fused(group, params, group_grads)

        return update

    def _fused(self, group: dict, params: list, grads: list) -> None:
        """The update of a group's parameters of one device and dtype by torch.optim's fused
        kernel, called as ``torch.optim.sgd._fused_sgd`` and ``torch.optim.adam._fused_adam``
        call it."""
        if not self.adamw:
            torch._fused_sgd_(
                params,
                grads,
                [],  # no momentum: no buffers
                weight_decay=group["weight_decay"],
                momentum=0.0,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                is_first_step=False,
            )
            return
        states = [self._adamw_state(p) for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],  # no amsgrad
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _adamw_state(self, p: torch.Tensor) -> dict:
        state = self.optimizer.state[p]
        if not state:  # as torch.optim.AdamW(fused=True) creates it
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


def _by_kind(params: list[torch.Tensor], places: list[int]) -> list[list[int]]:
    """``places`` (indices into ``params``) split by their parameter's device and dtype, in
    order."""
    split: dict[tuple, list[int]] = {}
    for i in places:
        split.setdefault((params[i].device, params[i].dtype), []).append(i)
    return list(split.values())


def _mup_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One param group per (rate scale, decay) of μP's table, each at ``cfg.lr`` times its scale."""
    scales = rate_scales(model, cfg.optimizer)
    groups: dict[tuple[float, float], dict] = {}
    for p in model.parameters():
        lr_scale, decay_scale = scales[id(p)]
        decay = cfg.weight_decay * decay_scale if p.dim() >= 2 else 0.0
        group = groups.setdefault(
            (lr_scale, decay),
            {"params": [], "weight_decay": decay, "lr_scale": lr_scale, "lr": cfg.lr * lr_scale},
        )
        group["params"].append(p)
    return list(groups.values())


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
