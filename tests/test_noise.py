"""Gradient noise: McCandlish's estimator against the exact per-example computation
(torch.func), on models without BatchNorm, and what it does with BatchNorm in training mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.noise import gradient_noise


def _model(norm=False):
    torch.manual_seed(0)
    middle = [nl.BatchNorm1d(16)] if norm else []
    return nn.Sequential(nn.Linear(8, 16), *middle, nn.Tanh(), nn.Linear(16, 4)).double()


def _data(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = (x[:, :4].argmax(1) + torch.randint(0, 2, (n,), generator=g)) % 4  # learnable, noisy
    return x, y


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _per_example(model, x, y):
    """tr(Σ) and |G|², unbiased, from every example's own gradient (torch.func.vmap)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # (B, n_params)
    B = len(x)
    trace = (flat - flat.mean(0)).square().sum().item() / (B - 1)
    return trace, flat.mean(0).square().sum().item() - trace / B


def test_with_one_example_per_micro_batch_it_is_the_per_example_estimate_exactly():
    model = _model()
    x, y = _data(64)
    trace, G2 = _per_example(model, x, y)
    noise = gradient_noise(model, _loss, (x, y), micro_batch=1)
    assert noise.noise_trace == pytest.approx(trace, rel=1e-9)
    assert noise.gradient_norm_sq == pytest.approx(G2, rel=1e-9)
    assert noise.b_simple == pytest.approx(trace / G2, rel=1e-9)
    assert set(noise.snr) == {n for n, _ in model.named_parameters()}


def test_from_micro_batches_it_is_within_10_percent_of_the_per_example_computation():
    model = _model()
    x, y = _data(2048)
    trace, G2 = _per_example(model, x, y)
    noise = gradient_noise(model, _loss, (x, y), micro_batch=8)
    assert noise.b_simple == pytest.approx(trace / G2, rel=0.10)


def test_with_batchnorm_in_training_mode_it_measures_micro_batches_and_puts_the_statistics_back():
    model = _model(norm=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x, y = _data(512)
    noise = gradient_noise(model, _loss, (x, y), micro_batch=16)
    assert 0 < noise.b_simple < float("inf")
    assert noise.noise_trace > 0
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("micro_batch", [0, 64, 5])
def test_a_micro_batch_that_does_not_divide_the_batch_is_refused(micro_batch):
    x, y = _data(64)
    with pytest.raises(ValueError, match="micro_batch must divide the batch of 64"):
        gradient_noise(_model(), _loss, (x, y), micro_batch)
