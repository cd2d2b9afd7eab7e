"""The statistics of one recording, computed on the device for groups of same-shaped tensors.

A model's hidden layers mostly share one shape, so each statistic is computed
for a whole group at once: a few dozen operations per recording instead of a
few dozen per layer, which is what keeps a recording cheap on the CPU. Every
function returns named columns, ``{column: (G,) or (G, k) tensor}``, one row
per tensor of the group; ``to_host`` brings all of them to the host in one
transfer and hands them back by name.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from normlab.diagnostics.snapshot import PERCENTILES
from normlab.nn import SATURATION, Kind

BINS = 50  # histogram bins kept per layer
FINE_BINS = 1000  # the finer histogram the percentiles come from (a multiple of BINS)
HIST_SAMPLE = 16_384  # histograms and percentiles use at most about 2× this many values a row
GROUP_NUMEL = 1 << 22  # values measured at once, at most (or one tensor): bounds the temporaries
ALONE_NUMEL = 1 << 16  # a tensor this big is measured alone: stacking it would only copy it

Columns = dict[str, Tensor]


def histograms(rows: Tensor, r: Tensor, bins: int) -> Tensor:
    """Counts of each row of ``rows`` (G, N) in ``bins`` equal bins over ``[-r, r]`` (r: (G,)).

    Returns ``(G · bins,)``, row after row.
    """
    rows = rows[:, :: max(1, rows.shape[1] // HIST_SAMPLE)]  # an even subsample of a big layer
    G = rows.shape[0]
    # bin = floor((x + r) / (2r) · bins); values beyond ±r land in the end bins, NaN in bin 0
    position = ((rows / r[:, None] + 1) * (bins / 2)).nan_to_num_(0)
    idx = position.floor_().clamp_(0, bins - 1).long()
    idx += torch.arange(G, device=rows.device)[:, None] * bins  # each row its own block
    counts = torch.zeros(G * bins, device=rows.device)
    return counts.scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device=rows.device))


def percentiles(fine_hist: Tensor, r: Tensor) -> Tensor:
    """PERCENTILES (G, P) read off FINE_BINS histograms (G, FINE_BINS) over ``[-r, r]``.

    Interpolated within a bin, so exact to a bin width (0.2% of the range): a sort
    would be exact, but on the CPU it costs more than all the rest of a recording.
    """
    cdf = fine_hist.cumsum(1) / fine_hist.sum(1, keepdim=True)  # (G, FINE_BINS)
    q = torch.tensor(PERCENTILES, device=cdf.device, dtype=cdf.dtype) / 100
    q = q.expand(cdf.shape[0], -1).contiguous()  # (G, P)
    i = torch.searchsorted(cdf, q).clamp_(max=FINE_BINS - 1)  # first bin reaching each q
    below = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(q))
    within = ((q - below) / (cdf.gather(1, i) - below).clamp_min(1e-12)).clamp_(0, 1)
    return -r[:, None] + (i + within) * (2 * r[:, None] / FINE_BINS)


def row_std(rows: Tensor) -> Tensor:
    """Sample std of each row of (G, N), centred and squared in place.

    On the CPU this is several times faster than ``std(1)`` on several rows, and one
    temporary instead of two saves as much again on long rows; only one row of over 2M values
    is ``std`` itself, which needs no temporary the size of the row.
    """
    n = rows.shape[1]
    if rows.shape[0] == 1 and n > 1 << 21:
        return rows.std(1)
    centered = rows - rows.mean(1, keepdim=True)
    return (centered.square_().sum(1) / max(n - 1, 1)).sqrt()


def row_absmax(rows: Tensor) -> Tensor:
    """The largest magnitude in each row of (G, N), from its max and min: no copy of ``|x|``."""
    return torch.maximum(rows.amax(1), rows.amin(1).neg())


def output_stats(kinds: list[Kind], outputs: list[Tensor]) -> Columns:
    """Per layer: mean, std, percentiles, the saturated fraction (saturating kinds), the dead
    fraction (rectifying kinds), histogram range and histogram. ``outputs`` all have one
    shape ``(B, ...)``.

    A saturating layer's output is saturated beyond ``SATURATION`` of its half range from the
    middle (``|t| > 0.97`` for tanh). A rectifying layer's unit is dead when it never rises
    above the activation's value at 0 over the batch; a unit is an output element of an
    example, or for outputs of 4 dimensions or more (convolutions) a channel at every position.
    """
    x = _stack([o.float().reshape(o.shape[0], -1) for o in outputs])  # (G, B, units)
    flat = x.flatten(1)  # (G, N)
    device = x.device
    saturating = [k.family == "saturating" for k in kinds]
    mid = torch.tensor(
        [(k.low + k.high) / 2 if s else 0.0 for k, s in zip(kinds, saturating, strict=True)],
        device=device,
    )
    half = torch.tensor(
        [(k.high - k.low) / 2 if s else 1.0 for k, s in zip(kinds, saturating, strict=True)],
        device=device,
    )
    ends = torch.tensor(
        [
            max(abs(k.low), abs(k.high)) if s else 0.0
            for k, s in zip(kinds, saturating, strict=True)
        ],
        device=device,
    )
    # a saturating layer's histogram spans its whole range, so that plots compare; others span
    # their largest value
    largest = row_absmax(flat).clamp_min(1e-12)
    r = torch.where(torch.tensor(saturating, device=device), ends, largest)  # (G,)
    fine = histograms(flat, r, FINE_BINS).view(-1, FINE_BINS)  # (G, FINE_BINS)
    nan = torch.full_like(r, math.nan)  # each fraction is measured where some layer needs it
    saturated = nan
    if any(saturating):
        saturated = ((flat - mid[:, None]).abs() > SATURATION * half[:, None]).float().mean(1)
    dead = nan
    if any(k.family == "rectifying" for k in kinds):
        floor = torch.tensor(
            [k.floor if k.floor is not None else 0.0 for k in kinds], device=device
        )
        units = x if outputs[0].dim() < 4 else x.view(*x.shape[:2], outputs[0].shape[1], -1)
        above = units > floor.view(-1, *[1] * (units.dim() - 1))  # (G, B, units [, positions])
        alive = above.any(dim=1) if units.dim() == 3 else above.any(dim=3).any(dim=1)
        dead = 1 - alive.float().mean(1)
    return {
        "mean": flat.mean(1),
        "std": row_std(flat),
        **dict(zip((f"p{p}" for p in PERCENTILES), percentiles(fine, r).T, strict=True)),
        "saturated": saturated,
        "dead": dead,
        "hist_range": r,
        "hist": fine.view(-1, BINS, FINE_BINS // BINS).sum(2),  # (G, BINS)
    }


def spread_stats(tensors: list[Tensor]) -> Columns:
    """Per tensor: mean, std, range (max |x|) and histogram. One shape for all."""
    rows = _stack([t.detach().float().flatten() for t in tensors])  # (G, N)
    r = row_absmax(rows).clamp_min(1e-30)
    return {
        "mean": rows.mean(1),
        "std": row_std(rows),
        "range": r,
        "hist": histograms(rows, r, BINS).view(-1, BINS),
    }


def param_stats(before: list[Tensor], params: list[Tensor]) -> Columns:
    """Per parameter: data std, update std, gradient std, range and histogram.

    One shape for all; a parameter without a gradient has NaN gradient columns. ``before``
    are the recorder's own copies, taken at ``arm()``: the update is written into them, which
    saves allocating (and on the CPU, faulting in) one more copy of the weights.
    """
    b = _stack([t.float().reshape(-1) for t in before])  # (G, N)
    a = _stack([t.detach().float().reshape(-1) for t in params])
    grads = [p.grad if p.grad is not None else torch.full_like(p, math.nan) for p in params]
    spread = spread_stats(grads)
    data_std = row_std(b)
    update = torch.sub(a, b, out=b)  # b is a stack of, or a view of, the copies
    return {
        "data_std": data_std,
        "update_std": row_std(update),
        "grad_std": spread["std"],
        "grad_range": spread["range"],
        "grad_hist": spread["hist"],
    }


def batchnorm_stats(inputs: list[Tensor], captured: list) -> Columns:
    """Per BatchNorm: mean drift, variance ratio and time constants; one input shape for all.

    ``inputs`` are the BatchNorms' inputs ``(B, C, *spatial)``; ``captured`` their
    ``BatchNormCapture``: the running statistics as they were before this batch updated them.
    """
    x = _stack([t.float() for t in inputs])  # (G, B, C, *spatial)
    dims = (1, *range(3, x.dim()))  # every axis but the layer and the feature (BatchNorm1d/2d/3d)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims)  # (G, C), biased: what the batch normalizes with
    mean = mean.flatten(1)  # (G, C)
    running_mean = torch.stack([c.running_mean for c in captured]).float()
    running_var = torch.stack([c.running_var for c in captured]).float()
    eps = torch.tensor([[c.eps] for c in captured], device=x.device)  # (G, 1)
    ratio = (running_var + eps) / (var + eps)
    # time constants seen: batches × momentum (a cumulative average counts as momentum 0.1)
    factor = [c.momentum if c.momentum is not None else 0.1 for c in captured]
    batches = torch.stack([c.batches_tracked for c in captured]).float()
    return {
        "mean_drift": ((running_mean - mean).abs() / (var + eps).sqrt()).amax(1),
        "var_ratio": torch.maximum(ratio, 1 / ratio).amax(1),
        "time_constants": batches * torch.tensor(factor, device=x.device),
    }


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, but one tensor as a view of itself rather than a copy."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def grouped(
    named: dict[str, Tensor], stats: Callable[[list[str], list[Tensor]], Columns]
) -> list[tuple[list[str], Columns]]:
    """Apply ``stats(names, tensors)`` to each group of same-shaped tensors of ``named``, of
    at most ``GROUP_NUMEL`` values (or one tensor) each.

    Returns each group's names and its columns, one row per name.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in named.items():
        key = (tuple(t.shape), t.device)
        if t.numel() >= ALONE_NUMEL:
            key = (*key, name)  # its own group
        chunk = 0
        while len(groups.get((*key, chunk), ())) * t.numel() + t.numel() > GROUP_NUMEL:
            if not groups.get((*key, chunk)):
                break  # one tensor alone, whatever its size
            chunk += 1
        groups.setdefault((*key, chunk), []).append(name)
    return [(names, stats(names, [named[n] for n in names])) for names in groups.values()]


def to_host(groups: list[tuple[str, list[str], Columns]]) -> dict[tuple, dict]:
    """Every group's columns as Python numbers, in one transfer from the device:
    ``{(what, name): {column: its row}}`` for the groups ``(what, names, columns)``.

    A row of a (G,) column becomes a float, of a (G, k) column a list.
    """
    parts = [(what, names, c, t) for what, names, columns in groups for c, t in columns.items()]
    if not parts:
        return {}
    values = torch.cat([t.reshape(-1) for *_, t in parts]).cpu().tolist()
    host: dict[tuple, dict] = {}
    offset = 0
    for what, names, column, t in parts:
        width = t.numel() // len(names)
        for i, name in enumerate(names):
            row = values[offset + i * width : offset + (i + 1) * width]
            host.setdefault((what, name), {})[column] = row[0] if t.dim() == 1 else row
        offset += t.numel()
    return host
