"""The curvature of a batch's loss: its sharpness, its Hessian trace, and Adam's view of both.

Every estimate here is built on Hessian-vector products, by double backward
through the model (Pearlmutter's trick): with :math:`g = \\nabla_\\theta L`
computed once with its graph, :math:`Hv = \\nabla_\\theta (g \\cdot v)`. One
product costs about two forward-backward passes and never forms the Hessian,
so it works on any model. normlab's BatchNorms compute, meanwhile, with
``normlab.nn.twice_differentiable`` (in training mode, their batch statistics
are part of the loss, and so of its Hessian); every buffer the forward pass
moves (running statistics) is put back afterwards.

- ``top_eigenvalue``: power iteration, the sharpness :math:`\\lambda_{max}`;
  full-batch gradient descent is stable while it stays below :math:`2/\\eta`
  (Cohen et al., 2021, the edge of stability).
- ``hessian_trace``: Hutchinson's estimator with Rademacher probes.
- ``top_eigenvalue(..., preconditioner=adam_preconditioner(optimizer))``: the
  sharpness that Adam sees, :math:`\\lambda_{max}(P^{-1}H)`, stable below
  :math:`(2 + 2\\beta_1)/((1 - \\beta_1)\\eta)` (Cohen et al., 2022).
"""

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
    """A power iteration's result."""

    value: float  # the Rayleigh quotient v·Hv at the last iterate, |v| = 1
    products: int  # Hessian-vector products spent (each about 2 forward-backward passes)
    converged: bool  # two successive estimates within the relative tolerance


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

    Raises ``NotTwiceDifferentiable``, naming the layer where it can, when an operation
    of the loss has no double backward.

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
        self._check_second_order()

    def __matmul__(self, v: list[Tensor]) -> list[Tensor]:
        self.products += 1
        hv = torch.autograd.grad(self.grads, self.params, v, retain_graph=True, allow_unused=True)
        # a parameter whose gradient does not depend on the parameters (a bias feeding a
        # linear loss) has a zero row: None here
        return [
            torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv, strict=True)
        ]

    def _check_second_order(self) -> None:
        """One product, up front, so that an operator without a double backward (an ATen
        operator without one, a C++ extension's) says so here."""
        try:
            self @ [torch.zeros_like(p) for p in self.params]
        except RuntimeError as e:
            raise NotTwiceDifferentiable(
                f"the loss has no second derivative: {first_line(e, 160)}"
            ) from None
        self.products = 0


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


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _normalized(v: list[Tensor]) -> list[Tensor]:
    norm = _dot(v, v).sqrt()
    return [t / norm for t in v]


def top_eigenvalue(
    hessian: Hessian,
    max_products: int = 100,
    tol: float = 1e-2,
    preconditioner: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Eigenvalue:
    r"""The Hessian's largest eigenvalue :math:`\lambda_{max}`, by power iteration: the sharpness.

    Power iteration finds the eigenvalue of largest magnitude: from a random unit
    vector, :math:`v \leftarrow Hv / |Hv|`, with the Rayleigh quotient
    :math:`\lambda = v \cdot Hv` as the estimate. It stops when ``v`` is an
    eigenvector to within ``tol``, :math:`|Hv - \lambda v| \le tol \cdot |\lambda|` (then
    :math:`\lambda` is exact to about :math:`tol^2 \lambda^2 / gap`), or after ``max_products``
    Hessian-vector products, unconverged. Each iteration costs one product (about two
    forward-backward passes); it converges as :math:`(\lambda_2/\lambda_1)^k`, and not at
    all when the two largest eigenvalues have the same magnitude and opposite signs. Where
    the eigenvalue it finds is negative, :math:`\mu`, a second iteration on
    :math:`H - \mu I` (whose largest magnitude is :math:`\lambda_{max} - \mu`) finds the top,
    with its own ``max_products``.

    With ``preconditioner`` (the diagonal :math:`P` as tensors shaped as the
    parameters, ``adam_preconditioner``), the eigenvalue of :math:`P^{-1}H`, through
    the symmetric :math:`P^{-1/2} H P^{-1/2}`, which has the same eigenvalues.
    """
    scale = None if preconditioner is None else [d.rsqrt() for d in preconditioner]

    def product(v: list[Tensor]) -> list[Tensor]:  # (P^-1/2 H P^-1/2) v
        u = v if scale is None else [s * t for s, t in zip(scale, v, strict=True)]
        hv = hessian @ [t.detach() for t in u]
        return hv if scale is None else [s * t for s, t in zip(scale, hv, strict=True)]

    found = _power_iteration(product, hessian.params, max_products, tol, generator)
    if found.value >= 0 or not math.isfinite(found.value):
        return Eigenvalue(found.value, hessian.products, found.converged)
    shift = found.value  # the most negative: shift the spectrum to make the top the largest

    def shifted(v: list[Tensor]) -> list[Tensor]:
        return [h - shift * t for h, t in zip(product(v), v, strict=True)]

    top = _power_iteration(shifted, hessian.params, max_products, tol, generator)
    return Eigenvalue(top.value + shift, hessian.products, top.converged)


def _power_iteration(product, params, max_products, tol, generator) -> Eigenvalue:
    """The eigenvalue of largest magnitude of the symmetric map ``product``."""
    v = _normalized([torch.randn(p.shape, generator=generator).to(p) for p in params])
    value, converged, used = 0.0, False, 0
    for _ in range(max_products):
        hv = product(v)
        used += 1
        value = _dot(v, hv).item()
        if not math.isfinite(value) or value == 0.0:
            break
        residual = [h - value * t for h, t in zip(hv, v, strict=True)]
        if _dot(residual, residual).sqrt().item() <= tol * abs(value):
            converged = True
            break
        v = _normalized(hv)
    return Eigenvalue(value, used, converged)


def hessian_trace(
    hessian: Hessian, probes: int = 100, generator: torch.Generator | None = None
) -> TraceEstimate:
    r"""Hutchinson's estimator: :math:`\mathrm{tr}(H) = \mathrm{E}[z^\top H z]` for ``z`` of
    independent ±1 entries. Unbiased, with variance
    :math:`2(\|H\|_F^2 - \sum_i H_{ii}^2)` per probe; ``probes`` products (each about two
    forward-backward passes), a fixed number: the standard error says how far to trust it."""
    if probes < 2:
        raise ValueError(f"hessian_trace needs at least 2 probes, got {probes}")
    samples = []
    for _ in range(probes):
        z = [
            torch.randint(0, 2, p.shape, generator=generator).to(p).mul_(2).sub_(1)
            for p in hessian.params
        ]
        samples.append(_dot(z, hessian @ z).item())
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
