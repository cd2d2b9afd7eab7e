"""Starting a run, or resuming one from its checkpoint: checks, device, data and ``Training``."""

from dataclasses import replace

import torch

from normlab import nn as nl
from normlab.diagnostics import Diagnostics
from normlab.errors import ConfigError
from normlab.lm.compiled import RECORDINGS_TO_COMPILE
from normlab.lm.config import ModelConfig, TrainConfig, check_configs
from normlab.lm.data import Dataset, load_dataset
from normlab.lm.distributed import Ranks, resolve_device, set_threads
from normlab.lm.evaluate import train_subset
from normlab.lm.init_schemes import describe_lsuv, lsuv_init_
from normlab.lm.model import LanguageModel
from normlab.lm.optim import lr_at, make_optimizer, weight_average
from normlab.lm.rundir import RunFolder
from normlab.lm.runs import load_run_data, load_state
from normlab.lm.seeds import dropout_seed, resumed_dropout_seed, stream_generator, stream_seed
from normlab.lm.state import Batches, Progress, Training, restore_rng
from normlab.lm.step import TrainStep


def start_training(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: Dataset,
    ranks: Ranks,
    model: LanguageModel | None = None,
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
        model = LanguageModel(mcfg, generator, verbose=ranks.is_main and not quiet)
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
        saved = ckpt["progress"]
        # a checkpoint from before these fields: every recording timed, and run untraced
        progress = Progress(
            **{"recordings": saved.get("recorded_steps", 0), "records_compiled": False, **saved}
        )
        if averaged is not None:
            averaged.module.load_state_dict(ckpt["model"])
            averaged.n_averaged.fill_(progress.step)  # one update per step
        fresh = resumed_dropout_seed(tcfg.seed, progress.step, ranks.rank)
        restore_rng(ckpt["rng"], batches, model, ranks, fresh)
    if progress.records_compiled is None:  # a new run: enough recordings to repay the compile
        every = tcfg.diagnose_every
        recordings = -(-tcfg.steps // every) if every else 0  # steps 0, every, 2 · every, ...
        progress.records_compiled = recordings >= RECORDINGS_TO_COMPILE
    step = TrainStep(
        model,
        optimizer,
        tcfg.batch_size,
        ranks,
        averaged,
        tcfg.compile,
        compile_recordings=progress.records_compiled,
    )
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
