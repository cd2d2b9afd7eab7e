"""``normlab bench``: the training loop's speed, steps per second after a warm-up."""

import time

import torch

from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import Dataset
from normlab.lm.distributed import SINGLE
from normlab.lm.loop import MemoryLog, run_loop
from normlab.lm.start import start_training


def bench(model_config: ModelConfig, train_config: TrainConfig, data: Dataset, steps: int) -> dict:
    """Time ``steps`` steps of ``normlab train``'s own loop after ``max(10, steps // 10)``
    warm-up steps (the compilation included, unless ``--no-compile``).

    What is timed is what a run does between two evaluations: batch, step (and
    every ``diagnose_every`` steps a recording), the loss check; the one
    evaluation at the end is not timed.
    """
    warmup = max(10, steps // 10)
    train_config.steps = warmup + steps
    t = start_training(model_config, train_config, data, SINGLE, quiet=True)
    log = MemoryLog("bench")
    start = time.perf_counter()
    run_loop(t, log)
    warmup_end, end = log.step_ends[warmup - 1], log.step_ends[-1]
    return {
        "steps_per_s": round(steps / (end - warmup_end), 1),
        "warmup_s": round(warmup_end - start, 2),
        "compiled": t.step.core.compile,
        "batch_size": train_config.batch_size,
        "preset": train_config.preset,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "device": str(next(t.model.parameters()).device),
    }
