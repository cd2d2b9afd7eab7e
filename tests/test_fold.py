"""Folding BatchNorms: into the layer before or after, in Sequentials and through torch.fx."""

import copy

import pytest
import torch
from models import ResNetLike, conv_net, deep_bn_net, trained_statistics
from torch import nn

from normlab import nn as nl
from normlab.fold import fold_batchnorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_matches_unfolded_eval_and_torch_fusion(dtype):
    net = deep_bn_net(dtype).eval()
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
    net = deep_bn_net().eval()
    state = torch.get_rng_state()
    fold_batchnorm(net)
    assert torch.equal(torch.get_rng_state(), state)


def _folds(model, x, expected_folds: int, tol=1e-10):
    """Fold ``model``; check the outputs and the number folded; return the folded model and log."""
    lines = []
    folded = fold_batchnorm(model, x, log=lines.append)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=tol, rtol=tol)
    assert sum(line.startswith("folded ") for line in lines) == expected_folds, lines
    return folded, lines


def test_a_conv_net_folds_every_batchnorm():
    model = trained_statistics(conv_net(), (16, 3, 8, 8))
    folded, lines = _folds(model, torch.randn(4, 3, 8, 8, dtype=torch.float64), 3)
    assert "folded 1 (BatchNorm2d) into 0" in lines and "folded 8 (BatchNorm1d) into 7" in lines
    kinds = [type(m).__name__ for m in folded]
    assert kinds.count("Identity") == 3 and "BatchNorm2d" not in kinds


def test_a_resnet_like_model_folds_all_six_in_its_own_module_tree():
    model = trained_statistics(ResNetLike().double(), (8, 3, 8, 8))
    folded, _ = _folds(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), 6)
    assert type(folded) is ResNetLike and type(folded).forward is ResNetLike.forward
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in model.named_modules()]


def test_without_an_example_only_sequentials_fold_and_the_rest_say_why():
    model = trained_statistics(ResNetLike().double(), (8, 3, 8, 8))
    lines = []
    fold_batchnorm(model, log=lines.append)
    assert "folded stem.1 (BatchNorm2d) into stem.0" in lines
    assert any(
        line.startswith("left layer1.bn1 (BatchNorm2d): not in a Sequential") for line in lines
    )
    assert len(lines) == 6


def test_conv_folding_matches_torchs_own_fusion():
    conv = trained_statistics(conv_net(), (16, 3, 8, 8))
    folded = fold_batchnorm(conv, torch.randn(2, 3, 8, 8, dtype=torch.float64), log=lambda _: None)
    expected = torch.nn.utils.fusion.fuse_conv_bn_eval(conv[3], _torch_batchnorm(conv[4]))
    torch.testing.assert_close(folded[3].weight, expected.weight)
    torch.testing.assert_close(folded[3].bias, expected.bias)


def _torch_batchnorm(ours: nn.Module) -> nn.Module:
    theirs = nn.BatchNorm2d(ours.num_features, dtype=ours.weight.dtype).eval()
    theirs.load_state_dict(ours.state_dict())
    return theirs


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(6, 5), (10, 6)),
        (nn.Conv1d(6, 4, 3, stride=2, dilation=2), (3, 6, 11)),
        (nn.Conv2d(6, 4, 3, groups=2), (3, 6, 7, 7)),
        (nn.Conv2d(6, 4, 3, padding=1, padding_mode="replicate"), (3, 6, 7, 7)),
        (nn.Conv3d(6, 2, 2), (2, 6, 3, 4, 4)),
    ],
    ids=["linear", "conv1d-strided-dilated", "conv2d-grouped", "conv2d-replicate-padded", "conv3d"],
)
def test_a_batchnorm_before_a_layer_folds_into_it_exactly(layer, shape):
    batchnorm = {2: nl.BatchNorm1d, 3: nl.BatchNorm1d, 4: nl.BatchNorm2d, 5: nl.BatchNorm3d}
    model = nn.Sequential(batchnorm[len(shape)](6), layer).double()
    model = trained_statistics(model, shape)
    folded, _ = _folds(model, torch.randn(*shape, dtype=torch.float64), 1)
    assert isinstance(folded[0], nn.Identity)


def test_what_cannot_fold_is_left_with_the_reason():
    zero_padded = nn.Sequential(nl.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)).double()
    model = trained_statistics(zero_padded, (4, 3, 5, 5))
    _, lines = _folds(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), 0)
    assert lines == [
        "left 0 (BatchNorm2d): its input is not a layer's output; 1 after it: it pads with "
        "zeros, which the BatchNorm's shift would not reach"
    ]
    untracked = nn.Sequential(nn.Linear(3, 4), nl.BatchNorm1d(4, track_running_stats=False))
    _, lines = _folds(untracked.eval(), torch.randn(5, 3), 0)
    assert "no running statistics" in lines[0]
    with pytest.raises(ValueError, match=r"fold_batchnorm left 1 \(BatchNorm1d\): .*no running"):
        fold_batchnorm(untracked, torch.randn(5, 3), strict=True)


class _Shared(nn.Module):
    """One Linear called twice: folding a BatchNorm into it would change both calls."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.linear(self.norm(self.linear(x)))


class _Untraceable(nn.Module):
    """Control flow on the input: torch.fx cannot trace it. One BatchNorm in a Sequential, one
    outside."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.body(x)) if x.sum() > -1e9 else x


def test_a_shared_layer_is_not_folded_into_and_an_untraceable_model_folds_all():
    shared = trained_statistics(_Shared(), (16, 4))
    _, lines = _folds(shared, torch.randn(5, 4), 0, tol=1e-6)
    assert lines == ["left norm (BatchNorm1d): linear is called 2 times; linear is called 2 times"]
    untraceable = trained_statistics(_Untraceable(), (16, 4))
    folded, lines = _folds(untraceable, torch.randn(5, 4), 1, tol=1e-6)
    assert lines == [
        "folded body.1 (BatchNorm1d) into body.0",
        "left norm (BatchNorm1d): body.1 before it: not a Linear or a convolution",
    ]
    assert isinstance(folded, _Untraceable)


def test_a_forward_pass_that_fails_is_one_line_and_each_unchecked_pair_is_named():
    model = trained_statistics(_Untraceable(), (16, 4))
    lines = []
    folded = fold_batchnorm(model, torch.randn(5, 3), log=lines.append)  # 3 features, not 4
    assert len(lines) == 3
    assert lines[0].startswith("the forward pass on the example failed (RuntimeError: ")
    assert lines[0].endswith("); pairs in Sequentials") and "\n" not in lines[0]
    assert lines[1:] == [
        "folded body.1 (BatchNorm1d) into body.0",  # a Sequential needs no forward pass
        "left norm (BatchNorm1d): not in a Sequential; its neighbours could not be checked, "
        "as the forward pass failed",
    ]
    x = torch.randn(5, 4)
    torch.testing.assert_close(folded(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"left norm .*could not be checked"):
        fold_batchnorm(model, torch.randn(5, 3), strict=True)
    lines = []
    fold_batchnorm(model, log=lines.append)  # no example: say how to find the pair
    assert lines[-1] == (
        "left norm (BatchNorm1d): not in a Sequential; give an example batch to find its neighbours"
    )
