"""The learning-rate range test: it leaves the model, the optimizer and the RNG as they were,
and on a quadratic, whose stability limit 2/λmax is known exactly, it suggests below it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nl
from normlab.lr_find import find_lr


def _regression(n_batches=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 1, generator=g)
    X = torch.randn(64, 6, generator=g) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.1])
    return X, X @ w, [(X, X @ w)] * n_batches  # the full batch every step: gradient descent


def _mse(model, batch):
    return (model(batch[0]) - batch[1]).square().mean()


def test_on_a_quadratic_it_diverges_past_2_over_lambda_max_and_suggests_below_it():
    X, _, data = _regression()
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    # the loss is a quadratic in (w, b): its Hessian is 2/n · [X 1]ᵀ[X 1], whatever the weights
    Xb = torch.cat([X, torch.ones(len(X), 1)], dim=1)
    limit = 2 / torch.linalg.eigvalsh(2 * Xb.T @ Xb / len(X)).max().item()  # 2/λmax
    sweep = find_lr(model, data, torch.optim.SGD(model.parameters(), lr=0.1), _mse, 1e-5, 10.0, 100)
    assert sweep.stopped == "diverged"
    assert sweep.lrs[-1] > limit  # gradient descent cannot diverge below its stability limit
    assert sweep.suggestion is not None and 1e-4 * limit < sweep.suggestion < limit


def test_the_model_the_optimizer_and_the_rng_are_put_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nl.BatchNorm1d(16), nn.Dropout(0.1), nn.Linear(16, 1))
    model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, _, data = _regression(30)
    model.train()
    optimizer.zero_grad()
    _mse(model, data[0]).backward()
    optimizer.step()  # moments to put back
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    rng = torch.get_rng_state()
    sweep = find_lr(model, data, optimizer, _mse, steps=30)
    assert len(sweep.lrs) > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for key, value in optimizer.state[next(model.parameters())].items():
        assert torch.equal(value, moments[key]), key
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training  # its mode too


def test_param_groups_keep_their_ratios():
    model = nn.Linear(6, 1)
    optimizer = torch.optim.SGD(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1
    )
    seen = []

    def loss_fn(m, batch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return _mse(m, batch)

    find_lr(model, _regression(10)[2], optimizer, loss_fn, 1e-4, 1e-2, 10)
    assert all(b == pytest.approx(5 * a) for a, b in seen)


def test_a_loss_that_turns_nan_stops_the_sweep_there():
    model = nn.Linear(6, 1)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return _mse(m, batch) * (float("nan") if len(calls) > 40 else 1.0)

    sweep = find_lr(
        model,
        _regression(100)[2],
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn,
        1e-6,
        1e-2,
        100,
    )
    assert sweep.stopped == "not finite" and len(sweep.lrs) == 40


def test_too_few_batches_is_a_value_error_saying_how_many():
    model = nn.Linear(6, 1)
    with pytest.raises(ValueError, match="takes 100 batches and the data gave 7"):
        find_lr(model, _regression(7)[2], torch.optim.SGD(model.parameters(), lr=0.1), _mse)


def test_it_is_normlab_find_lr_and_draws_its_curve(tmp_path):
    model = nn.Linear(6, 1)
    sweep = normlab.find_lr(
        model, _regression()[2], torch.optim.SGD(model.parameters(), lr=0.1), _mse, 1e-5, 10.0
    )
    assert sweep.plot(tmp_path / "lr.png").stat().st_size > 0


def test_a_model_with_its_own_loss_needs_no_loss_fn():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 3)

        def forward(self, x, y):
            return {"loss": F.cross_entropy(self.linear(x), y)}

    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
        for _ in range(20)
    ]
    model = WithLoss()
    sweep = find_lr(model, data, torch.optim.SGD(model.parameters(), lr=0.1), steps=20)
    assert len(sweep.losses) > 0
