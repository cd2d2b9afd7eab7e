"""--arch wavenet (makemore part 5): its shapes, its BatchNorm over (B, T) against torch's,
the lecture's bug, the presets' sizes, and the model through train, export and sample."""

import json

import pytest
import torch

from normlab import nn as nl
from normlab.errors import ConfigError
from normlab.lm.cli import main
from normlab.lm.config import ModelConfig, preset_configs
from normlab.lm.experiments import wavenet
from normlab.lm.model import LanguageModel

DTYPES = [torch.float32, torch.float64]


def _wavenet(**kw):
    config = ModelConfig(**{"arch": "wavenet", "block_size": 8, "n_layer": 3, **kw})
    return LanguageModel(config, torch.Generator().manual_seed(0), verbose=False)


def _contexts(n=64, block=8, seed=0):
    return torch.randint(0, 27, (n, block), generator=torch.Generator().manual_seed(seed))


def test_flatten_consecutive_fuses_neighbouring_positions():
    x = torch.arange(2 * 4 * 3).view(2, 4, 3)  # (B, T, C)
    y = nl.FlattenConsecutive(2)(x)  # (B, 2, 6): positions (0, 1) and (2, 3)
    assert torch.equal(y[:, 0], torch.cat([x[:, 0], x[:, 1]], dim=1))
    assert torch.equal(y[:, 1], torch.cat([x[:, 2], x[:, 3]], dim=1))
    assert nl.FlattenConsecutive(4)(x).shape == (2, 12)  # one position left: squeezed
    with pytest.raises(ValueError, match="multiples of 3"):
        nl.FlattenConsecutive(3)(x)


def test_each_level_halves_the_positions():
    model = _wavenet(n_embd=10, n_hidden=16)
    x = model.embedding(_contexts())  # (64, 8, 10)
    shapes = []
    for block in model.blocks:
        x = block(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(64, 4, 16), (64, 2, 16), (64, 16)]
    logits, loss = model(_contexts(), torch.zeros(64, dtype=torch.long))
    assert logits.shape == (64, 27) and loss.shape == ()


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_normalizes_over_batch_and_positions_as_torchs(dtype):
    bn = _wavenet(n_embd=6, n_hidden=12).blocks[0][2].to(dtype)  # after the first Linear
    theirs = torch.nn.BatchNorm1d(12, dtype=dtype)  # normalizes (N, C, L) over (N, L)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        theirs.load_state_dict(bn.state_dict())
    x = (torch.randn(32, 4, 12, dtype=dtype) * 3 + 1).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    w = torch.randn(32, 4, 12, dtype=dtype)
    for _ in range(2):  # the running statistics move twice
        y = bn(x)
        y_theirs = theirs(x_theirs.transpose(1, 2)).transpose(1, 2)
    (w * y).sum().backward()
    (w * y_theirs).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    torch.testing.assert_close(y, y_theirs, **tol)
    torch.testing.assert_close(x.grad, x_theirs.grad, **tol)
    torch.testing.assert_close(bn.weight.grad, theirs.weight.grad, **tol)
    torch.testing.assert_close(bn.running_mean, theirs.running_mean, **tol)
    torch.testing.assert_close(bn.running_var, theirs.running_var, **tol)
    bn.eval(), theirs.eval()
    torch.testing.assert_close(bn(x), theirs(x.transpose(1, 2)).transpose(1, 2), **tol)


def test_the_lectures_bug_keeps_a_statistic_per_position():
    fixed = _wavenet(n_embd=6, n_hidden=12)
    buggy = _wavenet(n_embd=6, n_hidden=12, bn_over_positions=False)
    x = torch.randn(32, 4, 12) + torch.arange(4.0).view(1, 4, 1)  # each position its own mean
    y_buggy = buggy.blocks[0][2](x)
    torch.testing.assert_close(y_buggy.mean(0), torch.zeros(4, 12), atol=1e-5, rtol=0)
    y_fixed = fixed.blocks[0][2](x)
    torch.testing.assert_close(y_fixed.mean((0, 1)), torch.zeros(12), atol=1e-5, rtol=0)
    assert y_fixed.mean(0)[0].mean() < -0.5  # over the positions, position 0 sits below
    assert buggy.num_params() - fixed.num_params() == 2 * 12 * (4 - 1 + 2 - 1)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"block_size": 6}, "block_size must be 2 \\*\\* n_layer"),
        ({"n_layer": 0, "block_size": 1}, "block_size must be 2 \\*\\* n_layer"),
        ({"norm": "group"}, "not group"),
        ({"residual": True}, "drop --residual"),
    ],
)
def test_configs_wavenet_cannot_build_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        _wavenet(**kw)


def test_presets_have_their_parameter_counts():
    lecture = LanguageModel(preset_configs("lecture-wavenet")[0], verbose=False)
    assert lecture.num_params() == 76_579  # makemore part 5's scaled-up model
    compact = LanguageModel(preset_configs("compact")[0], verbose=False)
    assert compact.num_params() <= 76_579
    counts = {}
    for name, config in wavenet.ROWS.items():
        counts[name] = LanguageModel(config, verbose=False).num_params()
    assert counts == {  # the lecture's 22K rows: flat, then hierarchical (+ the bug's gains)
        "context 8": 22_097,
        "hierarchical": 22_397 + 544,
        "batchnorm fix": 22_397,
        "scaled up": 76_579,
    }


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


WAVENET = ["--arch", "wavenet", "--block-size", "4", "--n-layer", "2"]


def test_trains_samples_and_exports_through_the_cli(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", *tiny, *WAVENET, "--steps", 20, "--compile",
                            "--out", out)  # fmt: skip
    assert code == 0, err
    assert "does not cover" not in stdout + err and "failed" not in stdout + err
    code, stdout, err = run(capsys, "sample", "--run", out, "--n", 5, "--seed", 1)
    assert code == 0 and len(stdout.splitlines()) == 5 + 1, err  # 5 names and a count


def test_a_bad_wavenet_flag_is_one_line_and_exit_2(capsys, tiny):
    code, _, err = run(capsys, "train", *tiny, "--arch", "wavenet", "--block-size", "5")
    assert code == 2
    assert err.count("\n") == 1 and "block_size must be 2 ** n_layer" in err


def test_experiment_wavenet_quick(capsys, tmp_path):
    out = tmp_path / "wavenet"
    code, stdout, err = run(capsys, "experiment", "wavenet", "--quick", "--out", out,
                            "--threads", "1", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["row"] for r in rows] == list(wavenet.LECTURE)
    assert [r["params"] for r in rows] == [22_097, 22_941, 22_397, 76_579]
    for r in rows:  # 1,000 steps: below the uniform start, not yet the lecture's
        assert 2.0 < r["val_loss"] < 2.6 and abs(r["calibrated_val_loss"] - r["val_loss"]) < 0.05
    assert "val within ±0.03 of the lecture" in stdout
    assert (out / "wavenet.png").stat().st_size > 1000
