"""The second-order instruments on one batch, together: what ``normlab.audit(...,
second_order=True)``, ``normlab diagnose`` and a run's ``--second-order-every`` record.

``measure_second_order`` runs, on the model's current weights and before any update:

- the sharpness (``curvature.top_eigenvalue``, ``max_products`` Hessian-vector products at
  most) and, given an Adam-type optimizer with second moments, the preconditioned sharpness;
- the Hessian trace (``curvature.hessian_trace``, ``probes`` products);
- the gradient noise scale (``noise.gradient_noise``, micro-batches of ``micro_batch``).

Each Hessian-vector product costs about two forward-backward passes, the noise scale
about two: at the defaults, at most 2·(20 + 10) + 2 = 62 forward-backward equivalents, a
cost for a sparse cadence. What cannot be measured is None, with a one-line ``note``: a loss
without a second derivative (the first-order diagnostics still run), an optimizer without
second moments (the plain sharpness stands), a batch that micro-batches cannot split.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from normlab.curvature import (
    Hessian,
    NotTwiceDifferentiable,
    adam_preconditioner,
    hessian_trace,
    top_eigenvalue,
)
from normlab.dataflow import batch_rows
from normlab.diagnostics import SecondOrderStats
from normlab.errors import first_line
from normlab.noise import gradient_noise


def default_micro_batch(batch_size: int) -> int:
    """The largest divisor of ``batch_size`` that is at most an eighth of it (at least 1), so
    that the noise scale's small batches are small against the whole.

    >>> default_micro_batch(256), default_micro_batch(100), default_micro_batch(7)
    (32, 10, 1)
    """
    return max(d for d in range(1, max(1, batch_size // 8) + 1) if batch_size % d == 0)


def measure_second_order(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    batch,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    micro_batch: int | None = None,
    max_products: int = 20,
    probes: int = 10,
    seed: int = 0,
    noise_batch=None,
) -> SecondOrderStats:
    """The second-order statistics of ``loss_fn(model, batch)`` (a batch's mean loss).

    ``noise_batch`` (default: ``batch``) is what the noise scale splits into micro-batches of
    ``micro_batch`` (default: ``default_micro_batch`` of it); ``batch_size``, which the
    batch-vs-noise verdict compares with the noise scale, is ``batch``'s.
    ``lr`` is the learning rate of the step the statistics judge; by default the first
    param group's of ``optimizer``. The random vectors come from their own generator
    (``seed``), and torch's generators are put back afterwards (dropout draws from them):
    measuring changes nothing in the model, its optimizer or the random draws to come.
    """
    device = next(model.parameters()).device
    # dropout draws from torch's generators: measuring must leave a run's draws as they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(
            model,
            loss_fn,
            batch,
            optimizer,
            lr,
            micro_batch,
            max_products,
            probes,
            seed,
            noise_batch,
        )


def _measure(
    model, loss_fn, batch, optimizer, lr, micro_batch, max_products, probes, seed, noise_batch
):
    generator = torch.Generator().manual_seed(seed)
    groups = optimizer.param_groups if optimizer is not None else []
    lr = lr if lr is not None else (groups[0]["lr"] if groups else None)
    betas = groups[0].get("betas") if groups else None
    beta1 = float(betas[0]) if betas is not None else None
    batch_size = batch_rows(batch)
    notes = []
    sharpness = trace = preconditioned = noise_scale = None
    try:  # an operator without a double backward raises at the first product
        hessian = Hessian(model, lambda m: loss_fn(m, batch))
        sharpness = top_eigenvalue(hessian, max_products, generator=generator).value
        trace = hessian_trace(hessian, probes, generator=generator).value
        # plain SGD preconditions nothing: its sharpness is the plain one, without a word
        if optimizer is not None and type(optimizer) is not torch.optim.SGD:
            try:
                P = adam_preconditioner(optimizer, hessian.params)
            except ValueError as e:
                notes.append(f"{e}: the plain sharpness is judged")
            else:
                found = top_eigenvalue(hessian, max_products, preconditioner=P, generator=generator)
                preconditioned = found.value
    except NotTwiceDifferentiable as e:
        notes.append(str(e))
    noise_batch = batch if noise_batch is None else noise_batch
    try:
        micro_batch = micro_batch or default_micro_batch(batch_rows(noise_batch))
        noise = gradient_noise(model, loss_fn, noise_batch, micro_batch)
        noise_scale = noise.b_simple
        if noise.gradient_norm_sq <= 0:
            notes.append(
                f"no noise scale: at a batch of {batch_rows(noise_batch)} the gradient's signal is "
                "lost in its noise (|G|² estimated ≤ 0); measure it on a larger batch"
            )
            noise_scale = None
    except (ValueError, RuntimeError) as e:  # a BatchNorm given one row, an odd batch
        notes.append(f"no noise scale: {first_line(e, 160)}")
    return SecondOrderStats(
        sharpness=sharpness,
        hessian_trace=trace,
        noise_scale=noise_scale,
        preconditioned_sharpness=preconditioned,
        lr=lr,
        beta1=beta1 if preconditioned is not None else None,
        batch_size=batch_size,
        note="; ".join(notes) or None,
    )
