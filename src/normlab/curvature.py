"""The curvature of a batch's loss: its sharpness, its Hessian trace, and Adam's view of both.

Every estimate here is built on Hessian-vector products, by double backward
through the model (Pearlmutter's trick): with :math:`g = \\nabla_\\theta L`
computed once with its graph, :math:`Hv = \\nabla_\\theta (g \\cdot v)`. One
product costs about two forward-backward passes and never forms the Hessian,
so it works on any model. normlab's BatchNorms differentiate twice, meanwhile
(their C++ kernel's second derivative, or ``normlab.nn.twice_differentiable``: in
training mode their batch statistics are part of the loss, and so of its Hessian);
every buffer the forward pass moves (running statistics) is put back afterwards.

- ``top_eigenvalue``: the Lanczos iteration, the sharpness :math:`\\lambda_{max}`;
  full-batch gradient descent is stable while it stays below :math:`2/\\eta`
  (Cohen et al., 2021, the edge of stability).
- ``hessian_trace``: Hutchinson's estimator with Rademacher probes.
- ``top_eigenvalue(..., preconditioner=adam_preconditioner(optimizer))``: the
  sharpness that Adam sees, :math:`\\lambda_{max}(P^{-1}H)`, stable below
  :math:`(2 + 2\\beta_1)/((1 - \\beta_1)\\eta)` (Cohen et al., 2022).
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.dataflow import first_tensor
from normlab.errors import first_line
from normlab.nn import kept_buffers, twice_differentiable


class NotTwiceDifferentiable(RuntimeError):
    """The loss has no second derivative: some operation in it has no double backward."""


@dataclass(frozen=True)
class Eigenvalue:
    """A Lanczos iteration's result (``top_eigenvalue``)."""

    value: float  # the largest Ritz value: the largest eigenvalue of H in the Krylov space
    products: int  # Hessian-vector products spent (each about 2 forward-backward passes)
    converged: bool  # its Ritz pair's residual |Hy - θy| within tol · |θ|


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of the Hessian trace."""

    value: float  # the mean of z·Hz over the probes
    stderr: float  # its standard error: the probes' standard deviation / √probes
    probes: int  # Rademacher probes, one Hessian-vector product each


class Hessian:
    """``H @ v`` for the Hessian of ``loss_fn(model)`` in the model's trainable parameters.

    ``loss_fn`` computes one batch's scalar loss from the model, which keeps its mode
    (a BatchNorm in training mode normalizes with the batch's statistics, and those are
    differentiated through). The loss and its gradient are computed once, here; each
    ``@`` is one double backward through them. Vectors are lists of tensors shaped as
    ``self.params``.

    Raises ``NotTwiceDifferentiable``: here for a custom autograd Function whose backward is
    once differentiable, naming the layer where it can; at the first product for an operator
    without a double backward (an ATen operator without one, a C++ extension's).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> x = torch.randn(8, 3)
        >>> H = Hessian(model, lambda m: m(x).square().mean())
        >>> [t.shape for t in H @ [torch.ones_like(p) for p in H.params]]
        [torch.Size([4, 3]), torch.Size([4]), torch.Size([1, 4]), torch.Size([1])]
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        layer_of = {}  # the autograd node that made a layer's output -> the layer
        handles = [
            m.register_forward_hook(_note_node(name, layer_of)) for name, m in model.named_modules()
        ]
        try:
            with twice_differentiable(), torch.enable_grad(), kept_buffers(model):
                loss = loss_fn(model)
                _refuse_once_differentiable(loss, layer_of)
                self.grads = torch.autograd.grad(loss, self.params, create_graph=True)
        finally:
            for handle in handles:
                handle.remove()
        self.loss = loss.item()
        self.products = 0

    def __matmul__(self, v: list[Tensor]) -> list[Tensor]:
        first = self.products == 0
        self.products += 1
        try:
            hv = torch.autograd.grad(
                self.grads, self.params, v, retain_graph=True, allow_unused=True
            )
        except RuntimeError as e:
            if not first or isinstance(e, torch.OutOfMemoryError):
                raise
            # the first product is where an operator without a double backward says so
            raise NotTwiceDifferentiable(
                f"the loss has no second derivative: {first_line(e, 160)}"
            ) from None
        # a parameter whose gradient does not depend on the parameters (a bias feeding a
        # linear loss) has a zero row: None here
        return [
            torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv, strict=True)
        ]


def _note_node(name: str, layer_of: dict):
    def hook(module, inputs, out):
        node = getattr(first_tensor(out), "grad_fn", None)
        if node is not None:
            layer_of.setdefault(node, name)

    return hook


def _refuse_once_differentiable(loss: Tensor, layer_of: dict) -> None:
    """Raise ``NotTwiceDifferentiable`` if the loss's graph holds a custom autograd Function
    whose backward is ``@once_differentiable``: its gradient is right, but a product through
    it would silently drop that Function's second derivative. Names the layer whose output it
    made, where it made one."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        forward_cls = getattr(node, "_forward_cls", None)  # a custom autograd Function's node
        if forward_cls is not None and hasattr(forward_cls.backward, "__wrapped__"):
            layer = layer_of.get(node)
            where = f" in layer {layer!r}" if layer else ""
            raise NotTwiceDifferentiable(
                f"the loss has no second derivative: autograd Function {forward_cls.__name__}"
                f"{where} has a once-differentiable backward"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


def top_eigenvalue(
    hessian: Hessian,
    max_products: int = 100,
    tol: float = 1e-2,
    preconditioner: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Eigenvalue:
    r"""The Hessian's largest eigenvalue :math:`\lambda_{max}`, by the Lanczos iteration: the
    sharpness.

    From a random unit vector, Lanczos builds an orthonormal basis :math:`v_1, v_2, \dots` of
    the Krylov space :math:`\{v, Hv, H^2v, \dots\}`, one product per vector, by the
    three-term recurrence :math:`\beta_{k+1} v_{k+1} = Hv_k - \alpha_k v_k - \beta_k v_{k-1}`,
    :math:`\alpha_k = v_k \cdot Hv_k`. In that basis :math:`H` is the tridiagonal
    :math:`T_k` (the :math:`\alpha` on its diagonal, the :math:`\beta` beside it), and
    :math:`T_k`'s largest eigenvalue :math:`\theta` (a Ritz value) approaches
    :math:`\lambda_{max}` from below: the largest algebraic eigenvalue, whatever the signs
    of the others, and much faster than power iteration, whose error shrinks as
    :math:`(\lambda_2/\lambda_1)^k` (Lanczos's as a Chebyshev polynomial of degree
    :math:`k` grows). It stops when the Ritz pair's residual
    :math:`|Hy - \theta y| = \beta_{k+1} |s_k|` (:math:`s` the eigenvector of
    :math:`T_k`, :math:`s_k` its last entry) is at most ``tol`` :math:`\cdot |\theta|`, or
    after ``max_products`` products, unconverged. It keeps three vectors, not the basis: the
    basis loses its orthogonality in floating point as the top Ritz value converges, which
    repeats that value in :math:`T_k` without moving it.

    With ``preconditioner`` (the diagonal :math:`P` as tensors shaped as the
    parameters, ``adam_preconditioner``), the eigenvalue of :math:`P^{-1}H`, through
    the symmetric :math:`P^{-1/2} H P^{-1/2}`, which has the same eigenvalues.
    """
    vectors = _Flat(hessian.params)
    scale = None if preconditioner is None else vectors.join(preconditioner).rsqrt()

    def product(v: Tensor, out: Tensor) -> Tensor:  # (P^-1/2 H P^-1/2) v, into out
        u = v if scale is None else scale * v
        hv = vectors.join(hessian @ vectors.split(u), out=out)
        return hv if scale is None else hv.mul_(scale)

    v = vectors.join([torch.randn(p.shape, generator=generator) for p in hessian.params])
    v /= torch.linalg.vector_norm(v)
    # three vectors and a fourth to write the next into, reused: on a large model a fresh one
    # each product is fresh memory, which the kernel maps page by page
    previous, spare, beta = torch.zeros_like(v), torch.empty_like(v), 0.0
    alphas, betas = [], []  # T's diagonal, and the entries beside it
    value, converged = 0.0, False
    for _ in range(max_products):
        w = product(v, out=spare)
        alpha = torch.dot(w, v).item()
        w.sub_(v, alpha=alpha).sub_(previous, alpha=beta)
        beta = torch.linalg.vector_norm(w).item()
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            value = math.nan  # a product overflowed or met a NaN: there is no eigenvalue to give
            break
        alphas.append(alpha)
        ritz, ritz_vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        value = ritz[-1].item()
        if beta * abs(ritz_vectors[-1, -1].item()) <= tol * abs(value) or beta == 0.0:
            converged = True  # beta 0: the Krylov space holds an eigenvector, exactly
            break
        betas.append(beta)
        previous, v, spare = v, w.div_(beta), previous
    return Eigenvalue(value, hessian.products, converged)


class _Flat:
    """Vectors over ``params`` as one flat tensor each (in the parameters' widest dtype, on
    the first one's device), and back as views shaped as the parameters: a vector operation
    is one operator, where a tensor per parameter costs one per parameter."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        self.dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        self.device = params[0].device

    def join(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        """(n,): ``tensors``, shaped as the parameters, end to end (into ``out``)."""
        return torch.cat([t.reshape(-1).to(self.device, self.dtype) for t in tensors], out=out)

    def split(self, flat: Tensor) -> list[Tensor]:
        """``flat`` (n,) as a tensor per parameter, in its shape, dtype and device."""
        pieces = flat.split(self.sizes)
        return [t.view(p.shape).to(p) for t, p in zip(pieces, self.params, strict=True)]


def _tridiagonal(diagonal: list[float], beside: list[float]) -> Tensor:
    """The symmetric tridiagonal matrix (k, k), float64."""
    T = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    if beside:
        off = torch.tensor(beside, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


def hessian_trace(
    hessian: Hessian, probes: int = 100, generator: torch.Generator | None = None
) -> TraceEstimate:
    r"""Hutchinson's estimator: :math:`\mathrm{tr}(H) = \mathrm{E}[z^\top H z]` for ``z`` of
    independent ±1 entries. Unbiased, with variance
    :math:`2(\|H\|_F^2 - \sum_i H_{ii}^2)` per probe; ``probes`` products (each about two
    forward-backward passes), a fixed number: the standard error says how far to trust it."""
    if probes < 2:
        raise ValueError(f"hessian_trace needs at least 2 probes, got {probes}")
    vectors = _Flat(hessian.params)
    # the probes' draws, on the CPU as the generator, and their products: each buffer reused
    draws = torch.empty(vectors.numel, dtype=vectors.dtype)
    hz = torch.empty(vectors.numel, dtype=vectors.dtype, device=vectors.device)
    samples = []
    for _ in range(probes):
        for piece in draws.split(vectors.sizes):  # torch.randint's draws, a parameter at a time
            piece.random_(0, 2, generator=generator)
        z = draws.to(vectors.device).mul_(2).sub_(1)
        samples.append(torch.dot(z, vectors.join(hessian @ vectors.split(z), out=hz)).item())
    values = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(values.mean().item(), (values.std() / math.sqrt(probes)).item(), probes)


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor]:
    r"""Adam's (and AdamW's) diagonal preconditioner at its last step, for each of ``params``:
    the update is :math:`\eta P^{-1} m` with

    .. math::
        P = (1 - \beta_1^t) \left(\sqrt{v / (1 - \beta_2^t)} + \epsilon\right)

    (Cohen et al., 2022, "Adaptive gradient methods at the edge of stability"). Raises
    ``ValueError`` for an optimizer without a second-moment state (``exp_avg_sq``), or
    before its first step."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    diagonal = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or id(p) not in group_of:
            name = type(optimizer).__name__
            adaptive = all("betas" in g for g in optimizer.param_groups)
            if adaptive:
                raise ValueError(f"{name} has no second moments before its first step")
            raise ValueError(f"{name} keeps no second moments (exp_avg_sq)")
        beta1, beta2 = group_of[id(p)]["betas"]
        eps = group_of[id(p)]["eps"]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)
        diagonal.append((1 - beta1**t) * (v_hat.sqrt() + eps))
    return diagonal
