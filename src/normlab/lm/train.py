"""``train()``: a run from its configs to its run folder, started or resumed."""

import json
import time
from pathlib import Path

from normlab.errors import NormlabError
from normlab.lm.config import ModelConfig, TrainConfig, config_dict
from normlab.lm.data import Dataset
from normlab.lm.distributed import Ranks, agree, current_ranks
from normlab.lm.finish import finish_run
from normlab.lm.loop import run_loop
from normlab.lm.rundir import RunFolder
from normlab.lm.start import prepare_run, start_training


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
    process calls this: each takes its slice of every global batch, the step sums the
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
