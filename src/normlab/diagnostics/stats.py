"""The statistics of one recording: for every tensor of a list, named columns.

Every function takes all the tensors of one kind (the layers' outputs, their gradients, the
parameters, BatchNorm's inputs) and returns ``{column: (G,) or (G, k) tensor}``, one row per
tensor; ``flatten`` lays all of them out in one tensor (where, ``layout`` says), which
``host_rows`` brings to the host in one transfer and hands back by name.

On the CPU, in float32 or float64, the C++ operators of ``normlab.nn.kernel.stats_ops``
compute every column of a kind for the whole list in one call, each tensor measured whole
(its moments, then its histogram while its values are in the cache) before the next: no
per-operator cost per layer, which on a model of many small layers in many shapes is most of
a recording. Elsewhere (another device or dtype, or no kernel) the ATen operators below compute
them a group of same-shaped tensors at a time: a few dozen operations per group instead of per
tensor. The two agree to float rounding, their histograms and percentiles exactly.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from normlab.diagnostics.snapshot import PERCENTILES
from normlab.nn import SATURATION, Kind
from normlab.nn.kernel import stats_ops, traced

BINS = 50  # histogram bins kept per layer
FINE_BINS = 1000  # the finer histogram the percentiles come from (a multiple of BINS)
HIST_SAMPLE = 16_384  # histograms and percentiles use at most about 2× this many values a row
GROUP_NUMEL = 1 << 22  # values measured at once, at most (or one tensor): bounds the temporaries
ALONE_NUMEL = 1 << 16  # a tensor this big is measured alone: stacking it would only copy it
KERNEL_DTYPES = (torch.float32, torch.float64)
COUNTS = ("hist", "grad_hist")  # the columns of histogram counts: whole numbers, as ints
PERCENTILE_COLUMNS = tuple(f"p{p}" for p in PERCENTILES)  # output_stats's, one per percentile

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
    fraction (rectifying kinds), histogram range and histogram. ``outputs`` are ``(B, ...)``.

    A saturating layer's output is saturated beyond ``SATURATION`` of its half range from the
    middle (``|t| > 0.97`` for tanh). A rectifying layer's unit is dead when it never rises
    above the activation's value at 0 over the batch; a unit is an output element of an
    example, or for outputs of 4 dimensions or more (convolutions) a channel at every position.
    """
    ops = _kernel(outputs)
    if ops is None:
        return _in_groups(
            outputs, lambda i: _output_stats_aten([kinds[k] for k in i], _at(outputs, i))
        )
    xs = [o.contiguous() for o in outputs]  # the operators have no autograd: no detach
    mid, half, end, floor = zip(*(_measures(k) for k in kinds), strict=True)
    per_example, positions = zip(
        *(units(x) if k.family == "rectifying" else (0, 0) for k, x in zip(kinds, xs, strict=True)),
        strict=True,
    )
    columns, hist = ops.output_summary(
        xs,
        mid,
        half,
        end,
        floor,
        per_example,
        positions,
        SATURATION,
        PERCENTILES,
        FINE_BINS,
        BINS,
        HIST_SAMPLE,
    )  # (5 + P, G): mean, std, range, saturated, dead, the percentiles
    return _output_columns(*columns[:5], hist, columns[5:])


_MEASURES: dict[Kind, tuple[float, float, float, float]] = {}


def _measures(kind: Kind) -> tuple[float, float, float, float]:
    """A kind's middle, half range and largest end (saturating kinds; NaN for others) and
    floor (rectifying kinds; NaN for others), for ``output_summary``."""
    measures = _MEASURES.get(kind)
    if measures is None:
        nan = math.nan
        mid = half = end = floor = nan
        if kind.family == "saturating":
            mid, half = (kind.low + kind.high) / 2, (kind.high - kind.low) / 2
            end = max(abs(kind.low), abs(kind.high))
        if kind.family == "rectifying":
            floor = kind.floor or 0.0
        measures = _MEASURES[kind] = (mid, half, end, floor)
    return measures


def _output_columns(mean, std, r, saturated, dead, hist, at_percentiles) -> Columns:
    """``output_stats``'s columns: ``hist`` (G, BINS) over ``[-r, r]``, ``at_percentiles``
    (P, G) the PERCENTILES."""
    return {
        "mean": mean,
        "std": std,
        **dict(zip(PERCENTILE_COLUMNS, at_percentiles, strict=True)),
        "saturated": saturated,
        "dead": dead,
        "hist_range": r,
        "hist": hist,
    }


def units(x: Tensor) -> tuple[int, int]:
    """An output's ``(units, positions)`` per example, what ``dead`` is judged over: a conv's
    channels at each position, otherwise each element."""
    shape = x.shape
    if len(shape) >= 4:
        return shape[1], math.prod(shape[2:])
    return math.prod(shape[1:]), 1


def _output_stats_aten(kinds: list[Kind], outputs: list[Tensor]) -> Columns:
    """``output_stats`` of same-shaped outputs, on ATen operators."""
    x = _stack([o.float().reshape(o.shape[0], -1) for o in outputs])  # (G, B, units)
    flat = x.flatten(1)  # (G, N)
    device = x.device
    # (G,) each, NaN where the layer's family has none (_measures)
    mid, half, end, floor = torch.tensor([_measures(k) for k in kinds], device=device).T
    # a saturating layer's histogram spans its whole range, so that plots compare; others
    # span their largest value
    r = torch.where(end.isnan(), row_absmax(flat).clamp_min(1e-12), end)  # (G,)
    fine = histograms(flat, r, FINE_BINS).view(-1, FINE_BINS)  # (G, FINE_BINS)
    nan = torch.full_like(r, math.nan)  # each fraction is measured where some layer needs it
    saturated = nan
    if not mid.isnan().all():
        saturated = ((flat - mid[:, None]).abs() > SATURATION * half[:, None]).float().mean(1)
        saturated = saturated.where(~mid.isnan(), nan)
    dead = nan
    if not floor.isnan().all():
        units = x if outputs[0].dim() < 4 else x.view(*x.shape[:2], outputs[0].shape[1], -1)
        above = units > floor.view(-1, *[1] * (units.dim() - 1))  # (G, B, units [, positions])
        alive = above.any(dim=1) if units.dim() == 3 else above.any(dim=3).any(dim=1)
        dead = (1 - alive.float().mean(1)).where(~floor.isnan(), nan)
    hist = fine.view(-1, BINS, FINE_BINS // BINS).sum(2)  # (G, BINS)
    at_percentiles = percentiles(fine, r)  # (G, P)
    return _output_columns(flat.mean(1), row_std(flat), r, saturated, dead, hist, at_percentiles.T)


def spread_stats(tensors: list[Tensor | None]) -> Columns:
    """Per tensor: mean, std, range (max |x|) and histogram; NaN for an absent tensor."""
    ops = _kernel(tensors)
    if ops is None:
        device = next((t.device for t in tensors if t is not None), None)
        present = [
            t if t is not None else torch.full((1,), math.nan, device=device) for t in tensors
        ]
        return _in_groups(present, lambda i: _spread_stats_aten(_at(present, i)))
    if all(t is None for t in tensors):  # no tensor to dispatch the operators on
        nan = torch.full((len(tensors),), math.nan, dtype=torch.float64)
        return {"mean": nan, "std": nan, "range": nan, "hist": torch.zeros(len(tensors), BINS)}
    xs = [t.contiguous() if t is not None else None for t in tensors]
    moments, r, hist = ops.spread(xs, BINS, HIST_SAMPLE)  # (G, 4): mean, std, min, max
    return {"mean": moments[:, 0], "std": moments[:, 1], "range": r, "hist": hist}


def _spread_stats_aten(tensors: list[Tensor]) -> Columns:
    """``spread_stats`` of same-shaped tensors, on ATen operators."""
    rows = _stack([t.detach().float().flatten() for t in tensors])  # (G, N)
    r = row_absmax(rows).clamp_min(1e-30)
    return {
        "mean": rows.mean(1),
        "std": row_std(rows),
        "range": r,
        "hist": histograms(rows, r, BINS).view(-1, BINS),
    }


class ParamCopies(NamedTuple):
    """The parameters as they were before the step (``copy_params``)."""

    tensors: list[Tensor]  # a copy of each
    moments: Tensor | None  # (G, 4): mean, std, min, max of each, where the C++ operator copied


def copy_params(params: list[Tensor]) -> ParamCopies:
    """A copy of each parameter, for the step's update. On the CPU, in float32 or float64, the
    C++ operator also measures each one's moments in the pass that copies it (contiguous
    copies); elsewhere ``param_stats`` measures the copies. A copy each: one buffer for all
    would be a fresh mapping every time, faulted in page by page, where the allocator reuses
    blocks of a parameter's size. Traced, the copies are the graph's clones, and the operator
    measures them."""
    ops = _kernel(params)
    if ops is None:
        return ParamCopies([p.detach().clone() for p in params], None)
    with torch.no_grad():  # the operator has no autograd
        # traced (a Parameter is a subclass of Tensor, its data not): inductor cannot return
        # copy_moments's list
        if params and traced(params[0].detach()):
            tensors = [p.detach().clone(memory_format=torch.contiguous_format) for p in params]
            return ParamCopies(tensors, ops.moments(tensors))
        tensors, moments = ops.copy_moments(params)
    return ParamCopies(tensors, moments)


def param_stats(
    before: ParamCopies, params: list[Tensor], grads: list[Tensor | None] | None = None
) -> Columns:
    """Per parameter: data std, update std, gradient std, range and histogram.

    ``params`` after the step, ``grads`` their gradients (None: each one's ``.grad``): a
    parameter without one (None) has NaN gradient columns. ``before`` are the recorder's own
    copies, taken at ``arm()``; on ATen operators the update is written into them, which saves
    allocating (and on the CPU, faulting in) one more copy of the weights.
    """
    if grads is None:
        grads = [p.grad for p in params]
    ops = _kernel([*before.tensors, *params, *grads])
    if ops is None or before.moments is None:
        copies = before.tensors
        return _in_groups(
            params,
            lambda i: _param_stats_aten(_at(copies, i), _at(params, i), _at(grads, i)),
        )
    # each parameter measured whole, its update and its gradient, while in the cache
    update, grad, r, hist = ops.param_spread(
        before.tensors,
        [p.contiguous() for p in params],
        [g.contiguous() if g is not None else None for g in grads],
        BINS,
        HIST_SAMPLE,
    )  # (G, 4) moments each: mean, std, min, max
    return {
        "data_std": before.moments[:, 1],
        "update_std": update[:, 1],
        "grad_std": grad[:, 1],
        "grad_range": r,
        "grad_hist": hist,
    }


def _param_stats_aten(
    before: list[Tensor], params: list[Tensor], grads: list[Tensor | None]
) -> Columns:
    """``param_stats`` of same-shaped parameters, on ATen operators."""
    b = _stack([t.float().reshape(-1) for t in before])  # (G, N)
    a = _stack([t.detach().float().reshape(-1) for t in params])
    grads = [
        g if g is not None else torch.full_like(p, math.nan)
        for p, g in zip(params, grads, strict=True)
    ]
    spread = _spread_stats_aten(grads)
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
    """Per BatchNorm: mean drift, variance ratio and time constants.

    ``inputs`` are the BatchNorms' inputs ``(B, C, *spatial)``; ``captured`` their
    ``BatchNormCapture``: the running statistics as they were before this batch updated them.
    """
    means, variances = [c.running_mean for c in captured], [c.running_var for c in captured]
    ops = _kernel([*inputs, *means, *variances])
    if ops is None:
        return _in_groups(inputs, lambda i: _batchnorm_stats_aten(_at(inputs, i), _at(captured, i)))
    drift = ops.batchnorm_drift(
        [x.contiguous() for x in inputs], means, variances, [c.eps for c in captured]
    )  # (G, 2): mean drift, variance ratio
    return {
        "mean_drift": drift[:, 0],
        "var_ratio": drift[:, 1],
        "time_constants": _time_constants(captured),
    }


def _batchnorm_stats_aten(inputs: list[Tensor], captured: list) -> Columns:
    """``batchnorm_stats`` of same-shaped inputs."""
    x = _stack([t.float() for t in inputs])  # (G, B, C, *spatial)
    dims = (1, *range(3, x.dim()))  # every axis but the layer and the feature (BatchNorm1d/2d/3d)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims)  # (G, C), biased: what the batch normalizes with
    mean = mean.flatten(1)  # (G, C)
    running_mean = torch.stack([c.running_mean for c in captured]).float()
    running_var = torch.stack([c.running_var for c in captured]).float()
    eps = torch.tensor([[c.eps] for c in captured], device=x.device)  # (G, 1)
    ratio = (running_var + eps) / (var + eps)
    return {
        "mean_drift": ((running_mean - mean).abs() / (var + eps).sqrt()).amax(1),
        "var_ratio": torch.maximum(ratio, 1 / ratio).amax(1),
        "time_constants": _time_constants(captured).to(x.device),
    }


def _time_constants(captured: list) -> Tensor:
    """(G,): the time constants each BatchNorm's running statistics have seen, batches ×
    momentum (a cumulative average counts as momentum 0.1)."""
    factor = [c.momentum if c.momentum is not None else 0.1 for c in captured]
    batches = torch.stack([c.batches_tracked for c in captured]).float()
    return batches * torch.tensor(factor, device=batches.device)


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, but one tensor as a view of itself rather than a copy."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _at(items: list, indices: list[int]) -> list:
    return [items[i] for i in indices]


def measured_by_kernel(tensors: list[Tensor]) -> bool:
    """Whether the statistics' C++ operators measure ``tensors`` (a model's parameters): what a
    traced recording needs, as the ATen path decides on values it reads on the host."""
    return _kernel(tensors) is not None


def _kernel(tensors: list[Tensor | None]):
    """The statistics' C++ operators, where they compute every one of ``tensors`` (absent
    ones aside): on the CPU, in float32 or float64."""
    ops = stats_ops()
    if ops is None:
        return None
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dtype in KERNEL_DTYPES):
            return None
    return ops


def _groups(tensors: list[Tensor]) -> list[list[int]]:
    """The indices of ``tensors`` in groups of one shape and device, of at most
    ``GROUP_NUMEL`` values (or one tensor) each; a tensor of ``ALONE_NUMEL`` values or more
    is a group of its own: stacking it would only copy it."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        key = (tuple(t.shape), t.device)
        if t.numel() >= ALONE_NUMEL:
            key = (*key, i)
        chunk = 0
        while len(groups.get((*key, chunk), ())) * t.numel() + t.numel() > GROUP_NUMEL:
            if not groups.get((*key, chunk)):
                break  # one tensor alone, whatever its size
            chunk += 1
        groups.setdefault((*key, chunk), []).append(i)
    return list(groups.values())


def _in_groups(tensors: list[Tensor], measure: Callable[[list[int]], Columns]) -> Columns:
    """``measure(indices)`` for each group of ``_groups(tensors)``, its rows put back in the
    order of ``tensors``."""
    groups = _groups(tensors)
    parts = [measure(indices) for indices in groups]
    if len(parts) == 1:
        return parts[0]
    order = [i for indices in groups for i in indices]
    where = torch.empty(len(order), dtype=torch.long)
    where[torch.tensor(order)] = torch.arange(len(order))  # row i of the result: row where[i]
    return {c: torch.cat([p[c] for p in parts])[where.to(parts[0][c].device)] for c in parts[0]}


class HostRows(NamedTuple):
    """One group's columns on the host: each a list with a row per name."""

    index: dict[str, int]  # name → its row
    columns: dict[str, list]  # column → its rows: floats, or lists for a (G, k) column


class Block(NamedTuple):
    """Where one column lies in ``flatten``'s tensor."""

    column: str
    rows: int
    width: int | None  # k of a (G, k) column; None for a (G,) column
    counts: bool  # a histogram's counts (COUNTS), among the counts at the end


# each group's kind and names, and its columns' blocks in the order flatten lays them out
Layout = list[tuple[str, list[str], list[Block]]]


def layout(groups: list[tuple[str, list[str], Columns]]) -> Layout:
    """Where ``flatten(groups)`` puts each column: fixed by the groups' names and shapes."""
    return [
        (
            what,
            names,
            [
                Block(c, t.shape[0], t.shape[1] if t.dim() > 1 else None, c in COUNTS)
                for c, t in group.items()
            ],
        )
        for what, names, group in groups
    ]


def flatten(groups: list[tuple[str, list[str], Columns]]) -> Tensor:
    """Every group's columns in one tensor of their widest dtype, on their device: the values,
    then the histograms' counts (whole numbers, exact in float32), each column row after
    row."""
    columns = [(c, t) for _, _, group in groups for c, t in group.items()]
    if not columns:
        return torch.empty(0)
    measured = [t.reshape(-1) for c, t in columns if c not in COUNTS]
    counted = [t.reshape(-1) for c, t in columns if c in COUNTS]
    return torch.cat(measured + counted)


def host_rows(layout: Layout, flat: Tensor) -> dict[str, HostRows]:
    """``flatten``'s tensor as Python numbers, in one transfer from the device:
    ``{what: HostRows}`` for the groups of ``layout``.

    A row of a (G,) column becomes a float, of a (G, k) column a list; a histogram's counts
    become ints.
    """
    values = flat.cpu()
    split = sum(b.rows * (b.width or 1) for _, _, blocks in layout for b in blocks if not b.counts)
    host_values = {False: values[:split].tolist(), True: values[split:].long().tolist()}
    offsets = {False: 0, True: 0}
    host: dict[str, HostRows] = {}
    for what, names, blocks in layout:
        rows = {}
        for b in blocks:
            start, n = offsets[b.counts], b.rows * (b.width or 1)
            block = host_values[b.counts][start : start + n]
            if b.width is not None:  # (G, k): a list per row
                k = b.width
                block = [block[i * k : (i + 1) * k] for i in range(b.rows)]
            rows[b.column] = block
            offsets[b.counts] = start + n
        host[what] = HostRows({name: i for i, name in enumerate(names)}, rows)
    return host
