"""The training loop, and ``train()``: a run from its configs to its run folder.

``run_loop`` reads straight down: batch → step → log → eval → checkpoint →
stop. It trains a ``Training`` (the model, its optimizer and step, the
batches and where the run stands) and logs into a ``RunFolder``, or for the
experiments into a ``MemoryLog``.

A run killed at any moment and resumed with ``--resume`` ends with
bit-identical weights and losses to an uninterrupted run (same seed, config
and thread count, on CPU): the only randomness after initialization is the
batch sampler's generator and the dropout masks' global generator, which the
checkpoint keeps.
"""

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from normlab import nn as nl
from normlab.diagnostics import Diagnostics, Snapshot, judge_recording
from normlab.errors import ConfigError, Interrupted, NormlabError, TrainingDiverged
from normlab.lm.checkpoint import CheckpointError, load_checkpoint
from normlab.lm.config import ModelConfig, TrainConfig, check_configs, config_dict
from normlab.lm.data import DataError, Dataset, Vocab, load_dataset
from normlab.lm.distributed import (
    Ranks,
    agree,
    current_ranks,
    device_type,
    gather_objects,
    global_outcome,
    set_threads,
    shard,
)
from normlab.lm.evaluate import evaluate, train_subset
from normlab.lm.model import MLPLanguageModel
from normlab.lm.optim import load_optimizer_state, lr_at, make_optimizer, weight_average
from normlab.lm.rundir import RunFolder, StopSignals
from normlab.lm.sample import format_samples, sample_run
from normlab.lm.schemes import describe_lsuv, lsuv_init_
from normlab.lm.seeds import dropout_seed, stream_generator, stream_seed
from normlab.lm.step import TrainStep, compiled_step
from normlab.lsuv import LSUVLayer
from normlab.report import Page, render_html


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    train_time_s: float = 0.0  # seconds in the loop (steps and evals), summed over resumes
    time_to_target_s: float | None = None  # train_time_s at the first eval that met the target
    init_loss: float | None = None  # the loss of the first batch, before any update
    # step times, split by whether diagnostics were recorded in the step (evals excluded, and
    # each start's first plain step, which pays for compiling the step)
    plain_steps: int = 0
    plain_step_s: float = 0.0
    recorded_steps: int = 0
    recorded_step_s: float = 0.0

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
    model: MLPLanguageModel
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

    def records(self, step: int) -> bool:
        """Whether rank 0 records diagnostics at ``step`` (the same answer on every rank)."""
        every = self.train_config.diagnose_every
        return every > 0 and step % every == 0

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
    """Undo ``rng_state``; saved by another number of processes, each rank's dropout stream
    starts afresh from ``fresh``."""
    batches.generator.set_state(state["batch"])
    own = state
    if ranks.distributed:
        saved = state.get("ranks", [])
        if len(saved) != ranks.world_size:
            torch.manual_seed(hash((fresh, ranks.rank)))
            return
        own = saved[ranks.rank]
    torch.set_rng_state(own["torch"])
    device = next(model.parameters()).device
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], device)


def resolve_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """auto → cuda where there is one, else cpu; under several processes, one GPU per process."""
    name = device_type(name)
    if name == "cuda" and ranks is not None and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


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


def start_training(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: Dataset,
    ranks: Ranks,
    model: MLPLanguageModel | None = None,
    ckpt: dict | None = None,
    quiet: bool = False,
) -> Training:
    """Build a run's model (or train ``model``), optimizer and step; restore ``ckpt`` if given.

    A new run draws the weights from ``seed``, and runs LSUV under ``init lsuv``.
    Rank 0 prints the parameter count and what LSUV did, unless ``quiet``.
    """
    mcfg, tcfg = model_config, train_config
    say = ranks.say if not quiet else lambda *args: None
    device = resolve_device(tcfg.device, ranks)
    set_threads(tcfg.threads)
    torch.manual_seed(dropout_seed(tcfg.seed, ranks.rank))
    if model is None:
        generator = stream_generator(tcfg.seed, "weights")
        model = MLPLanguageModel(mcfg, generator, verbose=ranks.is_main and not quiet)
    model = model.to(device).train()
    if ranks.distributed and tcfg.sync_batchnorm:  # statistics over the global batch
        model = nl.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, tcfg)
    Xtr, Ytr = (t.to(device) for t in data.splits["train"])
    batches = Batches(Xtr, Ytr, tcfg.batch_size, stream_seed(tcfg.seed, "batches"), ranks)
    eval_sets = {
        "train": train_subset(Xtr, Ytr, tcfg.eval_train_examples, tcfg.seed),
        "val": tuple(t.to(device) for t in data.splits["val"]),
    }
    lsuv = None if ckpt else lsuv_init_(model, Xtr, tcfg.seed)  # once, when a run starts
    if lsuv is not None:
        say(describe_lsuv(lsuv))
    averaged = weight_average(model, tcfg.ema)
    diagnostics = Diagnostics(model) if tcfg.diagnose_every > 0 and ranks.is_main else None
    progress = Progress()
    if ckpt:
        load_state(model, optimizer, ckpt)
        progress = Progress(**ckpt["progress"])
        if averaged is not None:
            averaged.module.load_state_dict(ckpt["model"])
            averaged.n_averaged.fill_(progress.step)  # one update per step
        restore_rng(ckpt["rng"], batches, model, ranks, hash((tcfg.seed, progress.step)))
    compiled = compiled_step(model, optimizer, tcfg, ranks)  # after loading
    step = TrainStep(model, optimizer, tcfg.batch_size, ranks, averaged, compiled)
    return Training(
        model_config=mcfg,
        train_config=tcfg,
        data=data,
        ranks=ranks,
        model=model,
        optimizer=optimizer,
        averaged=averaged,
        step=step,
        batches=batches,
        eval_sets=eval_sets,
        diagnostics=diagnostics,
        progress=progress,
        lsuv=lsuv,
    )


class MemoryLog:
    """A run without a folder (experiments, benchmarks): every step's loss and end time, and
    every evaluation, kept in memory; nothing is saved."""

    kept = "nothing was saved"
    resume_hint = "nothing was saved"

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc
        self.step_losses: list[float] = []
        self.step_ends: list[float] = []  # time.perf_counter() after each step
        self.rows: list[dict] = []

    def progress_bar(self, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, unit="step", desc=self.desc, leave=False)

    def step(self, step: int, loss: float, snapshot: Snapshot | None) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_losses.append(loss)

    def metrics(self, row: dict, bar: tqdm) -> None:
        self.rows.append(row)

    def save(self, state: dict) -> None:
        pass


@torch.no_grad()
def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


def run_loop(t: Training, log: RunFolder | MemoryLog) -> None:
    """Train ``t`` to its last step, its target loss, or a Ctrl-C, logging into ``log``."""
    cfg, progress = t.train_config, t.progress
    bar = log.progress_bar(cfg.steps, progress.step)
    lap = time.perf_counter()
    warming_up = True  # this start's first plain step, which compiles the step: not typical
    with StopSignals() as signals:
        while progress.step < cfg.steps and progress.time_to_target_s is None:
            started = time.perf_counter()
            lr = lr_at(progress.step, cfg)
            xb, yb = t.batches.next()
            recording = t.records(progress.step)
            record = t.diagnostics if recording else None  # None on ranks other than 0
            result = t.step(xb, yb, lr, record, progress.step, recording=recording)
            loss, interrupted = global_outcome(result.loss, signals.raised, t.ranks)
            if recording or not warming_up:
                progress.add_step_time(time.perf_counter() - started, recording)
            warming_up = warming_up and recording
            progress.step += 1
            step = progress.step
            log.step(step, loss, result.snapshot)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at step {step}; stopped, and {log.kept} "
                    "(try a lower --lr)"
                )
            if progress.init_loss is None:
                progress.init_loss = loss
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            done = step == cfg.steps
            if step % cfg.eval_every == 0 or done:
                losses = {k: evaluate(t.eval_model, *xy, t.ranks) for k, xy in t.eval_sets.items()}
                if not all(math.isfinite(v) for v in losses.values()):
                    raise TrainingDiverged(
                        f"the evaluation loss became {losses['val']} at step {step}; stopped, "
                        f"and {log.kept} (try a lower --lr)"
                    )
                lap = progress.lap(lap)
                target = cfg.target_val_loss
                if target is not None and losses["val"] <= target:
                    done, progress.time_to_target_s = True, progress.train_time_s
                log.metrics(
                    {"step": step, **{f"{k}_loss": v for k, v in losses.items()}, "lr": lr}, bar
                )
            if step % cfg.checkpoint_every == 0 or done or interrupted:
                lap = progress.lap(lap)
                if not _all_finite(t.model):  # never overwrite a good checkpoint with bad weights
                    raise TrainingDiverged(
                        f"the weights became NaN or infinite by step {step}; stopped, and "
                        f"{log.kept} (try a lower --lr)"
                    )
                log.save(t.checkpoint_state())
            if interrupted:
                bar.close()
                name = signal.Signals(signals.first).name
                hint = log.resume_hint
                raise Interrupted(f"interrupted by {name} at step {step}; {hint}", signals.first)
            if done:
                break
    bar.close()
    progress.lap(lap)


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
) -> tuple[MLPLanguageModel, Dataset, dict]:
    """A finished run's model (in eval mode, on ``device``), its data and its checkpoint."""
    ckpt = load_checkpoint(path)
    data = load_run_data(ckpt, data_path)
    model = MLPLanguageModel(ModelConfig.from_dict(ckpt["model_config"]), verbose=False)
    load_state(model, None, ckpt)
    return model.to(resolve_device(device)).eval(), data, ckpt


def prepare_run(
    model_config: ModelConfig,
    train_config: TrainConfig,
    folder: RunFolder,
    resume: bool,
    steps: int | None,
    ranks: Ranks,
) -> tuple[ModelConfig, TrainConfig, dict | None, Dataset]:
    """Lock the run folder and check it, load the checkpoint when resuming, and load the data.

    ``steps`` (resuming only) continues the run to that many steps in all.
    """
    if resume:
        if folder.path.is_dir():
            folder.lock()
        ckpt = folder.load_checkpoint()
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        train_config = resumed_config(ckpt, train_config, steps, ranks.say)
        _check_run(model_config, train_config, ranks)
        data = load_run_data(ckpt)
    else:
        ckpt = None
        _check_run(model_config, train_config, ranks)
        data = load_dataset(train_config.data, model_config.block_size)
        folder.lock()  # creates the folder: only once the configs and the data are good
        folder.check_new()
    model_config.vocab_size = data.vocab.size
    return model_config, train_config, ckpt, data


def _check_run(model_config: ModelConfig, train_config: TrainConfig, ranks: Ranks) -> None:
    """The configs, and what they ask of the processes and the device."""
    check_configs(model_config, train_config)
    if train_config.batch_size < ranks.world_size:
        raise ConfigError(
            f"--batch-size {train_config.batch_size} is the global batch and needs at least one "
            f"example for each of the {ranks.world_size} processes"
        )
    resolve_device(train_config.device, ranks)


def resumed_config(ckpt: dict, given: TrainConfig, steps: int | None, say=print) -> TrainConfig:
    """The stored training config, with where it runs taken from ``given``, and with
    ``steps`` in all where the run continues past its end."""
    stored = TrainConfig.from_dict(ckpt["train_config"])
    # where it runs may change on resume; what it computes may not
    stored.device, stored.threads = given.device, given.threads or stored.threads
    done = ckpt["progress"]["step"]
    if steps is None:
        return stored
    if ckpt["progress"]["time_to_target_s"] is not None:
        raise ConfigError(
            f"the run stopped at step {done:,} on reaching its target val loss "
            f"{stored.target_val_loss}; --steps does not continue it"
        )
    if steps <= done:
        raise ConfigError(f"the run is at step {done:,}; --steps must be more than that")
    if stored.schedule == "cosine":  # the schedule spans the new total from its start
        before, after = lr_at(done, stored), lr_at(done, replace(stored, steps=steps))
        say(
            f"cosine schedule over {steps:,} steps instead of {stored.steps:,}: the learning rate "
            f"at step {done:,} goes from {before:.3g} to {after:.3g}"
        )
    stored.steps = steps
    return stored


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out: Path,
    resume: bool = False,
    steps: int | None = None,
) -> dict | None:
    """Train (or resume) a run in the folder ``out`` and return its summary; resuming,
    ``steps`` continues it to that many steps in all.

    Under ``torch.distributed`` with several processes (e.g. torchrun), every
    process calls this: each takes its slice of every global batch, DDP sums the
    gradients, and rank 0 alone prints and writes; the others return None.
    """
    wall_start = time.perf_counter()
    ranks = current_ranks()
    with RunFolder(out, ranks) as folder:
        error = None
        try:
            args = (model_config, train_config, folder, resume, steps, ranks)
            mcfg, tcfg, ckpt, data = prepare_run(*args)
        except NormlabError as e:
            error = e
        agree(error, ranks)  # every process stops here if any one failed its checks
        config = config_dict(mcfg, tcfg)
        _say_what_runs(config, data, ckpt, ranks)
        t = start_training(mcfg, tcfg, data, ranks, ckpt=ckpt)
        if ckpt:
            if t.progress.step >= tcfg.steps:
                ranks.say(
                    f"the run ended at step {t.progress.step:,}; to train on, resume with "
                    f"--steps N (more than {t.progress.step:,})"
                )
            history = folder.resume(t.progress.step, tcfg.tensorboard)
            if t.diagnostics is not None:
                t.diagnostics.extend(history)
        else:
            folder.start(config, tcfg.tensorboard)
            folder.save(t.checkpoint_state())  # a run killed before its first checkpoint resumes
        run_loop(t, folder)
        if not ranks.is_main:
            return None
        return finish_run(t, folder, config, wall_start)


def _say_what_runs(config: dict, data: Dataset, ckpt: dict | None, ranks: Ranks) -> None:
    """The config, the data and the processes, printed at the start of a run."""
    ranks.say(("resuming " if ckpt else "") + "config:\n" + json.dumps(config, indent=2))
    ranks.say(
        f"data: {data.path} ({data.n_items:,} items, vocabulary {data.vocab.display()!r}); "
        "examples: " + ", ".join(f"{k} {len(v[1]):,}" for k, v in data.splits.items())
    )
    if ranks.distributed:
        synced = config["train"]["sync_batchnorm"]
        ranks.say(
            f"{ranks.world_size} processes, {config['train']['batch_size']} examples per step "
            f"in all, BatchNorm statistics {'over all of them' if synced else 'per process'}"
        )


def finish_run(t: Training, folder: RunFolder, config: dict, wall_start: float) -> dict:
    """Final losses (test once), summary.json, 20 samples, verdicts and report.html."""
    tcfg, progress, model = t.train_config, t.progress, t.eval_model
    splits = {name: t.data.splits[name] for name in ("train", "val", "test")}
    device = next(model.parameters()).device
    losses = {f"{k}_loss": evaluate(model, *(v.to(device) for v in xy)) for k, xy in splits.items()}
    metrics = folder.read_metrics()
    recorded_s, train_s = progress.diagnostics_s(), progress.train_time_s
    summary = {
        **losses,
        "steps": progress.step,
        "wall_s": round(time.perf_counter() - wall_start, 3),  # start-up to the final evaluation
        "train_time_s": round(train_s, 3),
        "steps_per_s": round(progress.step / train_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "preset": tcfg.preset,
        "seed": tcfg.seed,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "init_loss": progress.init_loss,
        "target_val_loss": tcfg.target_val_loss,
        "time_to_target_s": None
        if progress.time_to_target_s is None
        else round(progress.time_to_target_s, 3),
        "best_val_loss": min((r["val_loss"] for r in metrics), default=None),
        "diagnostics_recordings": progress.recorded_steps,
        "diagnostics_s": round(recorded_s, 3),
        "diagnostics_share": round(recorded_s / train_s, 4),
    }
    folder.write_summary(summary)
    print(
        f"\nsteps {progress.step:,} | train {losses['train_loss']:.4f} | "
        f"val {losses['val_loss']:.4f} | test {losses['test_loss']:.4f} | {summary['wall_s']:.1f} s"
    )
    if tcfg.target_val_loss is not None:
        reached = progress.time_to_target_s
        said = "not reached" if reached is None else f"reached after {reached:.1f} s"
        print(f"target val loss {tcfg.target_val_loss}: {said}")
    samples = sample_run(model, t.data, 20, seed=tcfg.seed)
    print(format_samples(samples))
    history = t.diagnostics.history if t.diagnostics is not None else []
    report = judge_recording(t.diagnostics, num_classes=t.data.vocab.size) if history else None
    if report is not None:
        print(
            f"diagnostics: {progress.recorded_steps} recordings took "
            f"{summary['diagnostics_s']:.2f} s, {summary['diagnostics_share']:.1%} of the "
            "training time"
        )
        fired = "; ".join(f"{v.kind} ({v.layer})" for v in report.verdicts)
        print(f"diagnostics at step {report.snapshot.step:,}: {fired or 'no verdict fired'}")
    page = Page(
        f"normlab run {folder.path}",
        summary,
        config=config,
        metrics=metrics,
        report=report,
        history=history,
        samples=samples,
    )
    folder.write_report(render_html(page))
    print(f"run folder: {folder.path} (open report.html)")
    return summary
