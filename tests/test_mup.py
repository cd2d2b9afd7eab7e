"""μP for normlab's model (--param mup): the table's rates and decays, the readout, what it
refuses, and the coord check that tells it from the standard parametrization."""

import json

import pytest
import torch

from normlab.lm.checkpoint import load_checkpoint
from normlab.lm.cli import main
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.model import LanguageModel, Readout
from normlab.lm.optim import make_optimizer, set_learning_rate


def _model(width, base, **overrides):
    config = ModelConfig(n_hidden=width, param="mup", base_width=base, **overrides)
    return LanguageModel(config, torch.Generator().manual_seed(0), verbose=False)


def _rates(model, optimizer_name):
    cfg = TrainConfig(optimizer=optimizer_name, lr=0.01, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    set_learning_rate(optimizer, 0.01)  # as each step sets it
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {
        n: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"])
        for n, p in model.named_parameters()
    }


def test_adamw_divides_the_hidden_matrices_rate_by_the_width_multiplier():
    rates = _rates(_model(256, 64), "adamw")  # m = 4
    assert rates["blocks.1.0.weight"] == (pytest.approx(0.0025), pytest.approx(0.4))  # hidden
    assert rates["blocks.0.0.weight"] == (pytest.approx(0.01), pytest.approx(0.1))  # input-like
    assert rates["head.0.weight"] == (pytest.approx(0.01), pytest.approx(0.1))  # output-like
    assert rates["blocks.0.1.weight"] == (pytest.approx(0.01), 0.0)  # a norm's gain
    assert rates["embedding.weight"] == (pytest.approx(0.01), pytest.approx(0.1))


def test_sgd_multiplies_the_vector_like_rates_by_the_width_multiplier():
    rates = _rates(_model(256, 64), "sgd")
    assert rates["blocks.1.0.weight"][0] == pytest.approx(0.01)  # hidden: unchanged
    for name in ("blocks.0.0.weight", "head.0.weight", "blocks.0.1.weight", "head.0.bias"):
        assert rates[name][0] == pytest.approx(0.04), name
    assert rates["embedding.weight"][0] == pytest.approx(0.01)


def test_the_readout_starts_at_zero_and_multiplies_its_input_by_one_over_m():
    model = _model(256, 64)
    (readout,) = [m for m in model.modules() if isinstance(m, Readout)]
    assert readout.multiplier == 0.25 and torch.count_nonzero(readout.weight) == 0
    x = torch.randn(5, 256)
    with torch.no_grad():
        readout.weight.normal_()
        expected = torch.nn.functional.linear(x / 4, readout.weight, readout.bias)
        torch.testing.assert_close(readout(x), expected)
    # at its base width, μP's rates and decays are the standard ones
    standard = LanguageModel(ModelConfig(n_hidden=64), verbose=False)
    assert _rates(_model(64, 64), "adamw") == _rates(standard, "adamw")


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--output-bn"], "--output-bn"),
        (["--init", "lsuv"], "--init lsuv"),
        (["--arch", "wavenet", "--block-size", "8", "--n-layer", "3"], "--arch wavenet"),
        (["--base-width", "512", "--n-hidden", "256"], "--base-width (512) is larger"),
    ],
)
def test_what_mup_does_not_cover_is_refused_naming_it(capsys, tmp_path, flags, names):
    code = main(["train", "--param", "mup", *flags, "--steps", "1", "--out", str(tmp_path / "r")])
    assert code == 2 and names in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_run_stores_its_parametrization_and_resumes_only_under_it(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    flags = ["--param", "mup", "--base-width", "8", "--steps", "4"]
    assert main(["train", *tiny, *flags, "--out", str(out)]) == 0
    config = load_checkpoint(out)["model_config"]
    assert (config["param"], config["base_width"]) == ("mup", 8)
    code = main(["train", "--out", str(out), "--resume", "--param", "standard"])
    assert code == 2 and "drop --param" in capsys.readouterr().err


def test_the_coord_check_flags_the_standard_readout_and_passes_mup(capsys, names_file):
    common = ["coordcheck", "--data", str(names_file), "--widths", "32,64,128,256"]
    common += ["--check-steps", "3", "--seeds", "1", "--threads", "1", "--json"]
    assert main(common) == 0
    standard = json.loads(capsys.readouterr().out)
    assert "head.0" in standard["flagged"]  # AdamW's update of the logits grows with width
    assert main([*common, "--param", "mup"]) == 0
    mup = json.loads(capsys.readouterr().out)
    assert mup["flagged"] == {}
    assert set(mup["slopes"]) == set(standard["slopes"])
