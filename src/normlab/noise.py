"""Gradient noise: how much a batch's gradient varies from batch to batch, and what batch size
that asks for (McCandlish et al., 2018, "An Empirical Model of Large-Batch Training").

With :math:`G` the true gradient and :math:`\\Sigma` the per-example gradients'
covariance, a batch of :math:`B` examples has :math:`\\mathrm{E}|G_B|^2 = |G|^2 +
\\mathrm{tr}(\\Sigma)/B`. The *simple noise scale* :math:`B_{simple} =
\\mathrm{tr}(\\Sigma)/|G|^2` predicts the critical batch size: well below it, a
larger batch buys a proportionally larger step; well above it, it buys little.

``gradient_noise`` splits one batch of :math:`B` into micro-batches of :math:`b`
and computes each one's gradient, and the whole batch's, as a training step would
(BatchNorm normalizes each micro-batch with its own statistics, as a batch of
:math:`b` does), then solves McCandlish's two equations (their appendix A):

.. math::
    |G|^2 \\approx \\frac{B|G_B|^2 - b\\,\\overline{|G_b|^2}}{B - b}, \\qquad
    \\mathrm{tr}(\\Sigma) \\approx \\frac{\\overline{|G_b|^2} - |G_B|^2}{1/b - 1/B}

With :math:`b = 1` and no BatchNorm this is the unbiased per-example estimate
exactly. With BatchNorm in training mode an example's gradient depends on its batch,
so :math:`\\Sigma` is then the noise of micro-batches of :math:`b`, scaled to one
example: the noise that the batch size actually controls. Cost: about two
forward-backward passes of the batch (the micro-batches, then the whole).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.dataflow import batch_rows, split_batch
from normlab.nn import kept_buffers


@dataclass(frozen=True)
class NoiseScale:
    """``gradient_noise``'s estimates, whole-model and per parameter."""

    b_simple: float  # tr(Σ)/|G|²: the critical batch size's estimate (inf where |G|² ≤ 0)
    gradient_norm_sq: float  # |G|², the true gradient's squared norm
    noise_trace: float  # tr(Σ), the per-example gradients' total variance
    batch_size: int  # B
    micro_batch: int  # b
    # per parameter: |G_p|² / (tr(Σ_p)/B), the batch gradient's signal-to-noise
    snr: dict[str, float]


def _gradients(model, loss_fn, batch, params) -> list[Tensor]:
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def gradient_noise(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch,
    micro_batch: int,
) -> NoiseScale:
    """The gradient noise scale of ``model`` on ``batch``, from micro-batches of ``micro_batch``.

    ``batch`` is a tensor, or a tuple, list or dict of tensors, split along their first
    dimension;
    ``loss_fn(model, batch)`` is a batch's *mean* loss. The model keeps its mode, and
    its buffers (running statistics) are put back. ``micro_batch`` must divide the batch
    and be smaller than it.

    Example:
        >>> model = nn.Linear(4, 1)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> noise = gradient_noise(model, lambda m, b: (m(b[0]) - b[1]).square().mean(), (x, y), 1)
        >>> noise.batch_size, noise.micro_batch, noise.b_simple > 0
        (64, 1, True)
    """
    B = batch_rows(batch)
    if micro_batch < 1 or micro_batch >= B or B % micro_batch:
        raise ValueError(
            f"gradient_noise: micro_batch must divide the batch of {B} and be smaller, "
            f"got {micro_batch}"
        )
    names, params = zip(
        *[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True
    )
    pieces = split_batch(batch, micro_batch)
    device = params[0].device  # where the norms gather, on a model across devices too

    def squared_norms(piece) -> Tensor:  # (P,) float64: each parameter's |g|² on ``piece``
        grads = _gradients(model, loss_fn, piece, params)
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64).to(device) for g in grads]
        return torch.stack(norms).square()

    with kept_buffers(model):  # each forward pass moves the running statistics
        # per parameter: the micro-batches' mean |G_b|², and the whole batch's |G_B|²
        small = (sum(squared_norms(piece) for piece in pieces) / len(pieces)).tolist()
        whole = squared_norms(batch).tolist()
    b = micro_batch
    signal = [(B * w - b * s) / (B - b) for w, s in zip(whole, small, strict=True)]  # |G_p|²
    noise = [(s - w) / (1 / b - 1 / B) for w, s in zip(whole, small, strict=True)]  # tr(Σ_p)
    G2, trace = sum(signal), sum(noise)
    snr = {
        n: g / (v / B) if v > 0 else float("inf")
        for n, g, v in zip(names, signal, noise, strict=True)
    }
    b_simple = trace / G2 if G2 > 0 else float("inf")
    return NoiseScale(b_simple, G2, trace, B, micro_batch, snr)
