"""``normlab lr-find``: the learning-rate range test (``normlab.find_lr``) on a preset's model,
as a run would start it."""

from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import Dataset
from normlab.lm.distributed import SINGLE
from normlab.lm.model import batch_mean_loss
from normlab.lm.start import start_training
from normlab.lr_find import LRSweep, find_lr


def lr_range_test(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: Dataset,
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
) -> LRSweep:
    """Sweep the learning rate of a new run's model and optimizer (LSUV and all, as
    ``normlab train`` starts them) over ``steps`` of its training batches; the model's
    loss is the one it trains with. The sweep's batches come from the run's own
    generator: the same seed and flags give the same sweep."""
    t = start_training(model_config, train_config, data, SINGLE, quiet=True)
    batches = (t.batches.next() for _ in range(steps))
    return find_lr(t.model, batches, t.optimizer, batch_mean_loss, start_lr, end_lr, steps)
