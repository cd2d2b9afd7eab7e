"""What every experiment shares: its output folder, a table printed as it goes, and ``fit``.

``fit`` is ``normlab train``'s loop without the run folder: the same model
seed, batch generator, learning-rate schedule, LSUV batch and step order, so a
cell trained here gives the same losses as ``normlab train`` with the same
config (``tests/test_experiments.py`` checks it), and the diagnostics of step 0.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from normlab.checkpoint import atomic_write_bytes, atomic_write_json
from normlab.data import Dataset
from normlab.diagnostics import ACTIVATIONS, Diagnostics, Snapshot, Thresholds, finite, verdicts
from normlab.errors import NormlabError
from normlab.lsuv import LSUVLayer
from normlab.model import MLPLanguageModel, ModelConfig
from normlab.train import (
    TrainConfig,
    check_configs,
    data_init_,
    eval_mode_loss,
    evaluate,
    lr_at,
    make_optimizer,
)

RESULTS_NAME = "results.json"


@dataclass
class Context:
    """Where an experiment runs and writes: the CLI's flags, resolved."""

    name: str
    out: Path
    quick: bool
    seed: int
    device: torch.device
    command: str  # the command that reproduces the results, stored with them

    def prepare(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise NormlabError(f"--out {self.out} is a file; the output must be a folder")
        if (self.out / RESULTS_NAME).exists():
            raise NormlabError(f"{self.out} already holds results; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)

    def write_results(self, results: dict) -> Path:
        path = self.out / RESULTS_NAME
        meta = {
            "experiment": self.name,
            "command": self.command,
            "quick": self.quick,
            "seed": self.seed,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        atomic_write_json(path, finite({**meta, **results}))  # strict JSON: NaN → null
        return path

    def save_figure(self, fig, name: str) -> Path:
        from normlab.report import png_bytes  # matplotlib only when a figure is made

        path = self.out / name
        atomic_write_bytes(path, png_bytes(fig))
        return path


class Table:
    """A fixed-width table printed one row at a time, as results come in."""

    def __init__(self, title: str, columns: list[tuple[str, int]]) -> None:
        self.columns = columns
        print(f"\n{title}")
        print(" ".join(f"{name:>{width}}" for name, width in columns))

    def row(self, *cells) -> None:
        text = []
        for cell, (_, width) in zip(cells, self.columns, strict=True):
            text.append(f"{_cell(cell):>{width}}")
        tqdm.write(" ".join(text))


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4f}" if abs(x) < 100 else f"{x:.3g}"
    return str(x)


@dataclass
class Fit:
    """The outcome of one training run."""

    losses: dict[str, float]  # split → loss at the end (eval mode); NaN where it diverged
    init_loss: float  # the first batch's loss, before any update
    snapshot: Snapshot  # the diagnostics of step 0
    step_losses: list[float] = field(default_factory=list)  # the training loss of every step
    diverged_at: int | None = None  # the step whose loss was not finite
    seconds: float = 0.0
    lsuv: list[LSUVLayer] | None = None  # init=lsuv: what LSUV did, layer by layer


def new_model(config: ModelConfig, data: Dataset, seed: int) -> MLPLanguageModel:
    """The model ``normlab train`` would build for this config and seed."""
    config.vocab_size = data.vocab.size
    torch.manual_seed(seed)  # only dropout draws from the global RNG
    return MLPLanguageModel(config, torch.Generator().manual_seed(seed), verbose=False)


def fit(
    model: MLPLanguageModel,
    data: Dataset,
    tcfg: TrainConfig,
    device: torch.device,
    splits: tuple[str, ...] = ("train", "val"),
    desc: str = "train",
    after_backward: Callable[[int], None] | None = None,
) -> Fit:
    """Train ``model`` as ``normlab train`` would, then evaluate it on ``splits``.

    ``after_backward(step)`` runs between the backward pass and the update,
    with the gradients in place. A non-finite loss stops the run.
    """
    check_configs(model.config, tcfg)
    start = time.perf_counter()
    model.to(device).train()
    Xtr, Ytr = (t.to(device) for t in data.splits["train"])
    lsuv = data_init_(model, Xtr, tcfg.seed)
    optimizer = make_optimizer(model, tcfg)
    batch_gen = torch.Generator().manual_seed(tcfg.seed + 1)
    diag = Diagnostics(model)
    step_losses: list[float] = []
    snapshot, diverged_at = None, None
    for step in tqdm(range(tcfg.steps), desc=desc, unit="step", leave=False, disable=None):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tcfg)
        ix = torch.randint(0, len(Xtr), (tcfg.batch_size,), generator=batch_gen).to(device)
        xb, yb = Xtr[ix], Ytr[ix]
        if step == 0:
            diag.arm()
        _, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        eval_loss = eval_mode_loss(model, xb, yb) if step == 0 else None
        optimizer.step()
        if step == 0:
            snapshot = diag.collect(0, loss.item(), eval_loss)
        step_losses.append(loss.item())
        if not math.isfinite(step_losses[-1]):
            diverged_at = step
            break
    losses = {name: math.nan for name in splits}
    if diverged_at is None:
        for name in splits:
            losses[name] = evaluate(model, *(t.to(device) for t in data.splits[name]))
    return Fit(
        losses,
        step_losses[0],
        snapshot,
        step_losses,
        diverged_at,
        time.perf_counter() - start,
        lsuv,
    )


def step0_health(snapshot: Snapshot, num_classes: int | None = None) -> dict:
    """From step 0's diagnostics: the last hidden activation's std and saturation, the
    gradient-std ratio first/last activation layer, and the verdicts that fired."""
    acts = [layer for layer in snapshot.layers if layer.kind in ACTIVATIONS]
    first, last = (acts[0], acts[-1]) if acts else (None, None)
    grad_ratio = None
    if first is not None and first.grad_std and last.grad_std:
        grad_ratio = first.grad_std / last.grad_std
    fired = verdicts([snapshot], Thresholds(), num_classes)
    return {
        "act_std_last": None if last is None else last.std,
        "saturated_first": None if first is None else first.saturated,
        "saturated_last": None if last is None else last.saturated,
        "grad_ratio_first_last": grad_ratio,
        "verdicts": sorted({f"{v.kind}" for v in fired}),
    }


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise NormlabError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def train_config(**kw) -> TrainConfig:
    """A TrainConfig for an experiment cell: no run-folder cadences apply."""
    return TrainConfig(diagnose_every=0, **kw)


def lecture_sgd(steps: int, decay_step: int, seed: int) -> TrainConfig:
    """The lecture's optimization: plain SGD, batch 32, lr 0.1, then 0.01 from ``decay_step``."""
    return train_config(
        steps=steps,
        batch_size=32,
        optimizer="sgd",
        lr=0.1,
        schedule="step",
        decay_step=decay_step,
        seed=seed,
    )
