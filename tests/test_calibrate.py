import copy

import pytest
import torch
from torch import nn

from normlab import nn as nl
from normlab.calibrate import batchnorm_layers, calibrate_batchnorm, fold_batchnorm


def _deep_bn_net(dtype=torch.float32, torch_layers=False):
    Linear = nn.Linear if torch_layers else nl.Linear
    BN = nn.BatchNorm1d if torch_layers else nl.BatchNorm1d
    layers = []
    for fan_in in (12, 16, 16):
        layers += [Linear(fan_in, 16, bias=False), BN(16), nn.Tanh()]
    layers += [Linear(16, 5), BN(5)]
    net = nn.Sequential(*layers).to(dtype)
    for _ in range(5):  # give the running statistics something to be off from
        net(torch.randn(32, 12, dtype=dtype) * 2 + 0.5)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("torch_layers", [False, True])
def test_calibrated_eval_equals_full_batch_statistics(dtype, torch_layers):
    net = _deep_bn_net(dtype, torch_layers)
    data = torch.randn(1000, 12, dtype=dtype) * 2 + 0.5
    full_batch = copy.deepcopy(net).train()  # one batch of all the data: full-data statistics
    with torch.no_grad():
        expected = full_batch(data)
    net.train()
    calibrate_batchnorm(net, data, batch_size=97)  # an odd slice size on purpose
    assert net.training  # the mode is restored
    net.eval()
    with torch.no_grad():
        got = net(data)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_calibration_statistics_are_population_moments_of_first_layer():
    net = _deep_bn_net(torch.float64)
    data = torch.randn(500, 12, dtype=torch.float64) + 3
    calibrate_batchnorm(net.eval(), data, batch_size=64)
    assert not net.training
    h = net[0](data)
    torch.testing.assert_close(net[1].running_mean, h.mean(0))
    torch.testing.assert_close(net[1].running_var, h.var(0, correction=0))


def test_batch_size_does_not_change_result():
    net = _deep_bn_net(torch.float64)
    data = torch.randn(300, 12, dtype=torch.float64)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    calibrate_batchnorm(a, data, batch_size=7)
    calibrate_batchnorm(b, data, batch_size=300)
    for la, lb in zip(batchnorm_layers(a, data[:2]), batchnorm_layers(b, data[:2]), strict=True):
        torch.testing.assert_close(la.running_mean, lb.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(la.running_var, lb.running_var, rtol=1e-12, atol=1e-12)


def test_layers_are_found_in_forward_order():
    class Reversed(nn.Module):  # registration order differs from execution order
        def __init__(self):
            super().__init__()
            self.second = nl.BatchNorm1d(4)
            self.first = nl.BatchNorm1d(4)

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    m = Reversed()
    assert batchnorm_layers(m, torch.randn(2, 4)) == [m.first, m.second]


def test_untracked_batchnorm_is_refused():
    net = nn.Sequential(nl.Linear(3, 4), nl.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        calibrate_batchnorm(net, torch.randn(10, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_matches_unfolded_eval_and_torch_fusion(dtype):
    net = _deep_bn_net(dtype).eval()
    before = copy.deepcopy(net.state_dict())
    folded = fold_batchnorm(net)
    x = torch.randn(64, 12, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, nl.BatchNorm1d) for m in folded.modules()) == 0
    for k, v in net.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    # layer by layer, the same numbers as torch's own fusion
    for i in (0, 3, 6, 9):
        lin = nn.Linear(net[i].in_features, net[i].out_features, dtype=dtype).eval()
        with torch.no_grad():
            lin.weight.copy_(net[i].weight)
            lin.bias.copy_(net[i].bias if net[i].bias is not None else torch.zeros_like(lin.bias))
        bn = nn.BatchNorm1d(net[i + 1].num_features, dtype=dtype).eval()
        bn.load_state_dict(net[i + 1].state_dict())
        ref = torch.nn.utils.fusion.fuse_linear_bn_eval(lin, bn)
        torch.testing.assert_close(folded[i].weight, ref.weight)
        torch.testing.assert_close(folded[i].bias, ref.bias)


def test_fold_leaves_untracked_batchnorm():
    net = nn.Sequential(nl.Linear(3, 4), nl.BatchNorm1d(4, track_running_stats=False)).eval()
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nl.BatchNorm1d)


def test_fold_draws_no_random_numbers():
    net = _deep_bn_net().eval()
    state = torch.get_rng_state()
    fold_batchnorm(net)
    assert torch.equal(torch.get_rng_state(), state)
