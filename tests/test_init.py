import math

import pytest
import torch

from normlab import init

SHAPES = [(7, 5), (64, 30), (8, 3, 5), (4, 2, 3, 3), (6, 4, 2, 3, 3)]  # Linear, Conv1d, 2d, 3d


def _pair(shape, seed=0):
    return torch.empty(shape), torch.empty(shape), torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize(
    "nonlinearity,a",
    [("leaky_relu", 0), ("relu", 0), ("tanh", 0), ("leaky_relu", 0.2), ("linear", 0)],
)
@pytest.mark.parametrize("name", ["kaiming_normal_", "kaiming_uniform_"])
def test_kaiming_bitwise_equal_to_torch(shape, mode, nonlinearity, a, name):
    ours, theirs, _ = _pair(shape)
    getattr(init, name)(
        ours, a=a, mode=mode, nonlinearity=nonlinearity, generator=torch.Generator().manual_seed(3)
    )
    getattr(torch.nn.init, name)(
        theirs,
        a=a,
        mode=mode,
        nonlinearity=nonlinearity,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gain", [1.0, 5 / 3])
@pytest.mark.parametrize("name", ["xavier_normal_", "xavier_uniform_"])
def test_xavier_bitwise_equal_to_torch(shape, gain, name):
    ours, theirs, _ = _pair(shape)
    getattr(init, name)(ours, gain=gain, generator=torch.Generator().manual_seed(5))
    getattr(torch.nn.init, name)(theirs, gain=gain, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kaiming_global_rng_matches_torch(dtype):
    ours, theirs = torch.empty(50, 20, dtype=dtype), torch.empty(50, 20, dtype=dtype)
    torch.manual_seed(11)
    init.kaiming_normal_(ours, nonlinearity="tanh")
    torch.manual_seed(11)
    torch.nn.init.kaiming_normal_(theirs, nonlinearity="tanh")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "nonlinearity,param,expected",
    [
        ("linear", None, 1),
        ("conv2d", None, 1),
        ("conv_transpose3d", None, 1),
        ("sigmoid", None, 1),
        ("tanh", None, 5 / 3),
        ("relu", None, math.sqrt(2)),
        ("leaky_relu", None, math.sqrt(2 / (1 + 0.01**2))),
        ("leaky_relu", 0.2, math.sqrt(2 / (1 + 0.04))),
        ("leaky_relu", 1, 1.0),
        ("selu", None, 0.75),
    ],
)
def test_calculate_gain(nonlinearity, param, expected):
    assert init.calculate_gain(nonlinearity, param) == pytest.approx(expected, rel=1e-15)
    assert init.calculate_gain(nonlinearity, param) == torch.nn.init.calculate_gain(
        nonlinearity, param
    )


def test_unknown_nonlinearity_lists_choices():
    with pytest.raises(ValueError, match=r"valid choices: .*tanh.*relu"):
        init.calculate_gain("swish")


def test_bad_leaky_slope():
    with pytest.raises(ValueError, match="negative_slope"):
        init.calculate_gain("leaky_relu", True)


def test_bad_mode_lists_choices():
    with pytest.raises(ValueError, match="fan_in, fan_out"):
        init.kaiming_normal_(torch.empty(3, 3), mode="fan_avg")


@pytest.mark.parametrize(
    "fn", [init.kaiming_normal_, init.kaiming_uniform_, init.xavier_normal_, init.xavier_uniform_]
)
def test_fewer_than_two_dims_rejected(fn):
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        fn(torch.empty(10))


@pytest.mark.parametrize("shape", SHAPES)
def test_fans_match_torch(shape):
    t = torch.empty(shape)
    assert init.calculate_fan_in_and_fan_out(t) == torch.nn.init._calculate_fan_in_and_fan_out(t)


def test_fan_in_is_in_features_times_receptive_field():
    assert init.calculate_fan_in_and_fan_out(torch.empty(16, 8, 3, 3)) == (72, 144)


def test_kaiming_std_is_gain_over_sqrt_fan():
    w = init.kaiming_normal_(
        torch.empty(2000, 400), nonlinearity="tanh", generator=torch.Generator().manual_seed(0)
    )
    assert w.std().item() == pytest.approx((5 / 3) / math.sqrt(400), rel=0.01)
    w = init.kaiming_normal_(torch.empty(2000, 400), mode="fan_out", nonlinearity="relu")
    assert w.std().item() == pytest.approx(math.sqrt(2) / math.sqrt(2000), rel=0.01)


def test_zero_element_tensor_is_a_no_op():
    with pytest.warns(UserWarning, match="no-op"):
        t = init.kaiming_normal_(torch.empty(0, 5))
    assert t.shape == (0, 5)
