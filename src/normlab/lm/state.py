"""Where a run stands, and everything it trains with: ``Progress``, ``Batches``, ``Training``,
and the random state a checkpoint keeps.

A run killed at any moment and resumed with ``--resume`` ends with
bit-identical weights and losses to an uninterrupted run (same seed, config
and thread count, on CPU): the only randomness after initialization is the
batch sampler's generator and the dropout masks' global generator, which the
checkpoint keeps.
"""

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from normlab.diagnostics import Diagnostics, SecondOrderStats
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import Dataset
from normlab.lm.distributed import Ranks, gather_objects, shard
from normlab.lm.model import LanguageModel, batch_mean_loss
from normlab.lm.seeds import second_order_batch_seed
from normlab.lm.step import TrainStep
from normlab.lsuv import LSUVLayer
from normlab.second_order import measure_second_order

NOISE_BATCHES = 8  # the gradient noise scale's large batch, in training batches


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    train_time_s: float = 0.0  # seconds in the loop (steps and evals), summed over resumes
    time_to_target_s: float | None = None  # train_time_s at the first eval that met the target
    init_loss: float | None = None  # the loss of the first batch, before any update
    # step times, split by whether diagnostics were recorded in the step (a recording's with
    # taking Snapshots and writing their rows, theirs and those of the recordings before it
    # that waited, and the seconds taking recordings outside the steps; evals excluded, and
    # each start's first plain step and first recording, which pay for compiling their
    # graphs), and the second-order measurements' own time (not in the recorded steps')
    plain_steps: int = 0
    plain_step_s: float = 0.0
    recorded_steps: int = 0
    recorded_step_s: float = 0.0
    second_order_measurements: int = 0
    second_order_s: float = 0.0
    recordings: int = 0  # every recorded step, timed or not
    # recordings run as a compiled graph of their own where they can: decided when the run
    # starts (normlab.lm.compiled.RECORDINGS_TO_COMPILE), so that a run continued with more
    # steps records as it began
    records_compiled: bool | None = None

    def add_step_time(self, seconds: float, recorded: bool) -> None:
        if recorded:
            self.recorded_steps += 1
            self.recorded_step_s += seconds
        else:
            self.plain_steps += 1
            self.plain_step_s += seconds

    def diagnostics_s(self) -> float:
        """Seconds the recordings added: recorded steps beyond what plain steps take."""
        if not self.plain_steps:
            return self.recorded_step_s
        typical = self.plain_step_s / self.plain_steps
        return max(0.0, self.recorded_step_s - self.recorded_steps * typical)

    def step_s(self) -> float:
        """Seconds in steps, recorded or not (evaluations, a start's compile and the
        second-order measurements aside): what a long run's time tends to."""
        return self.plain_step_s + self.recorded_step_s

    def lap(self, since: float) -> float:
        """Add the seconds since ``since`` to the training time; returns now."""
        now = time.perf_counter()
        self.train_time_s += now - since
        return now


class Batches:
    """Random training batches: the same global batch on every process, each taking its rows."""

    def __init__(self, X: Tensor, Y: Tensor, batch_size: int, seed: int, ranks: Ranks) -> None:
        self.X, self.Y, self.batch_size = X, Y, batch_size
        self.rows = shard(batch_size, ranks)  # this process's rows of every global batch
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        ix = torch.randint(0, len(self.X), (self.batch_size,), generator=self.generator)
        ix = ix[self.rows].to(self.X.device)
        return self.X[ix], self.Y[ix]


@dataclass
class Training:
    """Everything a run trains with and where it stands; ``start_training`` builds it."""

    model_config: ModelConfig
    train_config: TrainConfig
    data: Dataset
    ranks: Ranks
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    averaged: AveragedModel | None  # --ema
    step: TrainStep
    batches: Batches
    eval_sets: dict[str, tuple[Tensor, Tensor]]  # what the periodic evaluations measure
    diagnostics: Diagnostics | None  # rank 0 records, when diagnose_every > 0
    progress: Progress = field(default_factory=Progress)
    lsuv: list[LSUVLayer] | None = None  # init lsuv: what LSUV did, layer by layer

    @property
    def eval_model(self) -> nn.Module:
        """What evaluations measure and the checkpoint's ``model`` holds: the weights, or
        under ``--ema`` their average."""
        return self.model if self.averaged is None else self.averaged.module

    def records_at(self, step: int) -> bool:
        """Whether rank 0 records diagnostics at ``step`` (the same answer on every rank)."""
        every = self.train_config.diagnose_every
        return (every > 0 and step % every == 0) or self.measures_second_order_at(step)

    def measures_second_order_at(self, step: int) -> bool:
        """Whether ``step`` measures the second-order statistics (``second_order``): one
        process only (they run the model outside the step, where SyncBatchNorm's collectives
        would wait for the others), into a recording."""
        every = self.train_config.second_order_every
        measures = every > 0 and step % every == 0 and self.diagnostics is not None
        return measures and not self.ranks.distributed

    def second_order(self, x: Tensor, y: Tensor, lr: float, step: int) -> SecondOrderStats:
        """The batch's second-order statistics before this step's update: its sharpness
        against the stability line of ``lr`` and its Hessian trace; and the gradient noise
        scale, from batches of this size against one of ``NOISE_BATCHES`` of them (this batch
        and more, drawn from their own stream), as McCandlish et al. measure it in training."""
        X, Y = self.data.splits["train"]
        g = torch.Generator().manual_seed(second_order_batch_seed(self.train_config.seed, step))
        ix = torch.randint(0, len(X), ((NOISE_BATCHES - 1) * len(x),), generator=g).to(X.device)
        noise_batch = (torch.cat([x, X[ix].to(x.device)]), torch.cat([y, Y[ix].to(y.device)]))
        return measure_second_order(
            self.model, batch_mean_loss, (x, y), self.optimizer, lr, len(x), noise_batch=noise_batch
        )

    def checkpoint_state(self) -> dict:
        """What ``checkpoint.pt`` holds (a collective under several processes: the RNGs)."""
        return {
            "model_config": asdict(self.model_config),
            "train_config": asdict(self.train_config),
            "vocab": list(self.data.vocab.chars),
            "data_sha256": self.data.sha256,
            "progress": asdict(self.progress),
            "model": self.eval_model.state_dict(),  # what eval and sample load
            **({} if self.averaged is None else {"train_model": self.model.state_dict()}),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.batches, self.model, self.ranks),
        }


def rng_state(batches: Batches, model: nn.Module, ranks: Ranks) -> dict:
    """The batch sampler's state, and this process's own RNG (dropout): every rank's when
    several. A collective under several processes: every rank calls it at the same step."""
    own = {"torch": torch.get_rng_state()}
    device = next(model.parameters()).device
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    state = {**own, "batch": batches.generator.get_state()}
    if ranks.distributed:
        state["ranks"] = gather_objects(own, ranks)
    return state


def restore_rng(state: dict, batches: Batches, model: nn.Module, ranks: Ranks, fresh: int) -> None:
    """Undo ``rng_state``; saved by another number of processes, this rank's dropout stream
    starts afresh from the seed ``fresh`` (``seeds.resumed_dropout_seed``)."""
    batches.generator.set_state(state["batch"])
    own = state
    if ranks.distributed:
        saved = state.get("ranks", [])
        if len(saved) != ranks.world_size:
            torch.manual_seed(fresh)
            return
        own = saved[ranks.rank]
    torch.set_rng_state(own["torch"])
    device = next(model.parameters()).device
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], device)
