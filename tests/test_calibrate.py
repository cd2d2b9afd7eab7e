import copy

import pytest
import torch
from models import SequenceModel, conv_net, deep_bn_net
from torch import nn

from normlab import nn as nl
from normlab.calibrate import batchnorm_layers, calibrate_batchnorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("torch_layers", [False, True])
def test_calibrated_eval_equals_full_batch_statistics(dtype, torch_layers):
    net = deep_bn_net(dtype, torch_layers)
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
    net = deep_bn_net(torch.float64)
    data = torch.randn(500, 12, dtype=torch.float64) + 3
    calibrate_batchnorm(net.eval(), data, batch_size=64)
    assert not net.training
    h = net[0](data)
    torch.testing.assert_close(net[1].running_mean, h.mean(0))
    torch.testing.assert_close(net[1].running_var, h.var(0, correction=0))


def test_batch_size_does_not_change_result():
    net = deep_bn_net(torch.float64)
    data = torch.randn(300, 12, dtype=torch.float64)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    calibrate_batchnorm(a, data, batch_size=7)
    calibrate_batchnorm(b, data, batch_size=300)
    for la, lb in zip(batchnorm_layers(a, data[:2]), batchnorm_layers(b, data[:2]), strict=True):
        torch.testing.assert_close(la.running_mean, lb.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(la.running_var, lb.running_var, rtol=1e-12, atol=1e-12)


def _forward_passes(model, run) -> int:
    """How many times ``run()`` calls ``model``'s forward."""
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    run()
    hook.remove()
    return len(calls)


def test_one_batch_takes_one_pass_whatever_the_number_of_batchnorms():
    net = deep_bn_net(torch.float64)  # 4 BatchNorms
    data = torch.randn(300, 12, dtype=torch.float64)
    counts = [m.num_batches_tracked.clone() for m in batchnorm_layers(net, data)]
    one_batch, three_batches = copy.deepcopy(net), copy.deepcopy(net)
    # the forward-order walk, then one pass
    assert _forward_passes(one_batch, lambda: calibrate_batchnorm(one_batch, data)) == 2
    three = lambda: calibrate_batchnorm(three_batches, data, batch_size=100)  # noqa: E731
    assert _forward_passes(three_batches, three) == 1 + 4 * 3  # the 3 batches per BatchNorm
    calibrate_batchnorm(net, data)
    assert [m.num_batches_tracked for m in batchnorm_layers(net, data)] == counts  # not counted


def test_a_batch_training_mode_refuses_falls_back_to_the_layer_passes():
    net = deep_bn_net(torch.float64)
    one = torch.randn(1, 12, dtype=torch.float64)  # one value per channel: train mode refuses
    layers = calibrate_batchnorm(net, one)
    torch.testing.assert_close(layers[0].running_mean, net[0](one)[0])
    torch.testing.assert_close(layers[0].running_var, torch.zeros(16, dtype=torch.float64))


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


# ---------------------------------------------------------------------------- any model


def _full_batch_outputs(model, run):
    """The train-mode outputs with all the data as one batch: the population statistics."""
    full = copy.deepcopy(model).train()
    with torch.no_grad():
        return run(full)


def test_a_conv_net_calibrates_from_a_dataloader_of_pairs():
    model = conv_net()
    X = torch.randn(120, 3, 8, 8, dtype=torch.float64) * 2 + 1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, torch.zeros(len(X))), batch_size=32
    )
    expected = _full_batch_outputs(model, lambda m: m(X))
    layers = calibrate_batchnorm(model, loader, forward_fn=lambda m, batch: m(batch[0]))
    assert [type(m).__name__ for m in layers] == ["BatchNorm2d", "BatchNorm2d", "BatchNorm1d"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), expected, atol=1e-10, rtol=1e-10)


def test_a_sequence_model_calibrates_over_batch_and_time_from_dict_batches():
    model = SequenceModel().double()
    idx = torch.randint(0, 27, (200, 8))  # (B, T)
    batches = [{"idx": idx[i : i + 64]} for i in range(0, len(idx), 64)]  # model(**batch)
    expected = _full_batch_outputs(model, lambda m: m(idx))
    calibrate_batchnorm(model, batches)
    h = model.linear(model.embedding(idx)).detach()  # (B, T, 16)
    torch.testing.assert_close(model.norm.running_mean, h.mean((0, 1)))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), expected, atol=1e-10, rtol=1e-10)


def test_bad_input_names_the_layer_or_the_batch_and_leaves_the_model_as_it_was():
    with pytest.raises(ValueError, match="runs no BatchNorm"):
        calibrate_batchnorm(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3))
    with pytest.raises(ValueError, match="non-empty data set"):
        calibrate_batchnorm(conv_net(), torch.randn(0, 3, 8, 8, dtype=torch.float64))
    untracked = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="BatchNorm 1 has track_running_stats=False"):
        calibrate_batchnorm(untracked, torch.randn(8, 3))
    with pytest.raises(ValueError, match="not an iterator"):
        calibrate_batchnorm(conv_net(), (x for x in [torch.randn(4, 3, 8, 8)]))
    model = conv_net()
    before = copy.deepcopy(model.state_dict())
    good = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="rejected batch 2"):  # the third batch has 5 channels
        calibrate_batchnorm(model, [good, good, torch.randn(4, 5, 8, 8, dtype=torch.float64)])
    for name, value in model.state_dict().items():  # never half calibrated
        assert torch.equal(value, before[name]), name
