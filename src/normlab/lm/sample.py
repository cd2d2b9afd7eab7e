"""Generate items from a trained model, many at once.

Generation runs in eval mode, so BatchNorm uses its running statistics and
each sample is independent of the others in its batch; all samples advance
together, one character per forward pass.
"""

import math

import torch

from normlab.errors import NormlabError
from normlab.lm.data import BOUNDARY, Dataset, Vocab
from normlab.nn import set_mode


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    vocab: Vocab,
    n: int,
    max_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    prefix: str = "",
    generator: torch.Generator | None = None,
) -> list[str]:
    """Sample ``n`` items of at most ``max_len`` characters, each starting with ``prefix``.

    Args:
        temperature: divides the logits; below 1 sharpens, above 1 flattens.
        top_k: sample only among the ``top_k`` most likely next characters.
        generator: a CPU generator for reproducible samples.
    """
    if n < 1:
        raise NormlabError(f"the number of samples must be at least 1, got {n}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise NormlabError(f"temperature must be a positive number, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab.size:
        raise NormlabError(
            f"top-k must be between 1 and the vocabulary size {vocab.size}, got {top_k}"
        )
    block_size = model.config.block_size
    device = next(model.parameters()).device
    context = [BOUNDARY] * block_size + vocab.encode(prefix)
    idx = torch.tensor(context[-block_size:], device=device).repeat(n, 1)  # (n, block_size)
    out = torch.zeros(n, max_len, dtype=torch.long)  # (n, max_len); 0 = boundary, ends an item
    rows = torch.arange(n)  # the samples still growing; finished ones leave the batch
    with set_mode(model, training=False):  # running statistics: each sample on its own
        for t in range(max_len):
            logits, _ = model(idx)  # (rows, vocab)
            logits = logits.float().cpu() / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, -1:]  # (rows, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (rows,)
            out[rows, t] = next_id
            growing = next_id != BOUNDARY
            if not growing.any():
                break
            rows = rows[growing]
            next_id = next_id[growing].to(device)
            idx = torch.cat([idx[growing.to(device), 1:], next_id.unsqueeze(1)], dim=1)
    return [prefix + vocab.decode(row) for row in out.tolist()]


def sample_run(
    model: torch.nn.Module, data: Dataset, n: int, seed: int, **options
) -> list[tuple[str, bool]]:
    """``n`` samples, each with whether it is in the training set (``options`` as for generate).

    Samples stop at twice the longest training item (plus 5): a name that long
    has lost its way.
    """
    max_len = 2 * data.max_item_len + 5
    generator = torch.Generator().manual_seed(seed)
    samples = generate(model, data.vocab, n, max_len, generator=generator, **options)
    train_set = set(data.train_items)
    return [(s, s in train_set) for s in samples]


def format_samples(samples: list[tuple[str, bool]]) -> str:
    """One sample a line, marked ``in train`` or ``new``, then how many are new."""
    width = max(12, *(len(s) + 2 for s, _ in samples))
    lines = [f"{s or '(empty)':<{width}} {'in train' if seen else 'new'}" for s, seen in samples]
    new = sum(not seen for _, seen in samples)
    lines.append(f"{new} of {len(samples)} new (not in the training set)")
    return "\n".join(lines)
