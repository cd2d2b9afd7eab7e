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


def _aten(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(stats, "stats_ops", lambda: None)
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_equal_float64_torch(dtype):
    xs = _tensors(dtype)
    got = stats_ops().moments(xs, [])
    for row, x in zip(got, xs, strict=True):
        exact = x.double()
        want = torch.stack([exact.mean(), exact.std(), exact.min(), exact.max()])
        torch.testing.assert_close(row, want, rtol=1e-6, atol=1e-7)
    minus = [x * 0.5 for x in xs]
    got = stats_ops().moments(xs, minus)
    for row, x, b in zip(got, xs, minus, strict=True):
        d = x.double() - b.double()
        torch.testing.assert_close(row[1], d.std(), rtol=1e-6, atol=1e-7)


def test_a_nan_or_an_absent_tensor_is_a_row_of_nan():
    x = torch.randn(10)
    x[3] = math.nan
    got = stats_ops().moments([x, None, torch.ones(3)], [])
    assert got[0].isnan().all() and got[1].isnan().all()
    assert got[2].tolist() == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_output_column_equals_the_aten_path(monkeypatch, dtype):
    xs = _tensors(dtype)
    kinds = [layer_kind(m) for m in (torch.nn.Conv2d(1, 1, 1), torch.nn.Linear(1, 1))]
    kinds += [layer_kind(torch.nn.Linear(1, 1)), layer_kind(torch.nn.ReLU())]
    kinds += [layer_kind(torch.nn.ReLU()), layer_kind(torch.nn.Tanh())]
    kernel = stats.output_stats(kinds, xs)
    aten = _aten(monkeypatch, stats.output_stats, kinds, xs)
    assert set(kernel) == set(aten)
    # the fractions are read for their families only (the ATen path measures a whole group)
    rows = {"saturated": [5], "dead": [3, 4]}
    for column in kernel:
        k, a = kernel[column].double(), aten[column].double()
        if column in rows:
            k, a = k[rows[column]], a[rows[column]]
        if column in ("hist", "hist_range", "saturated", "dead"):  # counts and fractions: exact
            torch.testing.assert_close(k, a, rtol=1e-7, atol=0, equal_nan=True, msg=column)
        else:  # sums in another order: float32 rounding
            torch.testing.assert_close(k, a, rtol=2e-5, atol=1e-6, equal_nan=True, msg=column)
    assert 0 < kernel["dead"][4] < 1 and kernel["saturated"][5] > 0


def test_param_and_spread_columns_equal_the_aten_path(monkeypatch):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(7, 5, generator=g, requires_grad=True) for _ in range(2)]
    params += [torch.randn(70_000, generator=g, requires_grad=True), torch.ones(5)]
    params[0].grad, params[2].grad = torch.randn(7, 5, generator=g), torch.randn(70_000)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    kernel = stats.param_stats(before, params)
    aten = _aten(monkeypatch, stats.param_stats, [b.clone() for b in before], params)
    for column in kernel:
        k, a = kernel[column].double(), aten[column].double()
        rows = [0, 2] if column.startswith("grad") else [0, 1, 2, 3]  # 1 and 3: no gradient
        exact = column == "grad_hist"
        tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(k[rows], a[rows], equal_nan=True, msg=column, **tolerance)
    assert kernel["grad_std"][1].isnan() and kernel["data_std"][3] == 0
