"""Every normalization layer of ours against torch's: every rank, every constructor argument.

Outputs and gradients over several training steps, the running statistics
(``momentum=None`` included), eval mode, ``affine=False``, ``bias=False``,
``track_running_stats=False``, zero-size batches, state dicts both ways, and
``gradcheck`` in float64.
"""

import pytest
import torch
from torch import nn

from normlab import nn as nl

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}
DTYPES = [torch.float32, torch.float64]

# (ours, torch's, an input shape of each rank the layer takes); C = 3 everywhere
LAYERS = [
    (nl.BatchNorm1d, nn.BatchNorm1d, [(16, 3), (8, 3, 5)]),
    (nl.BatchNorm2d, nn.BatchNorm2d, [(4, 3, 5, 6)]),
    (nl.BatchNorm3d, nn.BatchNorm3d, [(2, 3, 3, 4, 5)]),
    (nl.InstanceNorm1d, nn.InstanceNorm1d, [(4, 3, 7), (3, 7)]),
    (nl.InstanceNorm2d, nn.InstanceNorm2d, [(4, 3, 5, 6), (3, 5, 6)]),
    (nl.SyncBatchNorm, nn.BatchNorm2d, [(4, 3, 5, 6)]),  # no process group: a plain BatchNorm
]
IDS = [ours.__name__ for ours, _, _ in LAYERS]
OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.01},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"eps": 1e-3},
]


def _pair(ours_type, theirs_type, dtype, **kw):
    if ours_type in (nl.InstanceNorm1d, nl.InstanceNorm2d):
        kw = {"affine": True, "track_running_stats": True, **kw}  # off by default, as torch's
        if kw.get("momentum", 0.1) is None:
            kw["momentum"] = 0.1  # torch's InstanceNorm takes a float
    ours, theirs = ours_type(3, dtype=dtype, **kw), theirs_type(3, dtype=dtype, **kw)
    with torch.no_grad():  # one non-trivial gain and bias, so that their gradients count
        for name in ("weight", "bias"):
            if getattr(theirs, name) is not None:
                value = torch.rand(3, dtype=dtype) + 0.5
                getattr(ours, name).copy_(value)
                getattr(theirs, name).copy_(value)
    return ours, theirs


def _forward_backward(module, x, grad_y):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_y)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def _assert_same(ours, theirs, x, tol):
    grad_y = torch.randn_like(x)
    (y1, g1), (y2, g2) = _forward_backward(ours, x, grad_y), _forward_backward(theirs, x, grad_y)
    torch.testing.assert_close(y1, y2, **tol)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **tol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.to(b.dtype), b, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "defaults")
@pytest.mark.parametrize("ours_type, theirs_type, shapes", LAYERS, ids=IDS)
def test_training_steps_then_eval_match_torch(
    ours_type, theirs_type, shapes, kw, dtype, batchnorm_path
):
    tol = TOL[dtype]
    for shape in shapes:
        ours, theirs = _pair(ours_type, theirs_type, dtype, **kw)
        for step in range(3):  # the running statistics accumulate over several batches
            x = torch.randn(shape, dtype=dtype) * (step + 1) + step
            _assert_same(ours, theirs, x, tol)
        ours.eval(), theirs.eval()
        _assert_same(ours, theirs, torch.randn(shape, dtype=dtype) + 1, tol)


@pytest.mark.parametrize("ours_type, theirs_type, shapes", LAYERS, ids=IDS)
def test_gradcheck_in_float64(ours_type, theirs_type, shapes, batchnorm_path):
    for shape in shapes:
        ours, _ = _pair(ours_type, theirs_type, torch.float64)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        # gradcheck nudges the parameters themselves, which the module reads
        assert torch.autograd.gradcheck(_calling(ours), (x, *ours.parameters()))


def _calling(module):
    return lambda x, *parameters: module(x)


@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"bias": False}])
@pytest.mark.parametrize("ours_type, theirs_type, shapes", LAYERS, ids=IDS)
def test_state_dicts_load_both_ways(ours_type, theirs_type, shapes, kw):
    ours, theirs = _pair(ours_type, theirs_type, torch.float32, **kw)
    for _ in range(2):
        x = torch.randn(shapes[0])
        ours(x), theirs(x)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert (
        ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    )
    fresh_ours, fresh_theirs = _pair(ours_type, theirs_type, torch.float32, **kw)
    fresh_ours.load_state_dict(theirs.state_dict())
    fresh_theirs.load_state_dict(ours.state_dict())
    for a, b in zip(fresh_ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(fresh_theirs.state_dict().values(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "ours_type, theirs_type, shape",
    [(nl.BatchNorm1d, nn.BatchNorm1d, (0, 3)), (nl.BatchNorm2d, nn.BatchNorm2d, (0, 3, 4, 4))],
)
def test_a_zero_size_batch_behaves_as_torchs(ours_type, theirs_type, shape):
    ours, theirs = _pair(ours_type, theirs_type, torch.float32)
    x = torch.randn(shape, requires_grad=True)
    y1, y2 = ours(x), theirs(x)
    assert y1.shape == y2.shape == shape and y1.requires_grad
    y1.sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.abs().sum() == 0
    _assert_same(ours, theirs, torch.randn(8, *shape[1:]), TOL[torch.float32])  # counts match


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_normalizes_a_sequence_over_batch_and_time(dtype, batchnorm_path):
    # makemore part 5: (B, T, C) normalized over (B, T); torch needs the transpose around it
    ours, theirs = _pair(nl.BatchNorm1d, nn.BatchNorm1d, dtype)
    ours.channels_last = True
    for step in range(3):
        x = torch.randn(8, 5, 3, dtype=dtype) + step  # (B, T, C)
        grad = torch.randn_like(x)
        y1, g1 = _forward_backward(ours, x, grad)
        y2, g2 = _transposed(theirs, x, grad)
        torch.testing.assert_close(y1, y2, **TOL[dtype])
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[dtype])
        torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL[dtype])
    ours.eval(), theirs.eval()
    x = torch.randn(1, 5, 3, dtype=dtype)  # one example at a time in eval mode
    torch.testing.assert_close(ours(x), theirs(x.transpose(1, 2)).transpose(1, 2), **TOL[dtype])


def _transposed(bn, x, grad_y):
    x = x.clone().requires_grad_(True)
    y = bn(x.transpose(1, 2)).transpose(1, 2)
    y.backward(grad_y)
    grads = [x.grad] + [p.grad for p in bn.parameters()]
    bn.zero_grad(set_to_none=True)
    return y.detach(), grads


def test_the_lectures_bug_normalizes_over_the_batch_only():
    # a (B, T, C) input read as (N, C, L) normalizes the wrong axis: the error is loud
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3\) or \(N, 3, L\)"):
        nl.BatchNorm1d(3)(torch.randn(8, 3 + 1, 3))


def test_constructors_take_every_argument_torchs_do():
    import inspect

    for ours, theirs in [
        (nl.BatchNorm1d, nn.BatchNorm1d),
        (nl.BatchNorm2d, nn.BatchNorm2d),
        (nl.BatchNorm3d, nn.BatchNorm3d),
        (nl.SyncBatchNorm, nn.SyncBatchNorm),
        (nl.InstanceNorm1d, nn.InstanceNorm1d),
        (nl.InstanceNorm2d, nn.InstanceNorm2d),
        (nl.GroupNorm, nn.GroupNorm),
        (nl.LayerNorm, nn.LayerNorm),
    ]:
        theirs_params = inspect.signature(theirs.__init__).parameters
        ours_params = inspect.signature(ours.__init__).parameters
        for name, p in theirs_params.items():
            assert name in ours_params, (ours.__name__, name)
            assert ours_params[name].default == p.default, (ours.__name__, name)
            assert ours_params[name].kind == p.kind, (ours.__name__, name)
    assert nl.BatchNorm1d(10, bias=False).bias is None
    assert nl.GroupNorm(3, 6, bias=False).bias is None


def test_sync_batchnorm_is_opt_in_and_converts_ours_and_torchs():
    model = nn.Sequential(
        nl.Linear(4, 6), nl.BatchNorm1d(6, momentum=0.3), nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6)
    )
    assert not any(isinstance(m, nl.SyncBatchNorm) for m in model.modules())
    converted = nl.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nl.SyncBatchNorm) and isinstance(converted[3], nl.SyncBatchNorm)
    assert converted[1].momentum == 0.3
    assert converted[1].weight is model[1].weight  # the same parameters and buffers
    assert converted[3].running_mean is model[3].running_mean
    assert list(converted.state_dict()) == list(model.state_dict())
