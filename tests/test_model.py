import copy
import math

import pytest
import torch

from normlab import nn as nl
from normlab.calibrate import calibrate_batchnorm
from normlab.errors import ConfigError
from normlab.fold import fold_batchnorm
from normlab.lm.config import ModelConfig
from normlab.lm.model import LanguageModel
from normlab.lm.presets import PRESETS

# the shape of the lecture's deep net, which these tests build on unless they say otherwise
LECTURE_SHAPE = dict(block_size=3, n_embd=10, n_hidden=100, n_layer=5)


def _model(**kw):
    config = ModelConfig(**{**LECTURE_SHAPE, **kw})
    return LanguageModel(config, torch.Generator().manual_seed(0), verbose=False)


def _batch(n=256, vocab=27, block=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, block), generator=g), torch.randint(
        0, vocab, (n,), generator=g
    )


@pytest.mark.parametrize("preset,params", [("lecture-mlp", 12_097), ("lecture-deep", 47_024)])
def test_lecture_presets_have_the_lectures_parameter_counts(preset, params, capsys):
    model = LanguageModel(ModelConfig(**PRESETS[preset]["model"]))
    assert model.num_params() == params
    assert f"{params:,} parameters" in capsys.readouterr().out


def test_lecture_deep_layout():
    model = _model(**PRESETS["lecture-deep"]["model"])
    assert len(model.blocks) == 5
    for block in model.blocks:
        linear, norm, act = block
        assert isinstance(linear, nl.Linear) and linear.bias is None
        assert isinstance(norm, nl.BatchNorm1d) and isinstance(act, nl.Tanh)
    assert model.head[0].bias is None and isinstance(model.head[1], nl.BatchNorm1d)
    torch.testing.assert_close(model.head[1].weight, torch.full((27,), 0.1))


def test_forward_shapes_and_loss():
    model = _model(block_size=3)
    X, Y = _batch()
    logits, loss = model(X, Y)
    assert logits.shape == (256, 27) and loss.shape == ()
    logits2, none = model(X)
    assert none is None and torch.equal(logits, logits2)


@pytest.mark.parametrize("norm", ["batch", "layer", "group", "none"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_kaiming_starts_near_uniform_loss(norm, nonlinearity):
    model = _model(norm=norm, nonlinearity=nonlinearity, n_layer=4, n_hidden=64)
    _, loss = model(*_batch(1024))
    assert abs(loss.item() - math.log(27)) < 0.1


def test_naive_init_is_confidently_wrong_and_lecture_init_fixes_it():
    X, Y = _batch(1024)
    naive = _model(init="naive", norm="none", n_layer=1, n_hidden=200)
    lecture = _model(init="lecture", norm="none", n_layer=1, n_hidden=200)
    assert naive(X, Y)[1].item() > 15  # the lecture's first version starts near 27
    assert abs(lecture(X, Y)[1].item() - math.log(27)) < 0.1
    h = lecture.blocks[0][0](lecture.flatten(lecture.embedding(X)))
    h_naive = naive.blocks[0][0](naive.flatten(naive.embedding(X)))
    saturated = lambda h: (torch.tanh(h).abs() > 0.97).float().mean().item()  # noqa: E731
    assert saturated(h) < 0.3 < saturated(h_naive)


def test_bias_before_batchnorm_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="cancels it"):
        _model(norm="batch", bias=True)
    assert _model(norm="none").blocks[0][0].bias is not None
    assert _model(norm="layer").blocks[0][0].bias is not None
    assert _model(norm="none", bias=False).blocks[0][0].bias is None


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"norm": "weight"}, "valid choices: batch, layer, group, none"),
        ({"init": "xavier"}, "valid choices: naive, lecture, kaiming"),
        ({"nonlinearity": "gelu"}, "valid choices: tanh, relu"),
        ({"norm": "group", "n_hidden": 10, "n_groups": 4}, "divisible"),
        ({"n_hidden": 0}, "at least 1"),
    ],
)
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        _model(**kw)


def test_residual_blocks_skip_only_where_widths_match():
    model = _model(residual=True, n_layer=3, n_hidden=30, block_size=3, n_embd=10)
    assert all(block.residual for block in model.blocks)  # 3 * 10 == 30
    model = _model(residual=True, n_layer=3, n_hidden=64)
    assert [b.residual for b in model.blocks] == [False, True, True]
    X, _ = _batch(8)
    x = model.flatten(model.embedding(X))
    h = model.blocks[0](x)
    torch.testing.assert_close(model.blocks[1](h), h + torch.nn.Sequential(*model.blocks[1])(h))


def test_same_generator_seed_same_weights():
    a, b = _model(), _model()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_model_folds_and_calibrates():
    model = _model(**PRESETS["lecture-deep"]["model"])
    X, Y = _batch(512)
    for _ in range(3):
        model(X, Y)[1].backward()
    model.eval()
    folded = fold_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(X)[0], model(X)[0], atol=1e-5, rtol=1e-5)
    calibrated = copy.deepcopy(model)
    calibrate_batchnorm(calibrated, X)
    with torch.no_grad():
        full_batch = copy.deepcopy(model).train()(X)[0]
        torch.testing.assert_close(calibrated(X)[0], full_batch, atol=1e-4, rtol=1e-4)


def test_eval_mode_single_example_equals_batched():
    model = _model(**PRESETS["lecture-deep"]["model"])
    X, Y = _batch(64)
    model(X, Y)
    model.eval()
    with torch.no_grad():
        batched = model(X[:5])[0]
        for i in range(5):
            torch.testing.assert_close(model(X[i : i + 1])[0], batched[i : i + 1])


def test_dropout_only_in_training_mode():
    model = _model(dropout=0.5, n_layer=2, n_hidden=64, norm="layer")
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2
    X, _ = _batch(16)
    assert not torch.equal(model(X)[0], model(X)[0])  # training: a new mask each pass
    model.eval()
    assert torch.equal(model(X)[0], model(X)[0])
    with pytest.raises(ConfigError, match="dropout"):
        _model(dropout=1.0)


def test_embedding_dropout_noises_the_context_in_training_only():
    model = _model(embed_dropout=0.5, n_layer=1, n_hidden=64, norm="layer")
    plain = _model(n_layer=1, n_hidden=64, norm="layer")
    X, _ = _batch(16)
    assert not torch.equal(model(X)[0], model(X)[0])
    model.eval()
    assert torch.equal(model(X)[0], plain(X)[0])  # the same weights; eval: no dropout
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged
    with pytest.raises(ConfigError, match="embed_dropout"):
        _model(embed_dropout=-0.1)


def test_lecture_init_with_an_output_batchnorm():
    model = _model(**{**PRESETS["lecture-deep"]["model"], "init": "lecture"})
    torch.testing.assert_close(model.head[1].weight, torch.full((27,), 0.1))
    assert abs(model(*_batch(1024))[1].item() - math.log(27)) < 0.2


def test_kaiming_gain_sets_the_hidden_weights_std():
    for gain in (1.0, 5 / 3):
        model = _model(init="kaiming", gain=gain, n_layer=3, n_hidden=400, norm="none")
        w = model.blocks[1][0].weight  # (400, 400)
        assert w.std().item() == pytest.approx(gain / math.sqrt(400), rel=0.02)
    with pytest.raises(ConfigError, match="gain scales the weights of init kaiming"):
        _model(init="naive", gain=1.0)
    with pytest.raises(ConfigError, match="gain"):
        _model(init="kaiming", gain=0.0)
