"""Curvature: Hessian-vector products through BatchNorm in training mode, checked against the
full Hessian that torch computes densely for the same model built of torch's own layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from models import CdistLoss, SquareOnce
from torch import nn

import normlab.nn as nl
from normlab.curvature import (
    Hessian,
    NotTwiceDifferentiable,
    adam_preconditioner,
    hessian_trace,
    top_eigenvalue,
)
from normlab.nn import kernel

DTYPES = [torch.float32, torch.float64]


def _twice(implementation: str):
    """Training-mode batch norm whose backward has a derivative: the C++ kernel's operator, or
    ``batch_norm_twice_differentiable`` (ATen operators: other devices and dtypes)."""
    if implementation == "kernel":
        ops = kernel.ops()
        assert ops is not None, "BatchNorm's C++ kernel is not built: see setup.py"
        return lambda x, w, b, dim: ops.batch_norm(x, w, b, None, None, None, 0.1, 1e-5, dim)
    return lambda x, w, b, dim: nl.batch_norm_twice_differentiable(x, w, b, 1e-5, None, None, dim)


@pytest.mark.parametrize("implementation", ["kernel", "aten"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_dim", [1, 2, 3])  # (N, C, H, W), (N, H, C, W), (N, H, W, C)
@pytest.mark.parametrize("affine", [True, False])
def test_the_twice_differentiable_batchnorm_equals_torchs_to_second_order(
    implementation, dtype, channel_dim, affine
):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 3, generator=g, dtype=dtype, requires_grad=True)
    w = (1 + torch.randn(4, generator=g, dtype=dtype)).requires_grad_() if affine else None
    b = torch.randn(4, generator=g, dtype=dtype, requires_grad=True) if affine else None
    xin = x.movedim(1, channel_dim).contiguous()  # the channels at channel_dim, in memory too
    ours = _twice(implementation)(xin, w, b, channel_dim)
    theirs = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    assert ours.is_contiguous()  # as the layers after it may view it
    ours = ours.movedim(channel_dim, 1)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    torch.testing.assert_close(ours, theirs, **tol)
    # a Hessian-vector product of a loss through each (torch's has its own double backward)
    weights = torch.randn(6, 4, 5, 3, generator=g, dtype=dtype)
    inputs = [t for t in (x, w, b) if t is not None]
    v = [torch.randn_like(t) for t in inputs]
    products = []
    for out in (ours, theirs):
        loss = (out.tanh() * weights).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        products.append(torch.autograd.grad(grads, inputs, v))
    for mine, reference in zip(*products, strict=True):
        torch.testing.assert_close(mine, reference, **tol)


@pytest.mark.parametrize("implementation", ["kernel", "aten"])
@pytest.mark.parametrize(
    "second",  # a loss of the first derivatives: their sums' cotangents are expanded scalars
    [
        lambda gx, gw, gb: gx.sum(),
        lambda gx, gw, gb: gw.sum(),
        lambda gx, gw, gb: gb.sum(),
        lambda gx, gw, gb: gx.square().sum() + (gw * gb).sum(),
    ],
)
def test_a_second_derivative_through_any_cotangents_is_torchs(implementation, second):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(8, 5, generator=g, dtype=torch.float64)
    results = []
    for out in (_twice(implementation)(x, w, b, 1), F.batch_norm(x, None, None, w, b, True)):
        firsts = torch.autograd.grad((out.tanh() * weights).sum(), (x, w, b), create_graph=True)
        results.append(torch.autograd.grad(second(*firsts), (x, w, b), allow_unused=True))
    for mine, reference in zip(*results, strict=True):
        if reference is None:  # torch's does not depend on it: ours is None or zeros
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, reference, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("implementation", ["kernel", "aten"])
@pytest.mark.parametrize("channel_dim", [1, 2])
def test_the_twice_differentiable_batchnorm_passes_gradgradcheck(implementation, channel_dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    C = x.size(channel_dim)
    w = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    norm = _twice(implementation)
    assert torch.autograd.gradgradcheck(lambda x, w, b: norm(x, w, b, channel_dim), (x, w, b))


def test_the_kernel_refuses_a_third_derivative():
    x = torch.randn(8, 4, requires_grad=True)
    y = nl.BatchNorm1d(4)(x)
    assert "BatchNormNode" in y.grad_fn.name()
    (grad,) = torch.autograd.grad((y * y.tanh()).sum(), x, create_graph=True)
    torch.autograd.grad((grad * grad).sum(), x, retain_graph=True)  # a second derivative
    with pytest.raises(RuntimeError, match="differentiable twice"):  # a graph for a third
        torch.autograd.grad((grad * grad).sum(), x, create_graph=True)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nl.BatchNorm1d(8), (16, 8)),
        (lambda: nl.BatchNorm1d(8, channels_last=True), (16, 5, 8)),
        (lambda: nl.BatchNorm2d(8, momentum=None), (4, 8, 3, 3)),  # a cumulative average
    ],
)
def test_within_twice_differentiable_a_batchnorm_module_gives_the_same_outputs_and_statistics(
    make, shape
):
    g = torch.Generator().manual_seed(2)
    a, b = make(), make()
    for _ in range(2):  # the second step moves statistics that the first moved
        x = torch.randn(shape, generator=g)
        expected = a(x)
        with nl.twice_differentiable():
            got = b(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for name, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], value, msg=name)


def _models(dtype):
    """The same small network twice: normlab's BatchNorm, and torch's (the reference)."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 8, bias=False), nl.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    theirs = nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
    )
    theirs.load_state_dict(ours.state_dict())
    torch.func.replace_all_batch_norm_modules_(theirs)  # batch statistics only: no buffer moves
    return ours.to(dtype), theirs.to(dtype)


def _batch(dtype):
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def _dense_hessian(model, x, y):
    """The full Hessian of the batch loss, (n, n), by torch.func on torch's own layers."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(theta):
        chunks = theta.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        out = torch.func.functional_call(model, (params, dict(buffers)), (x,))
        return F.cross_entropy(out, y)

    return torch.func.hessian(loss)(flat)


def _loss(x, y):
    return lambda m: F.cross_entropy(m(x), y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_sharpness_is_the_top_eigenvalue_of_the_full_hessian(dtype):
    ours, theirs = _models(dtype)
    x, y = _batch(dtype)
    eigenvalues = torch.linalg.eigvalsh(_dense_hessian(theirs, x, y).double())
    largest = eigenvalues.max().item()
    before = {n: b.clone() for n, b in ours.named_buffers()}
    hessian = Hessian(ours, _loss(x, y))
    found = top_eigenvalue(
        hessian, max_products=500, tol=1e-4, generator=torch.Generator().manual_seed(0)
    )
    assert found.converged
    assert found.value == pytest.approx(largest, rel=0.01)
    for name, value in ours.named_buffers():  # the running statistics are put back
        assert torch.equal(value, before[name]), name


def test_the_hessian_trace_is_within_5_percent_at_1000_probes():
    ours, theirs = _models(torch.float64)
    x, y = _batch(torch.float64)
    exact = torch.trace(_dense_hessian(theirs, x, y)).item()
    estimate = hessian_trace(
        Hessian(ours, _loss(x, y)), probes=1000, generator=torch.Generator().manual_seed(0)
    )
    assert estimate.value == pytest.approx(exact, rel=0.05)
    assert abs(estimate.value - exact) < 4 * estimate.stderr  # and its error bar covers it


def test_the_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h():
    ours, theirs = _models(torch.float64)
    x, y = _batch(torch.float64)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        optimizer.step()
    theirs.load_state_dict(dict(ours.named_parameters()), strict=False)  # the trained weights
    hessian = Hessian(ours, _loss(x, y))
    P = adam_preconditioner(optimizer, hessian.params)
    d = torch.cat([p.flatten() for p in P]).rsqrt()  # P^(-1/2)
    symmetric = d[:, None] * _dense_hessian(theirs, x, y) * d[None, :]
    eigenvalues = torch.linalg.eigvalsh(symmetric)
    largest = eigenvalues.max().item()
    found = top_eigenvalue(hessian, 1000, 1e-4, P, torch.Generator().manual_seed(0))
    assert found.converged
    assert found.value == pytest.approx(largest, rel=0.01)


def test_an_optimizer_without_second_moments_has_no_preconditioner():
    ours, _ = _models(torch.float64)
    with pytest.raises(ValueError, match="SGD keeps no second moments"):
        adam_preconditioner(torch.optim.SGD(ours.parameters(), lr=0.1), list(ours.parameters()))


def test_a_loss_without_a_second_derivative_is_one_line_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), SquareOnce(), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    with pytest.raises(NotTwiceDifferentiable) as raised:
        Hessian(model, lambda m: m(x).mean())
    message = str(raised.value)
    assert "\n" not in message
    assert "autograd Function OnceDifferentiableSquare in layer '1'" in message


def test_an_operator_without_a_double_backward_is_one_line_at_the_first_product():
    model, x = CdistLoss(), torch.randn(8, 4)
    hessian = Hessian(model, lambda m: m(x))  # the loss and its gradient are fine
    with pytest.raises(NotTwiceDifferentiable) as raised:
        top_eigenvalue(hessian, generator=torch.Generator().manual_seed(0))
    message = str(raised.value)
    assert "\n" not in message and "_cdist_backward" in message
    assert message.startswith("the loss has no second derivative")


class _Quadratic(nn.Module):
    """A loss ½ θᵀAθ: its Hessian is A, exactly."""

    def __init__(self, eigenvalues: list[float]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g))
        self.register_buffer("A", q @ torch.diag(torch.tensor(eigenvalues)) @ q.T)
        self.theta = nn.Parameter(torch.randn(len(eigenvalues), generator=g))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta


@pytest.mark.parametrize(
    "eigenvalues", [[-5.0, 1.0, 2.0, 0.5], [3.0, 2.9, -0.1, 0.2, 1.0], [-1.0, -2.0, -0.5]]
)
def test_the_sharpness_is_the_largest_eigenvalue_whatever_the_signs_of_the_others(eigenvalues):
    """The most negative eigenvalue may have the largest magnitude (where power iteration
    finds it first), and the top two may be close: Lanczos returns the largest."""
    model = _Quadratic(eigenvalues)
    found = top_eigenvalue(
        Hessian(model, lambda m: m()), 50, 1e-6, generator=torch.Generator().manual_seed(0)
    )
    assert found.converged and found.products <= len(eigenvalues) + 1
    assert found.value == pytest.approx(max(eigenvalues), rel=1e-5)


class _TurnsNaN:
    """A Hessian diag(0 … 1) whose products become NaN from the ``after``-th on, as a loss that
    overflows partway through a measurement."""

    def __init__(self, after: int) -> None:
        self.params = [torch.zeros(500, dtype=torch.float64)]
        self.diagonal = torch.linspace(0, 1, 500, dtype=torch.float64)
        self.after, self.products = after, 0

    def __matmul__(self, v):
        self.products += 1
        hv = self.diagonal * v[0]
        return [hv * math.nan if self.products >= self.after else hv]


@pytest.mark.parametrize("after", [1, 2, 3, 10])
def test_a_product_that_turns_nan_gives_a_nan_sharpness_unconverged(after):
    g = torch.Generator().manual_seed(0)
    found = top_eigenvalue(_TurnsNaN(after), 50, generator=g)
    assert math.isnan(found.value) and not found.converged
    healthy = top_eigenvalue(_TurnsNaN(10**6), 200, 1e-6, generator=g)
    assert healthy.converged and healthy.value == pytest.approx(1.0, rel=1e-4)
