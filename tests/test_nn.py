import importlib.machinery
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import nn as nl
from normlab.nn import kernel

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}
DTYPES = [torch.float32, torch.float64]


@torch.no_grad()
def _same_random_affine(ours, theirs):
    """Give both modules one non-trivial gain and bias, so their gradients are tested too."""
    if theirs.weight is not None:
        w, b = torch.rand_like(theirs.weight) + 0.5, torch.randn_like(theirs.bias)
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return ours, theirs


def _bn_pair(C, dtype, **kw):
    ours = nl.BatchNorm1d(C, dtype=dtype, **kw)
    return _same_random_affine(ours, torch.nn.BatchNorm1d(C, dtype=dtype, **kw))


def _assert_same_forward_backward(ours, theirs, x, grad_y, tol):
    y1, g1 = _forward_backward(ours, x, grad_y)
    y2, g2 = _forward_backward(theirs, x, grad_y)
    torch.testing.assert_close(y1, y2, **tol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **tol)


def _forward_backward(module, x, grad_y):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_y)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


def _assert_buffers_equal(ours, theirs, tol):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)
    if theirs.num_batches_tracked is not None:
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 100), (7, 3), (16, 5, 9), (2, 4, 1)])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": None},
        {"momentum": 0.001},
        {"affine": False},
        {"track_running_stats": False},
        {"eps": 1e-3},
    ],
)
def test_batchnorm_matches_torch_over_steps(dtype, shape, kw, batchnorm_path):
    C = shape[1]
    ours, theirs = _bn_pair(C, dtype, **kw)
    tol = TOL[dtype]
    for step in range(4):  # running statistics accumulate over several batches
        x = torch.randn(shape, dtype=dtype) * (step + 1) + step
        _assert_same_forward_backward(ours, theirs, x, torch.randn(shape, dtype=dtype), tol)
        _assert_buffers_equal(ours, theirs, tol)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=dtype) + 1
    _assert_same_forward_backward(ours, theirs, x, torch.randn(shape, dtype=dtype), tol)


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_gradcheck_float64(shape, affine):
    bn = nl.BatchNorm1d(shape[1], affine=affine, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: bn(x), (x,))
    x = torch.randn(shape[0], shape[1], dtype=torch.float64, requires_grad=True)
    if affine:
        w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_(True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        fn = lambda x, w, b: nl.BatchNormFunction.apply(x, w, b, 1e-5, None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b))
    else:
        fn = lambda x: nl.BatchNormFunction.apply(x, None, None, 1e-5, None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("shape, channel_dim", [((6, 4), 1), ((5, 3, 4), 1), ((3, 4, 5), 2)])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_the_kernel_passes_gradcheck_in_float64(shape, channel_dim, affine, bias):
    C = shape[channel_dim]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if bias else None
    running = [torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)]
    op = kernel.ops().batch_norm
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(x, *params):
        params = list(params) + [None] * (2 - len(params))
        return op(x, *params, *running, None, 0.1, 1e-5, channel_dim)  # no batch count

    assert torch.autograd.gradcheck(fn, inputs)


def test_batchnorm_trains_on_the_kernel_on_the_cpu():
    bn = nl.BatchNorm1d(5)
    y = bn(torch.randn(8, 5, requires_grad=True))
    assert "BatchNormNode" in y.grad_fn.name()  # not BatchNormFunction's ATen operators
    with torch.inference_mode():  # and without autograd
        torch.testing.assert_close(bn(torch.ones(8, 5)), torch.zeros(8, 5))


def test_a_trace_sees_batchnorms_operators_not_the_kernel():
    from torch.fx.experimental.proxy_tensor import make_fx

    bn = nl.BatchNorm1d(4, track_running_stats=False)
    x = torch.randn(8, 4)
    graph = make_fx(bn)(x)  # real tensors, under make_fx's dispatch mode
    assert "normlab" not in graph.code
    torch.testing.assert_close(graph(2 * x + 1), bn(2 * x + 1))


def test_the_kernels_statistics_hold_far_from_the_first_value():
    # the mean is summed about each channel's first value: make that value a 100σ outlier
    x = torch.randn(4096, 16)
    x[0] = 100.0
    ours, theirs = nl.BatchNorm1d(16), torch.nn.BatchNorm1d(16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)


def test_what_the_kernel_does_not_take_runs_on_aten_operators():
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    promoted = nl.BatchNorm1d(4, track_running_stats=False)(x)  # float32 parameters
    assert promoted.grad_fn.name() == "BatchNormFunctionBackward"
    bn = nl.BatchNorm1d(4)
    bn.weight = None  # a bias without a gain
    assert bn(x.float()).grad_fn.name() == "BatchNormFunctionBackward"


def test_the_kernel_moves_the_running_statistics_as_an_in_place_operator():
    bn = nl.BatchNorm1d(4)
    buffers = bn.running_mean, bn.running_var, bn.num_batches_tracked
    before = [t._version for t in buffers]
    y = bn(torch.randn(8, 4, requires_grad=True))
    assert "BatchNormNode" in y.grad_fn.name()
    assert all(t._version > v for t, v in zip(buffers, before, strict=True))
    assert bn.num_batches_tracked.item() == 1  # counted by the kernel
    theirs = torch.nn.BatchNorm1d(4)
    for m in (bn, theirs):  # tracking, but no running statistics: the batch is still counted
        m.running_mean = m.running_var = None
        m(torch.randn(8, 4))
    assert (bn.num_batches_tracked.item(), theirs.num_batches_tracked.item()) == (2, 1)


@pytest.fixture
def reload_kernel():
    """Forget the loaded kernel before and after the test, which loads it its own way."""
    for loaded in (kernel.library, kernel.ops, kernel.stats_ops):
        loaded.cache_clear()
    yield
    for loaded in (kernel.library, kernel.ops, kernel.stats_ops):
        loaded.cache_clear()


def test_a_kernel_that_does_not_load_is_one_line_and_the_aten_path(
    reload_kernel, monkeypatch, tmp_path, capsys
):
    broken = tmp_path / "_kernels_cpu.so"
    broken.write_bytes(b"not a shared library")  # as one built against another torch
    spec = importlib.machinery.ModuleSpec("normlab.nn._kernels_cpu", None, origin=str(broken))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert kernel.ops() is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "did not load" in out
    y = nl.BatchNorm1d(3)(torch.randn(4, 3, requires_grad=True))
    assert y.grad_fn.name() == "BatchNormFunctionBackward"


def test_a_kernel_built_from_other_sources_is_one_line_and_the_aten_path(
    reload_kernel, monkeypatch, capsys
):
    monkeypatch.setattr(kernel, "ARGUMENTS", kernel.ARGUMENTS[:-1])  # as an older operator's
    assert kernel.ops() is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "out of date" in out
    y = nl.BatchNorm1d(3)(torch.randn(4, 3, requires_grad=True))
    assert y.grad_fn.name() == "BatchNormFunctionBackward"


def test_the_kernel_can_be_turned_off(reload_kernel, monkeypatch):
    monkeypatch.setenv("NORMLAB_BATCHNORM_KERNEL", "0")
    assert kernel.ops() is None
    y = nl.BatchNorm1d(3)(torch.randn(4, 3, requires_grad=True))
    assert y.grad_fn.name() == "BatchNormFunctionBackward"


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    c=st.integers(1, 12),
    length=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**31 - 1),
)
def test_batchnorm_matches_torch_on_random_shapes(n, c, length, seed):
    torch.manual_seed(seed)
    shape = (n, c) if length is None else (n, c, length)
    ours, theirs = _bn_pair(c, torch.float64)
    x, g = torch.randn(shape, dtype=torch.float64) * 3, torch.randn(shape, dtype=torch.float64)
    _assert_same_forward_backward(ours, theirs, x, g, TOL[torch.float64])
    _assert_buffers_equal(ours, theirs, TOL[torch.float64])


def test_batchnorm_defaults_and_state_dict_keys_match_torch():
    ours, theirs = nl.BatchNorm1d(10), torch.nn.BatchNorm1d(10)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
        assert ours.state_dict()[k].dtype == v.dtype
    assert (
        ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    )
    assert list(nl.BatchNorm1d(3, affine=False, track_running_stats=False).state_dict()) == []


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_batchnorm_state_dict_round_trip(direction):
    src, dst = (torch.nn.BatchNorm1d(6), nl.BatchNorm1d(6))
    if direction == "ours_to_torch":
        src, dst = dst, src
    for _ in range(3):
        src(torch.randn(8, 6) * 2 + 1)
    with torch.no_grad():
        src.weight.mul_(3)
        src.bias.add_(1)
    dst.load_state_dict(src.state_dict())
    src.eval()
    dst.eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(dst(x), src(x))
    assert dst.num_batches_tracked.item() == 3


def test_batchnorm_old_state_dict_without_counter_loads():
    sd = nl.BatchNorm1d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn = nl.BatchNorm1d(4)
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked.item() == 0


def test_batchnorm_buffers_move_with_to():
    bn = nl.BatchNorm1d(4).to(torch.float64)
    assert bn.running_mean.dtype == torch.float64 and bn.weight.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long


def test_batchnorm_running_stats_not_trained_by_backprop():
    bn = nl.BatchNorm1d(3)
    assert {n for n, _ in bn.named_parameters()} == {"weight", "bias"}
    assert not bn.running_mean.requires_grad


def test_batchnorm_single_example_in_training_is_refused():
    bn = nl.BatchNorm1d(5)
    with pytest.raises(ValueError, match=r"at least 2 values per channel.*eval"):
        bn(torch.randn(1, 5))
    with pytest.raises(ValueError, match="at least 2 values"):
        bn(torch.randn(1, 5, 1))
    bn.eval()
    assert bn(torch.randn(1, 5)).shape == (1, 5)


def test_batchnorm_eval_single_example_equals_batched():
    bn = nl.BatchNorm1d(5)
    for _ in range(3):
        bn(torch.randn(16, 5) + 2)
    bn.eval()
    x = torch.randn(8, 5)
    batched = bn(x)
    for i in range(8):
        torch.testing.assert_close(bn(x[i : i + 1]), batched[i : i + 1])


@pytest.mark.parametrize("shape,match", [((4, 6), r"\(N, 5\)"), ((4,), "1D"), ((2, 5, 3, 3), "4D")])
def test_batchnorm_bad_shape_names_expected(shape, match):
    with pytest.raises(ValueError, match=match):
        nl.BatchNorm1d(5)(torch.randn(shape))


def test_batchnorm_eval_without_running_stats_uses_batch_stats():
    ours, theirs = _bn_pair(4, torch.float32, track_running_stats=False)
    ours.eval()
    theirs.eval()
    x = torch.randn(10, 4) * 5
    torch.testing.assert_close(ours(x), theirs(x))


def test_batchnorm_extra_repr():
    assert "momentum=None" in repr(nl.BatchNorm1d(3, momentum=None))


# ---------------------------------------------------------------------------- LayerNorm, GroupNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,normalized", [((8, 20), 20), ((4, 3, 10), (3, 10)), ((4, 3, 10), 10)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_matches_torch(dtype, shape, normalized, affine):
    ours, theirs = _same_random_affine(
        nl.LayerNorm(normalized, elementwise_affine=affine, dtype=dtype),
        torch.nn.LayerNorm(normalized, elementwise_affine=affine, dtype=dtype),
    )
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x, g = torch.randn(shape, dtype=dtype) * 2 + 1, torch.randn(shape, dtype=dtype)
    _assert_same_forward_backward(ours, theirs, x, g, TOL[dtype])


def test_layernorm_gradcheck_and_bad_shape():
    ln = nl.LayerNorm(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        ln, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),)
    )
    with pytest.raises(ValueError, match=r"ending in shape \(5,\)"):
        ln(torch.randn(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "groups,channels,shape",
    [(4, 100, (32, 100)), (1, 6, (5, 6)), (6, 6, (5, 6, 3)), (2, 8, (3, 8, 2, 2))],
)
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_matches_torch(dtype, groups, channels, shape, affine):
    ours, theirs = _same_random_affine(
        nl.GroupNorm(groups, channels, affine=affine, dtype=dtype),
        torch.nn.GroupNorm(groups, channels, affine=affine, dtype=dtype),
    )
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x, g = torch.randn(shape, dtype=dtype) * 2 + 1, torch.randn(shape, dtype=dtype)
    _assert_same_forward_backward(ours, theirs, x, g, TOL[dtype])


def test_groupnorm_validates():
    with pytest.raises(ValueError, match="divisible"):
        nl.GroupNorm(3, 10)
    with pytest.raises(ValueError, match=r"\(N, 10, \*\)"):
        nl.GroupNorm(2, 10)(torch.randn(4, 8))


# ---------------------------------------------------------------------------- Linear and pieces


@pytest.mark.parametrize("nonlinearity", ["linear", "tanh", "relu"])
def test_linear_init_is_kaiming_and_matches_torch_forward(nonlinearity):
    ours = nl.Linear(30, 50, nonlinearity=nonlinearity, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.init.kaiming_normal_(
        torch.empty(50, 30), nonlinearity=nonlinearity, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(ours.weight.detach(), expected)
    assert torch.count_nonzero(ours.bias) == 0
    theirs = torch.nn.Linear(30, 50)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 30)
    torch.testing.assert_close(ours(x), theirs(x))


def test_linear_custom_init_and_no_bias():
    layer = nl.Linear(4, 3, bias=False, init=torch.nn.init.ones_)
    assert layer.bias is None and torch.equal(layer.weight.detach(), torch.ones(3, 4))
    assert list(layer.state_dict()) == ["weight"]


def test_flatten_context_and_activations():
    x = torch.randn(4, 3, 10)
    assert nl.FlattenContext()(x).shape == (4, 30)
    torch.testing.assert_close(nl.FlattenContext()(x), x.flatten(1))
    torch.testing.assert_close(nl.Tanh()(x), torch.tanh(x))
    torch.testing.assert_close(nl.ReLU()(x), torch.relu(x))


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_batchnorm_gradient_of_the_other_affine_parameter_when_one_is_frozen(frozen):
    ours, theirs = _bn_pair(6, torch.float64)
    for m in (ours, theirs):
        getattr(m, frozen).requires_grad_(False)
    x, g = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    _assert_same_forward_backward(ours, theirs, x, g, TOL[torch.float64])
    other = "bias" if frozen == "weight" else "weight"
    ours(x).backward(g)
    assert getattr(ours, frozen).grad is None and getattr(ours, other).grad is not None


def test_batchnorm_forward_hooks_fire_once_with_the_input_shape():
    shapes = []
    bn = nl.BatchNorm1d(4)
    bn.register_forward_hook(lambda _m, inputs, out: shapes.append((inputs[0].shape, out.shape)))
    bn(torch.randn(2, 4, 5))
    assert shapes == [((2, 4, 5), (2, 4, 5))]


def test_set_mode_restores_every_submodule_also_after_an_error():
    model = torch.nn.Sequential(nl.Linear(3, 4), nl.BatchNorm1d(4), torch.nn.Dropout(0.5))
    model[1].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    with nl.set_mode(model, training=False):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), nl.set_mode(model, training=True):
        assert model[1].training
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False, True]
    model[1].train()
    with nl.set_mode(model, training=True):  # already in the mode: what the block moves comes back
        model[2].eval()
    assert all(m.training for m in model.modules())
