"""The loss of a model on a whole split, in eval mode."""

import torch
from torch import Tensor, nn

from normlab.lm.distributed import SINGLE, Ranks, all_reduce_sum, shard
from normlab.lm.model import next_char_loss
from normlab.lm.seeds import stream_generator
from normlab.nn import set_mode


@torch.no_grad()
def evaluate(
    model: nn.Module, X: Tensor, Y: Tensor, ranks: Ranks = SINGLE, batch_size: int = 16384
) -> float:
    """Mean cross-entropy over the whole split, in eval mode (running BatchNorm statistics).

    Under several processes each evaluates its own slice of the split and the
    sums are added up, so every example counts once.
    """
    n = len(X)
    X, Y = X[shard(n, ranks)], Y[shard(n, ranks)]  # this rank's slice of the split
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    with set_mode(model, training=False):
        for start in range(0, len(X), batch_size):
            logits, _ = model(X[start : start + batch_size])
            total += next_char_loss(logits, Y[start : start + batch_size], over=1)
    return all_reduce_sum(total, ranks).item() / n


def train_subset(X: Tensor, Y: Tensor, examples: int, seed: int) -> tuple[Tensor, Tensor]:
    """What the periodic evaluations measure the train loss on: the whole split
    (``examples`` 0), or that many examples drawn once, so every evaluation sees the same ones.

    The whole train split is 8× the val split: on short runs that evaluate often,
    its forward pass can cost more than the training itself.
    """
    if examples == 0 or examples >= len(X):
        return X, Y
    g = stream_generator(seed, "train-subset")
    ix = torch.randperm(len(X), generator=g)[:examples].to(X.device)
    return X[ix], Y[ix]
