"""The statistics' C++ operators (normlab.nn.kernel.stats_ops) against exact answers: each
tensor's moments against float64 torch, and every column a recording keeps against the ATen
path of normlab.diagnostics.stats, which computes the same columns a group of same-shaped
tensors at a time."""

import math

import pytest
import torch

from normlab.diagnostics import stats
from normlab.nn import layer_kind
from normlab.nn.kernel import stats_ops

pytestmark = pytest.mark.skipif(stats_ops() is None, reason="the C++ kernels are not built")


def _tensors(dtype=torch.float32):
    """Outputs of several shapes, as a model's layers give them: 2-D, conv-like 4-D, one long
    enough to be subsampled for its histogram, a constant one and one with dead units."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 6, 5, 5, generator=g, dtype=dtype) * 2 + 0.3
    dense = torch.randn(16, 40, generator=g, dtype=dtype)
    long = torch.randn(8, 9000, generator=g, dtype=dtype) * 5  # 72,000 values: every 4th
    constant = torch.full((16, 40), 0.7, dtype=dtype)
    relu = torch.relu(torch.randn(16, 40, generator=g, dtype=dtype) - 1.5)  # some units dead
    return [conv, dense, long, constant, relu, torch.tanh(dense * 3)]


def _moments(xs):
    """(G, 4): each tensor's mean, std, min and max, from the ``spread`` operator."""
    return stats_ops().spread(xs, stats.BINS, stats.HIST_SAMPLE)[0]


def _aten(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(stats, "stats_ops", lambda: None)
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_equal_float64_torch(dtype):
    xs = _tensors(dtype)
    got = _moments(xs)
    for row, x in zip(got, xs, strict=True):
        exact = x.double()
        want = torch.stack([exact.mean(), exact.std(), exact.min(), exact.max()])
        torch.testing.assert_close(row, want, rtol=1e-6, atol=1e-7)
    # the moments taken as the parameters are copied, and those of an update
    copies, data = stats_ops().copy_moments(xs)
    torch.testing.assert_close(data, got, rtol=0, atol=0)  # the same pass
    for copy, x in zip(copies, xs, strict=True):
        assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()
    before = [x * 0.5 for x in xs]
    update, *_ = stats_ops().param_spread(before, xs, [None] * len(xs), 50, 100)
    for row, x, b in zip(update, xs, before, strict=True):
        d = x.double() - b.double()
        torch.testing.assert_close(row[1], d.std(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 64, 95, 1000])
def test_moments_of_every_length_hold_the_tail_values(n):
    """The passes sum in 32 lanes and take the last n % 32 values one by one: every length,
    with the extremes placed last, and the difference form, against float64 torch."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) + 3
    x[-1] = -50.0 if n > 1 else x[-1]  # the minimum in the tail
    b = torch.randn(n, generator=g)
    got = _moments([x, torch.full((n,), 0.25)])
    difference = stats_ops().param_spread([b], [x], [None], 50, 100)[0]
    for row, d in ((got[0], x.double()), (difference[0], x.double() - b.double())):
        std = d.std() if n > 1 else torch.tensor(0.0, dtype=torch.float64)
        want = torch.stack([d.mean(), std, d.min(), d.max()])
        torch.testing.assert_close(row, want, rtol=1e-6, atol=1e-6)
    assert got[1].tolist() == [0.25, 0.0, 0.25, 0.25]  # a constant's std is exactly 0


def test_a_nan_or_an_absent_tensor_is_a_row_of_nan():
    x = torch.randn(10)
    x[3] = math.nan
    moments, r, hist = stats_ops().spread([x, None, torch.ones(3)], 4, 100)
    assert moments[0].isnan().all() and moments[1].isnan().all()
    assert moments[2].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert r[:2].isnan().all() and r[2] == 1.0
    # NaN in bin 0, as stats.histograms bins it; an absent tensor has no counts
    assert hist.tolist() == [[10, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]]


def test_a_spread_spans_the_largest_magnitude_and_counts_as_the_aten_histograms():
    """``spread``'s range is the largest magnitude as a float32, at least 1e-30 (a tensor of
    zeros), and its counts, of a subsampled tensor too, are the ATen path's exactly."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(70_000, generator=g) * 3, torch.zeros(5), torch.randn(4, 5, generator=g)]
    _, r, hist = stats_ops().spread(xs, stats.BINS, stats.HIST_SAMPLE)
    for x, r_x, counts in zip(xs, r, hist, strict=True):
        assert r_x == x.abs().max().clamp_min(1e-30)
        want = stats.histograms(x.reshape(1, -1), r_x[None], stats.BINS)
        torch.testing.assert_close(counts, want, rtol=0, atol=0)
    assert r[1].item() == pytest.approx(1e-30) and hist[1, stats.BINS // 2] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_output_column_equals_the_aten_path(monkeypatch, dtype):
    xs = _tensors(dtype)
    kinds = [layer_kind(m) for m in (torch.nn.Conv2d(1, 1, 1), torch.nn.Linear(1, 1))]
    kinds += [layer_kind(torch.nn.Linear(1, 1)), layer_kind(torch.nn.ReLU())]
    kinds += [layer_kind(torch.nn.ReLU()), layer_kind(torch.nn.Tanh())]
    kernel = stats.output_stats(kinds, xs)
    aten = _aten(monkeypatch, stats.output_stats, kinds, xs)
    assert set(kernel) == set(aten)
    for column in kernel:
        k, a = kernel[column].double(), aten[column].double()
        if column in ("mean", "std"):  # sums in another order: float32 rounding
            torch.testing.assert_close(k, a, rtol=2e-5, atol=1e-6, equal_nan=True, msg=column)
        elif column in ("saturated", "dead"):  # the same counts, divided in double and float
            torch.testing.assert_close(k, a, rtol=1e-7, atol=0, equal_nan=True, msg=column)
        else:  # counts, and what is read off them in float32 both: exact
            torch.testing.assert_close(k, a, rtol=0, atol=0, equal_nan=True, msg=column)
    # each fraction for its family alone, NaN for the others
    assert kernel["saturated"][:5].isnan().all() and kernel["saturated"][5] > 0
    assert kernel["dead"][[0, 1, 2, 5]].isnan().all() and 0 < kernel["dead"][4] < 1


def test_param_and_spread_columns_equal_the_aten_path(monkeypatch):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(7, 5, generator=g, requires_grad=True) for _ in range(2)]
    params += [torch.randn(70_000, generator=g, requires_grad=True), torch.ones(5)]
    conv = torch.randn(4, 3, 2, 2, generator=g).to(memory_format=torch.channels_last)
    params.append(conv.requires_grad_())  # a strided parameter: copied contiguous
    params[0].grad, params[2].grad = torch.randn(7, 5, generator=g), torch.randn(70_000)
    before = stats.copy_params(params)  # the C++ operator's copies and moments
    copies = stats.ParamCopies([t.clone() for t in before.tensors], None)  # the ATen path's
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    grads = [p.grad for p in params]
    kernel = stats.param_stats(before, params, grads)
    aten = _aten(monkeypatch, stats.param_stats, copies, params, grads)
    for column in kernel:
        k, a = kernel[column].double(), aten[column].double()
        rows = [0, 2] if column.startswith("grad") else [0, 1, 2, 3, 4]  # 1, 3, 4: no gradient
        exact = column == "grad_hist"
        tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(k[rows], a[rows], equal_nan=True, msg=column, **tolerance)
    assert kernel["grad_std"][1].isnan() and kernel["data_std"][3] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_columns_equal_the_aten_path_and_torchs_own_statistics(monkeypatch, dtype):
    """Inputs (B, C), (B, C, L) and (B, C, H, W), as BatchNorm1d/2d take them, one with a
    NaN: the kernel's columns against the ATen path's, and against the mean and variance that
    torch's BatchNorm itself moves its running statistics by."""
    from normlab.diagnostics.recorder import BatchNormCapture

    g = torch.Generator().manual_seed(2)
    inputs = [
        torch.randn(16, 5, generator=g, dtype=dtype) * 3 + 1,
        torch.randn(4, 6, 7, generator=g, dtype=dtype),
        torch.randn(2, 3, 5, 5, generator=g, dtype=dtype) + 2,
        torch.randn(8, 4, generator=g, dtype=dtype),
    ]
    inputs[3][1, 2] = math.nan
    captured = [
        BatchNormCapture(
            torch.randn(x.shape[1], generator=g, dtype=dtype),
            torch.rand(x.shape[1], generator=g, dtype=dtype) + 0.5,
            1e-5 * (i + 1),
            0.1 if i else None,
            torch.tensor(7 * i),
        )
        for i, x in enumerate(inputs)
    ]
    kernel = stats.batchnorm_stats(inputs, captured)
    aten = _aten(monkeypatch, stats.batchnorm_stats, inputs, captured)
    assert set(kernel) == set(aten)
    for column in kernel:
        torch.testing.assert_close(
            kernel[column].double(),
            aten[column].double(),
            rtol=2e-5,
            atol=1e-6,
            equal_nan=True,
            msg=column,
        )
    assert kernel["mean_drift"][3].isnan() and kernel["var_ratio"][3].isnan()
    # torch's BatchNorm, momentum 1: its running statistics become the batch's own
    for i, (x, c) in enumerate(zip(inputs[:3], captured[:3], strict=True)):
        dims = [0, *range(2, x.dim())]
        mean, var = x.double().mean(dims), x.double().var(dims, unbiased=False)
        bn = torch.nn.BatchNorm1d if x.dim() < 4 else torch.nn.BatchNorm2d
        module = bn(x.shape[1], momentum=1.0).to(dtype)
        module(x)  # its running_var is the unbiased variance: scaled back to the biased one
        n = x.numel() / x.shape[1]
        torch.testing.assert_close(module.running_mean.double(), mean)
        torch.testing.assert_close(module.running_var.double() * (n - 1) / n, var)
        eps = c.eps
        drift = ((c.running_mean.double() - mean).abs() / (var + eps).sqrt()).max()
        ratio = (c.running_var.double() + eps) / (var + eps)
        want = torch.stack([drift, torch.maximum(ratio, 1 / ratio).max()])
        got = torch.stack([kernel["mean_drift"][i], kernel["var_ratio"][i]]).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_an_infinite_value_gives_the_moments_aten_gives():
    for first in (math.inf, 1.0):
        x = torch.tensor([first, 2.0, math.inf, -3.0])
        got = _moments([x])[0]
        want = torch.stack([x.mean(), x.std(), x.min(), x.max()]).double()
        torch.testing.assert_close(got, want, equal_nan=True)


def test_a_sum_whose_square_overflows_still_gives_the_std():
    x = torch.full((1000,), 1e200, dtype=torch.float64)
    x[0] = 0.0  # the shift: every other value differs from it by 1e200
    got = _moments([x])[0]
    torch.testing.assert_close(got[1], x.std(), rtol=1e-6, atol=0)


def test_an_empty_batch_or_no_channel_gives_nan_drift_as_the_aten_path(monkeypatch):
    from normlab.diagnostics.recorder import BatchNormCapture

    inputs = [torch.randn(0, 3), torch.randn(4, 0)]
    captured = [
        BatchNormCapture(torch.zeros(c), torch.ones(c), 1e-5, 0.1, torch.tensor(2)) for c in (3, 0)
    ]
    kernel = stats.batchnorm_stats(inputs, captured)
    assert kernel["mean_drift"].isnan().all() and kernel["var_ratio"].isnan().all()
    aten = _aten(monkeypatch, stats.batchnorm_stats, inputs[:1], captured[:1])
    assert aten["mean_drift"].isnan().all() and aten["var_ratio"].isnan().all()


def test_the_kept_histogram_and_percentiles_are_the_aten_paths_exactly(monkeypatch):
    """The coarse histogram and the percentiles read off the fine one, for outputs whose
    histograms take several shapes: a normal sample, a narrow one, a spike in one bin (a
    constant), one value and a saturating layer's fixed range; and an empty output's
    percentiles are NaN."""
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(4, 5000, generator=g), torch.randn(4, 5000, generator=g) * 0.01]
    xs += [torch.full((3, 100), 0.5), torch.tensor([[1.5]]), torch.tanh(xs[0] * 2)]
    kinds = [layer_kind(torch.nn.Linear(1, 1))] * 4 + [layer_kind(torch.nn.Tanh())]
    kernel = stats.output_stats(kinds, xs)
    columns = ("hist", "hist_range", *stats.PERCENTILE_COLUMNS)
    for i, (kind, x) in enumerate(zip(kinds, xs, strict=True)):  # one group each
        aten = _aten(monkeypatch, stats.output_stats, [kind], [x])
        for column in columns:
            torch.testing.assert_close(
                kernel[column][i].double(), aten[column][0].double(), rtol=0, atol=0, msg=column
            )
    assert kernel["hist_range"][4] == 1.0  # tanh's whole range
    empty = stats.output_stats(kinds[:1], [torch.randn(0, 5)])
    assert all(empty[c].isnan().all() for c in stats.PERCENTILE_COLUMNS)
    assert empty["hist"].sum() == 0


def test_an_output_summary_of_no_fine_bins_is_refused():
    nan = math.nan
    args = ([torch.randn(4, 5)], [nan], [nan], [nan], [nan], [0], [0], 0.97, [50.0])
    with pytest.raises(RuntimeError, match="fine bins must be a positive multiple"):
        stats_ops().output_summary(*args, 0, 1, 100)


def test_the_operators_trace_with_their_fake_kernels_to_the_same_columns():
    """A traced recording (normlab.lm.compiled) calls the operators in a graph: the fake
    kernels give each output's shape and dtype, and the traced copies of the parameters (a
    clone each and the ``moments`` operator, not ``copy_moments``) give the same numbers."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from normlab.diagnostics.recorder import BatchNormCapture
    from normlab.nn.kernel import traced

    xs = _tensors()
    kinds = [layer_kind(m) for m in (torch.nn.Conv2d(1, 1, 1), torch.nn.Linear(1, 1))]
    kinds += [layer_kind(torch.nn.Linear(1, 1)), layer_kind(torch.nn.ReLU())] * 2

    def columns(*tensors):
        params = list(tensors[:3])
        before = stats.copy_params(params)
        moved = [p * 1.01 for p in params]
        bn = [
            BatchNormCapture(x.mean(0), x.var(0), 1e-5, 0.1, torch.tensor(3)) for x in tensors[1:2]
        ]
        groups = [
            ("out", list("abcdef"), stats.output_stats(kinds, list(tensors))),
            ("grad", list("abc"), stats.spread_stats([tensors[0], None, tensors[1]])),
            ("bn", ["n"], stats.batchnorm_stats(list(tensors[1:2]), bn)),
            ("param", list("xyz"), stats.param_stats(before, moved, [tensors[2], None, None])),
        ]
        assert traced(tensors[0]) or before.moments is not None  # each path as its caller
        return stats.flatten(groups), before.moments

    graph = make_fx(columns, tracing_mode="fake")(*xs)
    assert torch.ops.normlab.moments.default in {node.target for node in graph.graph.nodes}
    expected = columns(*xs)
    faked = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    for fake, real in zip(faked, expected, strict=True):
        assert (fake.meta["val"].shape, fake.meta["val"].dtype) == (real.shape, real.dtype)
    for got, want in zip(graph(*xs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_percentiles_in_any_order_are_each_percentile_alone():
    """The search for each percentile continues from the last one's bin where they ascend, and
    starts again where they do not (or one is NaN): the same bins as each one searched alone."""
    x = [torch.randn(4000, generator=torch.Generator().manual_seed(0))]
    nan = math.nan

    def at(percentiles):
        columns, _ = stats_ops().output_summary(
            x, [nan], [nan], [nan], [nan], [0], [0], 0.97, percentiles, 1000, 50, 16384
        )
        return columns[5:, 0]

    order = [90.0, nan, 10.0, 10.0, 50.0, 5.0, 100.0, 0.0]
    alone = torch.stack([at([p])[0] for p in order])
    torch.testing.assert_close(at(order), alone, rtol=0, atol=0, equal_nan=True)
