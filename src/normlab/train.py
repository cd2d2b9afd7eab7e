"""The training loop, its config, and resumable run folders.

A run folder holds ``config.json``, ``checkpoint.pt`` (model, optimizer, step,
every RNG state, config, vocabulary; with ``--ema`` the model is the weights'
moving average and ``train_model`` the trained weights), ``metrics.jsonl`` (one
line per evaluation) and ``summary.json``. A run killed at any moment and resumed with
``--resume`` ends with bit-identical weights and losses to an uninterrupted
run (same seed, config and thread count, on CPU): the only randomness after
initialization is the batch sampler's generator, which the checkpoint keeps.
"""

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from normlab import nn as nl
from normlab.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from normlab.data import DataError, Dataset, Vocab, load_dataset
from normlab.diagnostics import Diagnostics, snapshot_from_dict, snapshot_to_dict
from normlab.diagnostics import report as diagnostics_report
from normlab.distributed import (
    SINGLE,
    Ranks,
    agree,
    all_reduce_sum,
    current_ranks,
    gather_objects,
    shard,
    wrap_ddp,
)
from normlab.errors import NormlabError, TrainingDiverged
from normlab.fast import FastStep, unsupported
from normlab.lsuv import LSUVLayer
from normlab.model import ConfigError, MLPLanguageModel, ModelConfig, check_choices
from normlab.report import log_metrics, log_snapshot, open_tensorboard, render_html, write_report
from normlab.sample import format_samples, sample_run

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    train_time_s: float = 0.0  # seconds in the loop (steps and evals), summed over resumes
    time_to_target_s: float | None = None  # train_time_s at the first eval that met the target
    init_loss: float | None = None  # the loss of the first batch, before any update
    # step times, split by whether diagnostics were recorded in the step (evals excluded)
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


class Interrupted(NormlabError):
    """Ctrl-C: the checkpoint was saved; exit code 130 as for any SIGINT."""

    exit_code = 130


@dataclass
class TrainConfig:
    steps: int = 200_000  # optimizer steps
    batch_size: int = 32  # examples per step
    optimizer: str = "sgd"  # sgd (plain, as in the lecture) | adamw
    lr: float = 0.1  # peak learning rate
    schedule: str = "step"  # step: lr × 0.1 from decay_step | cosine: warmup, cosine to the floor
    decay_step: int | None = None  # step schedule: where the lr drops ×0.1 (None: never)
    warmup_steps: int = 0  # cosine schedule: linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine schedule: the floor, as a fraction of lr
    weight_decay: float = 0.0  # decoupled (AdamW) or L2 (SGD), on matrices only
    ema: float = 0.0  # evaluate and keep a moving average of the weights with this decay; 0: off
    eval_every: int = 10_000  # train and val loss: val on the whole split
    eval_train_examples: int = 0  # train loss on this many fixed examples; 0: the whole split
    checkpoint_every: int = 10_000
    diagnose_every: int = 100  # record per-layer diagnostics every N steps; 0: never
    tensorboard: bool = False  # also write TensorBoard event files
    sync_batchnorm: bool = True  # several processes: BatchNorm statistics over the global batch
    compile: bool = False  # the hand-written step (SGD or AdamW) as one graph, where it applies
    target_val_loss: float | None = None  # stop at the first eval at or below this
    seed: int = 42  # model init and batch order (the split always uses 42, as the lectures)
    data: str | None = None  # one item per line; None: the bundled names
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads; None: torch's default
    preset: str | None = None  # the preset these values started from

    def validate(self) -> None:
        check_choices(self, {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "device": DEVICES})
        if self.diagnose_every < 0:
            raise ConfigError(f"diagnose-every must be at least 0, got {self.diagnose_every}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.eval_train_examples < 0:
            raise ConfigError(
                f"eval-train-examples must be at least 0 (0: the whole split), got "
                f"{self.eval_train_examples}"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay must be at least 0, got {self.weight_decay}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1) (0: off), got {self.ema}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_configs(model_config: ModelConfig, train_config: TrainConfig) -> None:
    """Validate both configs and what they ask of each other."""
    train_config.validate()
    model_config.validate()
    uses_batchnorm = model_config.norm == "batch" or model_config.output_bn
    if uses_batchnorm and train_config.batch_size < 2:
        raise ConfigError(
            f"BatchNorm normalizes over the batch and needs at least 2 examples in it, got "
            f"--batch-size {train_config.batch_size}"
        )


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: dict) -> None:
    """Load a checkpoint's weights (and optimizer state); a mismatch is a one-line error.

    With an optimizer (to train on), the weights being trained; without one (to
    evaluate or sample), the weights the run evaluates: under ``--ema``, their average.
    """
    weights = ckpt["model"] if optimizer is None else ckpt.get("train_model", ckpt["model"])
    try:
        model.load_state_dict(weights)
        if optimizer is not None:
            _load_optimizer_state(optimizer, ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"the checkpoint does not fit its own config: {reason}") from None


IMPLEMENTATION_KEYS = ("fused", "foreach")  # how an optimizer runs, not what it computes


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """The saved state and hyperparameters, run by the implementation built now.

    ``load_state_dict`` takes the saved groups' settings whole, so a checkpoint
    from before the optimizers were fused would turn ``fused`` off for good; the
    fused AdamW keeps its step counts as float32 on the parameters' device.
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
    """The learning rate for optimizer step ``step`` (counted from 0)."""
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if cfg.decay_step is not None and step >= cfg.decay_step else 1.0)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def resolve_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """auto → cuda where there is one, else cpu; under several processes, one GPU per process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available (try auto)")
    if name == "cuda" and ranks is not None and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


@torch.no_grad()
def evaluate(
    model: nn.Module, X: Tensor, Y: Tensor, ranks: Ranks = SINGLE, batch_size: int = 16384
) -> float:
    """Mean cross-entropy over the whole split, in eval mode (running BatchNorm statistics).

    Under several processes each evaluates its own slice of the split and the
    sums are added up, so every example counts once.
    """
    was_training = model.training
    model.eval()
    n = len(X)
    X, Y = X[shard(n, ranks)], Y[shard(n, ranks)]  # this rank's slice of the split
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for start in range(0, len(X), batch_size):
        logits, _ = model(X[start : start + batch_size])
        total += F.cross_entropy(logits, Y[start : start + batch_size], reduction="sum")
    model.train(was_training)
    return all_reduce_sum(total, ranks).item() / n


def eval_train_subset(X: Tensor, Y: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """What the periodic evals measure the train loss on: the whole split, or
    ``cfg.eval_train_examples`` examples drawn once (so every eval sees the same ones).

    The whole train split is 8× the val split: on short runs that evaluate often,
    its forward pass can cost more than the training itself.
    """
    n = cfg.eval_train_examples
    if n == 0 or n >= len(X):
        return X, Y
    g = torch.Generator().manual_seed(cfg.seed + 3)  # its own stream: the batches stay the same
    ix = torch.randperm(len(X), generator=g)[:n].to(X.device)
    return X[ix], Y[ix]


LSUV_BATCH = 1024  # training examples in the one batch --init lsuv measures on


def data_init_(
    model: MLPLanguageModel, X: Tensor, seed: int, verbose: bool = True
) -> list[LSUVLayer] | None:
    """``--init lsuv``: LSUV on one batch of training contexts; any other init: nothing.

    The batch and the orthonormal matrices come from their own generator, so the
    batch order (and every other random draw) is the same as with any other init.
    """
    if model.config.init != "lsuv":
        return None
    g = torch.Generator().manual_seed(seed + 2)
    ix = torch.randint(0, len(X), (LSUV_BATCH,), generator=g)
    layers = model.lsuv_(X[ix.to(X.device)], generator=g)
    scaled = [r for r in layers if r.target is not None]
    line = f"lsuv: {len(scaled)} of {len(layers)} hidden layers scaled"
    if scaled:
        line += (
            f", variance after {scaled[0].feeds} {min(r.variance for r in scaled):.3f}–"
            f"{max(r.variance for r in scaled):.3f} (target {scaled[0].target:.3f}), "
            f"at most {max(r.iterations for r in scaled)} iterations"
        )
    if len(scaled) < len(layers):
        line += f"; {len(layers) - len(scaled)} skipped: they feed a normalization"
    if verbose:
        print(line)
    return layers


class _SigintFlag:
    """Turn the first Ctrl-C into a flag checked between steps, so no step is left half done.

    With ``also_sigterm`` SIGTERM counts as Ctrl-C: torchrun answers a Ctrl-C by
    sending SIGTERM to its workers, which then still save their checkpoint.
    """

    def __init__(self, also_sigterm: bool = False) -> None:
        self.signals = (signal.SIGINT, signal.SIGTERM) if also_sigterm else (signal.SIGINT,)

    def __enter__(self):
        self.received = set()
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    @property
    def raised(self) -> bool:
        return bool(self.received)

    def _handle(self, signum, frame):
        if signum in self.received:  # a second Ctrl-C: stop now (SIGINT then SIGTERM is one)
            raise KeyboardInterrupt
        self.received.add(signum)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut short by a kill is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` (atomically) with only the rows for which ``keep(row)`` holds."""
    rows = [row for row in _read_jsonl(path) if keep(row)]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return rows


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


@torch.no_grad()
def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


@torch.no_grad()
def eval_mode_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The loss of a batch in eval mode: against the train-mode loss, BatchNorm's mismatch."""
    was_training = model.training
    model.eval()
    _, loss = model(x, y)
    model.train(was_training)
    return loss.item()


def _rng_state(batch_gen: torch.Generator, device: torch.device, ranks: Ranks) -> dict:
    """The batch sampler's state, and this process's own RNG (dropout): every rank's when several.

    A collective under several processes: every rank calls it at the same step.
    """
    own = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    state = {**own, "batch": batch_gen.get_state()}
    if ranks.distributed:
        state["ranks"] = gather_objects(own, ranks)
    return state


def _restore_rng_state(
    state: dict, batch_gen: torch.Generator, device: torch.device, ranks: Ranks, fresh_seed: int
) -> None:
    batch_gen.set_state(state["batch"])
    own = state
    if ranks.distributed:
        saved = state.get("ranks", [])
        if len(saved) == ranks.world_size:
            own = saved[ranks.rank]
        else:  # saved by another number of processes: a fresh dropout stream for each rank
            torch.manual_seed(hash((fresh_seed, ranks.rank)))
            return
    torch.set_rng_state(own["torch"])
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], device)


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


def fast_step(
    model: MLPLanguageModel,
    optimizer: torch.optim.Optimizer,
    tcfg: TrainConfig,
    ranks: Ranks,
    say,
) -> FastStep | None:
    """``--compile``: the compiled hand-written step, or None (with a line why) where it can't."""
    if not tcfg.compile:
        return None
    reason = "several processes" if ranks.distributed else unsupported(model, tcfg.optimizer)
    if reason is not None:
        say(f"--compile does not cover {reason}; training with autograd")
        return None
    return FastStep(model, optimizer)


def _global_outcome(loss: Tensor, interrupted: bool, ranks: Ranks) -> tuple[float, bool]:
    """The loss over the whole batch, and whether any process was interrupted.

    Every rank then takes the same decisions (stop on a NaN, checkpoint on
    Ctrl-C), so none is left waiting in a collective the others have left.
    """
    if not ranks.distributed:
        return loss.item(), interrupted
    flag = torch.tensor(float(interrupted), dtype=torch.float64, device=loss.device)
    shared = all_reduce_sum(torch.stack((loss.detach().double(), flag)), ranks)  # (2,)
    return shared[0].item(), bool(shared[1].item())


def load_run_data(ckpt: dict, path: str | None = None) -> Dataset:
    """The data a checkpoint was trained on (from ``path`` if it moved), checked by SHA-256."""
    path = path if path is not None else ckpt["train_config"]["data"]
    block_size = ckpt["model_config"]["block_size"]
    data = load_dataset(path, block_size, vocab=Vocab(tuple(ckpt["vocab"])))
    if data.sha256 != ckpt["data_sha256"]:
        raise DataError(f"data file {data.path} has changed since this run started")
    return data


def prepare_run(
    model_config: ModelConfig, train_config: TrainConfig, out: Path, resume: bool
) -> tuple[ModelConfig, TrainConfig, dict | None, Dataset]:
    """Check the run folder, load the checkpoint when resuming, and load the data."""
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        stored = TrainConfig.from_dict(ckpt["train_config"])
        # where it runs may change on resume; what it computes may not
        stored.device, stored.threads = train_config.device, train_config.threads or stored.threads
        train_config = stored
    elif out.exists() and not out.is_dir():
        raise NormlabError(f"--out {out} is a file; the run folder must be a folder")
    elif (out / CHECKPOINT_NAME).exists():
        raise NormlabError(
            f"{out} already holds a run; continue it with --resume, or choose another --out"
        )
    check_configs(model_config, train_config)
    if ckpt:
        data = load_run_data(ckpt)
    else:
        data = load_dataset(train_config.data, model_config.block_size)
    model_config.vocab_size = data.vocab.size
    return model_config, train_config, ckpt, data


def train(
    model_config: ModelConfig, train_config: TrainConfig, out: Path, resume: bool = False
) -> dict | None:
    """Train (or resume) a run in ``out`` and return its summary.

    Under ``torch.distributed`` with several processes (e.g. torchrun), every
    process calls this: each takes its slice of every global batch, DDP sums the
    gradients, and rank 0 alone prints and writes; the others return None.
    """
    wall_start = time.perf_counter()
    out = Path(out)
    ranks = current_ranks()
    error = None
    try:
        mcfg, tcfg, ckpt, data = prepare_run(model_config, train_config, out, resume)
        device = resolve_device(tcfg.device, ranks)
        if tcfg.batch_size < ranks.world_size:
            raise ConfigError(
                f"--batch-size {tcfg.batch_size} is the global batch and needs at least one "
                f"example for each of the {ranks.world_size} processes"
            )
    except NormlabError as e:
        error = e
    agree(error, ranks)  # every process stops here if any one failed its checks
    say = print if ranks.is_main else lambda *args, **kwargs: None
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    config = {"model": asdict(mcfg), "train": asdict(tcfg)}
    say(("resuming " if ckpt else "") + "config:\n" + json.dumps(config, indent=2))
    say(
        f"data: {data.path} ({data.n_items:,} items, vocabulary "
        f"{data.vocab.display()!r}); examples: "
        + ", ".join(f"{k} {len(v[1]):,}" for k, v in data.splits.items())
    )
    if ranks.distributed:
        say(
            f"{ranks.world_size} processes, {tcfg.batch_size} examples per step in all, "
            f"BatchNorm statistics {'over all of them' if tcfg.sync_batchnorm else 'per process'}"
        )

    torch.manual_seed(tcfg.seed + ranks.rank)  # the dropout masks: each rank its own
    model = MLPLanguageModel(
        mcfg, generator=torch.Generator().manual_seed(tcfg.seed), verbose=ranks.is_main
    ).to(device)
    for module in model.modules():
        if isinstance(module, nl.BatchNorm1d):
            module.sync = tcfg.sync_batchnorm
    optimizer = make_optimizer(model, tcfg)
    # the same global batches on every rank
    batch_gen = torch.Generator().manual_seed(tcfg.seed + 1)
    Xtr, Ytr = (t.to(device) for t in data.splits["train"])
    Xva, Yva = (t.to(device) for t in data.splits["val"])
    Xev, Yev = eval_train_subset(Xtr, Ytr, tcfg)
    if not ckpt:  # a resumed run loads its weights: LSUV happens once, when a run starts
        data_init_(model, Xtr, tcfg.seed, verbose=ranks.is_main)

    averaged = weight_average(model, tcfg.ema)
    eval_model = model if averaged is None else averaged.module  # what evals and the run report
    progress = Progress()
    metrics_path, diag_path = out / "metrics.jsonl", out / "diagnostics.jsonl"
    diag = Diagnostics(model) if tcfg.diagnose_every > 0 and ranks.is_main else None
    if ckpt:
        load_state(model, optimizer, ckpt)
        progress = Progress(**ckpt["progress"])
        if averaged is not None:
            averaged.module.load_state_dict(ckpt["model"])
            averaged.n_averaged.fill_(progress.step)  # one update per step
        _restore_rng_state(ckpt["rng"], batch_gen, device, ranks, hash((tcfg.seed, progress.step)))
        if ranks.is_main:
            # a killed run may have logged past its checkpoint: keep what the checkpoint covers
            # (an eval at step k follows update k; a recording at step k precedes update k + 1)
            _truncate_jsonl(metrics_path, lambda row: row["step"] <= progress.step)
            kept = _truncate_jsonl(diag_path, lambda row: row["step"] < progress.step)
            if diag is not None:
                diag.history = [snapshot_from_dict(row) for row in kept]
    elif ranks.is_main:
        atomic_write_json(out / "config.json", config)
        metrics_path.write_text("")
        diag_path.write_text("")
    writer = open_tensorboard(out) if tcfg.tensorboard and ranks.is_main else None
    step_model = model  # what the training step calls: the model, or DDP around it
    fast = fast_step(model, optimizer, tcfg, ranks, say)
    if ranks.distributed:
        step_model = wrap_ddp(model, device)

    def checkpoint() -> None:
        rng = _rng_state(batch_gen, device, ranks)  # on every rank: it gathers theirs
        if not ranks.is_main:
            return
        save_checkpoint(
            out,
            {
                "model_config": asdict(mcfg),
                "train_config": asdict(tcfg),
                "vocab": list(data.vocab.chars),
                "data_sha256": data.sha256,
                "progress": asdict(progress),
                "model": eval_model.state_dict(),  # what eval and sample load
                **({} if averaged is None else {"train_model": model.state_dict()}),
                "optimizer": optimizer.state_dict(),
                "rng": rng,
            },
        )

    def clock() -> None:  # add the time since the last call to the run's training time
        nonlocal segment_start
        now = time.perf_counter()
        progress.train_time_s += now - segment_start
        segment_start = now

    if not ckpt:
        checkpoint()  # a run killed before its first periodic checkpoint can still resume

    met_target = progress.time_to_target_s is not None
    bar = tqdm(
        total=tcfg.steps,
        initial=progress.step,
        unit="step",
        desc="train",
        disable=None if ranks.is_main else True,
    )
    rows = shard(tcfg.batch_size, ranks)  # this rank's rows of every global batch
    segment_start = time.perf_counter()
    with _SigintFlag(also_sigterm=ranks.distributed) as sigint:
        while progress.step < tcfg.steps and not met_target:
            step_start = time.perf_counter()
            lr = lr_at(progress.step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ix = torch.randint(0, len(Xtr), (tcfg.batch_size,), generator=batch_gen)
            ix = ix[rows].to(device)
            xb, yb = Xtr[ix], Ytr[ix]
            recording = diag is not None and progress.step % tcfg.diagnose_every == 0
            if fast is not None and not recording:  # recordings need autograd's hooks
                loss = fast(xb, yb, lr)
            else:
                if recording:
                    diag.arm()
                logits, _ = step_model(xb)
                # this rank's share of the global mean (on one process, bitwise the mean itself)
                loss = F.cross_entropy(logits, yb, reduction="sum") / tcfg.batch_size
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                eval_loss = eval_mode_loss(model, xb, yb) if recording else None
                optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            loss_value, interrupted = _global_outcome(loss, sigint.raised, ranks)
            if recording:
                # the train-mode loss of the rows the hooks saw: on several processes, this rank's
                rows_loss = loss_value
                if ranks.distributed:
                    rows_loss = loss.item() * tcfg.batch_size / len(ix)
                snap = diag.collect(progress.step, rows_loss, eval_loss)
                _append_jsonl(diag_path, snapshot_to_dict(snap))
                if writer is not None:
                    log_snapshot(writer, snap)
            progress.add_step_time(time.perf_counter() - step_start, recording)
            progress.step += 1
            step = progress.step
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"the loss became {loss_value} at step {step}; stopped, and the last good "
                    f"checkpoint in {out} is kept (try a lower --lr)"
                )
            if progress.init_loss is None:
                progress.init_loss = loss_value
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                train_loss = evaluate(eval_model, Xev, Yev, ranks)
                val_loss = evaluate(eval_model, Xva, Yva, ranks)
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    raise TrainingDiverged(
                        f"the evaluation loss became {val_loss} at step {step}; stopped, and "
                        f"the last good checkpoint in {out} is kept (try a lower --lr)"
                    )
                clock()
                if tcfg.target_val_loss is not None and val_loss <= tcfg.target_val_loss:
                    met_target, progress.time_to_target_s = True, progress.train_time_s
                row = {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr}
                if ranks.is_main:
                    _append_jsonl(metrics_path, row)
                if writer is not None:
                    log_metrics(writer, row)
                if ranks.is_main:
                    bar.write(
                        f"step {step:>7,}: train {train_loss:.4f}  val {val_loss:.4f}  lr {lr:.2e}"
                    )
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or met_target or interrupted:
                clock()
                if not _all_finite(model):  # never overwrite a good checkpoint with a broken model
                    raise TrainingDiverged(
                        f"the weights became NaN or infinite by step {step}; stopped, and the "
                        f"last good checkpoint in {out} is kept (try a lower --lr)"
                    )
                checkpoint()
            if interrupted:
                bar.close()
                raise Interrupted(
                    f"interrupted at step {step}; checkpoint saved, continue with: "
                    f"normlab train --out {out} --resume"
                )
    bar.close()
    clock()
    if writer is not None:
        writer.close()
    if not ranks.is_main:
        return None
    return finish_run(eval_model, data, config, out, progress, wall_start, diag)


def finish_run(
    model: nn.Module,
    data: Dataset,
    config: dict,
    out: Path,
    progress: Progress,
    wall_start: float,
    diag: Diagnostics | None,
) -> dict:
    """Final losses (test once), summary.json, 20 samples, verdicts and report.html."""
    tcfg = TrainConfig.from_dict(config["train"])
    device = next(model.parameters()).device
    losses = {
        f"{name}_loss": evaluate(model, *(t.to(device) for t in data.splits[name]))
        for name in ("train", "val", "test")
    }
    step, train_time, time_to_target = (
        progress.step,
        progress.train_time_s,
        progress.time_to_target_s,
    )
    metrics = _read_jsonl(out / "metrics.jsonl")
    summary = {
        **losses,
        "steps": step,
        "wall_s": round(time.perf_counter() - wall_start, 3),  # start-up to the final evaluation
        "train_time_s": round(train_time, 3),
        "steps_per_s": round(step / train_time, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "preset": tcfg.preset,
        "seed": tcfg.seed,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "init_loss": progress.init_loss,
        "target_val_loss": tcfg.target_val_loss,
        "time_to_target_s": None if time_to_target is None else round(time_to_target, 3),
        "best_val_loss": min((r["val_loss"] for r in metrics), default=None),
        "diagnostics_recordings": progress.recorded_steps,
        "diagnostics_s": round(progress.diagnostics_s(), 3),
        "diagnostics_share": round(progress.diagnostics_s() / train_time, 4),
    }
    atomic_write_json(out / "summary.json", summary)
    print(
        f"\nsteps {step:,} | train {losses['train_loss']:.4f} | val {losses['val_loss']:.4f} | "
        f"test {losses['test_loss']:.4f} | {summary['wall_s']:.1f} s"
    )
    if tcfg.target_val_loss is not None:
        reached = (
            "not reached" if time_to_target is None else f"reached after {time_to_target:.1f} s"
        )
        print(f"target val loss {tcfg.target_val_loss}: {reached}")
    samples = sample_run(model, data, 20, seed=tcfg.seed)
    print(format_samples(samples))
    diag_report = None
    if diag is not None and diag.history:
        print(
            f"diagnostics: {progress.recorded_steps} recordings took "
            f"{summary['diagnostics_s']:.2f} s, "
            f"{summary['diagnostics_share']:.1%} of the training time"
        )
        diag_report = diagnostics_report(diag, num_classes=data.vocab.size)
        fired = diag_report.verdicts
        print(
            f"diagnostics at step {diag_report.snapshot.step:,}: "
            + ("; ".join(f"{v.kind} ({v.layer})" for v in fired) if fired else "no verdict fired")
        )
    page = render_html(
        f"normlab run {out}",
        config,
        summary,
        metrics,
        diag_report,
        diag.history if diag else [],
        samples,
    )
    write_report(out / "report.html", page)
    print(f"run folder: {out} (open report.html)")
    return summary
