"""``normlab coordcheck``: the coord check (``normlab.coord_check``) on normlab's own models,
along the width (``n_hidden``) or the depth (``n_layer``)."""

from dataclasses import replace

import torch

from normlab.coordcheck import CoordCheck, coord_check
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import Dataset
from normlab.lm.distributed import SINGLE
from normlab.lm.model import LanguageModel, batch_mean_loss
from normlab.lm.optim import make_optimizer
from normlab.lm.seeds import stream_seed
from normlab.lm.state import Batches

FIELDS = {"width": "n_hidden", "depth": "n_layer"}  # what a coord check varies: its config field


def coord_check_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: Dataset,
    sizes: list[int],
    along: str = "width",
    steps: int = 4,
    seeds: int = 2,
) -> CoordCheck:
    """The model of ``model_config`` at each of ``sizes`` hidden units (``along="width"``) or
    hidden blocks (``"depth"``), trained by the optimizer of ``train_config`` at its peak rate
    on the run's first ``steps`` batches, once per seed (``train_config.seed`` onwards). Under
    ``--param mup`` the base width is ``model_config.base_width``, or the narrowest of the
    widths."""
    field = FIELDS[along]
    base = model_config.base_width or (min(sizes) if along == "width" else model_config.n_hidden)

    def factory(size: int) -> LanguageModel:
        config = replace(model_config, **{field: size}, base_width=base)
        generator = torch.Generator().manual_seed(torch.initial_seed())  # coord_check's seed
        return LanguageModel(config, generator, verbose=False)

    X, Y = data.splits["train"]
    batches = Batches(
        X, Y, train_config.batch_size, stream_seed(train_config.seed, "batches"), SINGLE
    )
    return coord_check(
        factory,
        sizes,
        [batches.next() for _ in range(steps)],
        steps=steps,
        optimizer=lambda model: make_optimizer(model, train_config),
        loss_fn=batch_mean_loss,
        seeds=range(train_config.seed, train_config.seed + seeds),
        along=along,
    )
