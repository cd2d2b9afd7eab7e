"""Scaling along the depth (--residual-scale depth): each residual branch is multiplied by
1/√(2L), which keeps the residual sum's size, and so the logits', flat as blocks are added."""

import json
import math

import pytest
import torch
from torch import nn

from normlab.lm.cli import main
from normlab.lm.config import ModelConfig
from normlab.lm.model import LanguageModel


@pytest.mark.parametrize("n_layer", [3, 8])
def test_each_residual_branch_is_multiplied_by_one_over_sqrt_2l(n_layer):
    config = ModelConfig(n_layer=n_layer, n_hidden=32, residual=True, residual_scale="depth")
    model = LanguageModel(config, torch.Generator().manual_seed(0), verbose=False).eval()
    x = torch.randn(5, 32, dtype=torch.float64)
    model.double()
    residual = [block for block in model.blocks if block.residual]
    assert len(residual) == n_layer - 1  # the first block changes the width: no skip
    for block in residual:
        branch = nn.Sequential.forward(block, x)
        scale = 1 / math.sqrt(2 * n_layer)
        torch.testing.assert_close(block(x), x + scale * branch, rtol=0, atol=0)


def test_a_scale_without_residual_blocks_is_refused(capsys, tiny):
    assert main(["train", *tiny, "--residual-scale", "depth", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "add --residual" in err and err.count("\n") == 1


def _depth_check(flags, names_file, capsys) -> tuple[dict, list[float]]:
    """The coord check along depth of a residual BatchNorm net under SGD, and the logits'
    slope at each step."""
    args = ["coordcheck", "--data", str(names_file), "--depths", "2,4,8,16", "--n-hidden", "64"]
    args += ["--check-steps", "3", "--seeds", "1", "--threads", "1", "--json", "--residual"]
    args += ["--optimizer", "sgd", "--lr", "0.1", "--schedule", "step", *flags]
    assert main(args) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["depths"] == [2, 4, 8, 16]
    return check, check["slopes"]["head.0"]


def test_the_depth_coord_check_sees_the_residual_sum_grow_and_the_scale_hold_it(capsys, names_file):
    # L roughly independent BatchNorm'd branches of variance v add to L·v: the logits' size
    # grows as √L, a slope of 1/2; scaled, v·(1 + (L - 1)/(2L)) moves the slope by 0.04
    unscaled, slopes = _depth_check([], names_file, capsys)
    assert abs(slopes[0] - 0.5) < 0.15 and "head.0" in unscaled["flagged"]
    scaled, slopes = _depth_check(["--residual-scale", "depth"], names_file, capsys)
    assert abs(slopes[0]) < 0.1 and scaled["flagged"] == {}


def test_depths_and_n_layer_together_are_a_usage_error(capsys, names_file):
    args = ["coordcheck", "--data", str(names_file), "--depths", "2,4", "--n-layer", "3"]
    assert main(args) == 2
    assert "drop --n-layer" in capsys.readouterr().err
