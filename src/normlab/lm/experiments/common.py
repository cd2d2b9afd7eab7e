"""What every experiment shares: its output folder, a table printed as it goes, and ``fit``.

``fit`` trains a cell with ``normlab train``'s own loop and step
(``normlab.lm.loop.run_loop``), in memory instead of a run folder, so a cell
gives the same losses as ``normlab train`` with the same config
(``tests/test_experiments.py`` checks it), and whatever a run can do (EMA,
the compiled step) a cell can do too.
"""

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from normlab.calibrate import calibrate_batchnorm
from normlab.diagnostics import SecondOrderStats, Snapshot, Thresholds, finite, verdicts
from normlab.errors import NormlabError, TrainingDiverged
from normlab.files import atomic_write_bytes, atomic_write_json
from normlab.lm.config import ModelConfig, TrainConfig, check_configs
from normlab.lm.data import Dataset
from normlab.lm.distributed import SINGLE
from normlab.lm.evaluate import evaluate
from normlab.lm.loop import MemoryLog, run_loop
from normlab.lm.model import LanguageModel
from normlab.lm.presets import LECTURE_SGD
from normlab.lm.seeds import stream_generator
from normlab.lm.start import start_training
from normlab.lsuv import LSUVLayer
from normlab.nn import ACTIVATIONS

# the bar of the experiments that reproduce a lecture: each val within ±0.03 of the lecture's
TOLERANCE = 0.03

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
    compile: bool  # each cell's training step compiled, as normlab train's

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

    losses: dict[str, float]  # train and val loss at the end (eval mode); NaN where it diverged
    init_loss: float  # the first batch's loss, before any update
    snapshot: Snapshot  # the diagnostics of step 0
    step_losses: list[float] = field(default_factory=list)  # the training loss of every step
    diverged_at: int | None = None  # the step whose loss was not finite
    seconds: float = 0.0
    lsuv: list[LSUVLayer] | None = None  # init=lsuv: what LSUV did, layer by layer
    second_order: list[tuple[int, SecondOrderStats]] = field(default_factory=list)  # (step, ...)


def new_model(config: ModelConfig, data: Dataset, seed: int) -> LanguageModel:
    """The model ``normlab train`` would build for this config and seed."""
    config.vocab_size = data.vocab.size
    return LanguageModel(config, stream_generator(seed, "weights"), verbose=False)


def fit(
    model: LanguageModel, data: Dataset, tcfg: TrainConfig, ctx: Context, desc: str = "train"
) -> Fit:
    """Train ``model`` as ``normlab train`` would, and evaluate it at the end.

    The cell evaluates once, after its last step (its train loss on the whole
    split, or on ``eval_train_examples`` of it), records diagnostics at step 0,
    and saves nothing. A non-finite loss stops it: ``diverged_at`` is that step.
    """
    tcfg = replace(
        tcfg,
        device=ctx.device.type,
        compile=tcfg.compile and ctx.compile,
        eval_every=tcfg.steps,
        checkpoint_every=tcfg.steps,
    )
    check_configs(model.config, tcfg)
    start = time.perf_counter()
    t = start_training(model.config, tcfg, data, SINGLE, model=model)
    log = MemoryLog(desc)
    diverged_at = None
    try:
        run_loop(t, log)
    except TrainingDiverged:
        diverged_at = t.progress.step - 1
    last = log.rows[-1] if log.rows and diverged_at is None else {}
    losses = {name: last.get(f"{name}_loss", math.nan) for name in ("train", "val")}
    return Fit(
        losses=losses,
        init_loss=log.step_losses[0],
        snapshot=t.diagnostics.history[0],
        step_losses=log.step_losses,
        diverged_at=diverged_at,
        seconds=time.perf_counter() - start,
        lsuv=t.lsuv,
        second_order=log.second_order,
    )


def calibrated_losses(model, data: Dataset, device: torch.device) -> dict:
    """Train and val loss with BatchNorm statistics calibrated over the training set."""
    calibrated = copy.deepcopy(model)
    calibrate_batchnorm(calibrated, data.splits["train"][0].to(device))
    return {
        f"calibrated_{name}_loss": evaluate(calibrated, *(t.to(device) for t in data.splits[name]))
        for name in ("train", "val")
    }


def against_the_lecture(rows: list[dict], labels: list[str], title: str):
    """A figure of each row's train and val loss beside the lecture's, one tick per row."""
    from normlab.report import pyplot  # matplotlib only when a figure is made

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    x = range(len(rows))
    ax.plot(x, [r["val_loss"] for r in rows], "o-", label="val (normlab)")
    ax.plot(x, [r["train_loss"] for r in rows], "o-", label="train (normlab)")
    ax.plot(x, [r["lecture_val"] for r in rows], "s--", label="val (lecture)")
    ax.plot(x, [r["lecture_train"] for r in rows], "s--", label="train (lecture)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def step0_health(snapshot: Snapshot, num_classes: int | None = None) -> dict:
    """From step 0's diagnostics: the last hidden activation's std and saturation, the
    gradient-std ratio first/last activation layer, and the verdicts that fired."""
    acts = [layer for layer in snapshot.layers if layer.family in ACTIVATIONS]
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


def train_config(**kw) -> TrainConfig:
    """A TrainConfig for an experiment cell: the lecture's SGD recipe (``LECTURE_SGD``) with
    ``kw`` over it, and diagnostics at step 0 only."""
    return TrainConfig(**{**LECTURE_SGD, "diagnose_every": kw["steps"], **kw})


def lecture_sgd(steps: int, decay_step: int, seed: int) -> TrainConfig:
    """The lecture's optimization: plain SGD, batch 32, lr 0.1, then 0.01 from ``decay_step``."""
    return train_config(steps=steps, decay_step=decay_step, seed=seed)
