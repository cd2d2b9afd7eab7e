"""LSUV: the variance it reaches, what it skips, its cap, and that it is deterministic."""

import pytest
import torch
from torch import nn

from normlab.lm.config import ModelConfig
from normlab.lm.model import LanguageModel
from normlab.lsuv import activation_variance, lsuv_


def _model(**kw):
    config = ModelConfig(init="lsuv", block_size=3, n_embd=10, n_layer=6, n_hidden=64, **kw)
    return LanguageModel(config, torch.Generator().manual_seed(0), verbose=False)


def _hidden(model):
    return [block[0] for block in model.blocks]


def _lsuv(model, x, **kwargs):
    """LSUV on the hidden Linears, as --init lsuv runs it."""
    return lsuv_(model, x, layers=_hidden(model), **kwargs)


def _batch(n=512, seed=1):
    return torch.randint(0, 27, (n, 3), generator=torch.Generator().manual_seed(seed))


def _outputs(model, x, modules):
    """The output of each of ``modules`` in one training-mode pass."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, _i, o: seen.setdefault(m, o)) for m in modules]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [seen[m] for m in modules]


def test_activation_variance_matches_monte_carlo():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind, f in (("tanh", torch.tanh), ("relu", torch.relu), ("sigmoid", torch.sigmoid)):
        assert activation_variance(kind) == pytest.approx(f(z).var().item(), rel=3e-3)
    with pytest.raises(ValueError, match="valid choices"):
        activation_variance("gelu")


def test_each_tanh_layer_reaches_the_target_variance_within_tolerance():
    model, x = _model(norm="none"), _batch()
    report = _lsuv(model, x, generator=torch.Generator().manual_seed(2))
    target = activation_variance("tanh")
    assert [r.name for r in report] == [f"blocks.{i}.0" for i in range(6)]
    tanhs = [block[2] for block in model.blocks]
    for r, out in zip(report, _outputs(model, x, tanhs), strict=True):
        assert r.feeds == "tanh" and r.target == target
        assert abs(r.variance / target - 1) <= 0.02
        assert out.double().var(correction=0).item() == pytest.approx(r.variance, rel=1e-6)


def test_works_on_a_plain_torch_model_with_relu_and_a_bare_output():
    model = nn.Sequential(
        nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 5)
    )
    x = torch.randn(1000, 20, generator=torch.Generator().manual_seed(0)) * 7 + 3
    report = lsuv_(model, x, generator=torch.Generator().manual_seed(0))
    assert [r.feeds for r in report] == ["relu", "relu", "output"]
    assert report[0].target == pytest.approx(activation_variance("relu"))
    assert report[-1].target == 1.0
    assert all(abs(r.variance / r.target - 1) <= 0.02 for r in report)
    assert all(model[i].bias.abs().max() == 0 for i in (0, 2, 4))  # biases start at zero


def test_layers_that_feed_a_normalization_are_skipped_and_buffers_untouched():
    for norm in ("batch", "layer"):
        model = _model(norm=norm)
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        report = _lsuv(model, _batch(), generator=torch.Generator().manual_seed(0))
        assert all(r.target is None and r.iterations == 0 for r in report)
        assert {r.feeds for r in report} == {"batchnorm" if norm == "batch" else "layernorm"}
        for block in model.blocks:  # only the orthonormal start: W Wᵀ = I (rows ≤ columns)
            w = block[0].weight
            rows = min(w.shape)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(rows), atol=1e-5, rtol=0)
        for k, v in before.items():
            assert torch.equal(model.state_dict()[k], v)


def test_the_iteration_cap_is_respected():
    model = _model(norm="none")
    report = _lsuv(model, _batch())  # default cap
    assert all(r.iterations <= 10 for r in report)
    model = _model(norm="none")
    report = _lsuv(model, _batch(), tol=1e-12, max_iter=2)
    assert all(r.iterations == 2 for r in report)


def test_deterministic_and_leaves_the_global_rng_and_mode_alone():
    weights = []
    for _ in range(2):
        model = _model(norm="none", dropout=0.1)
        model.eval()
        state = torch.get_rng_state()
        _lsuv(model, _batch(), generator=torch.Generator().manual_seed(5))
        assert torch.equal(torch.get_rng_state(), state)
        assert not model.training
        weights.append([b[0].weight.clone() for b in model.blocks])
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)


def test_bad_arguments():
    model = _model(norm="none")
    with pytest.raises(ValueError, match="tol > 0"):
        lsuv_(model, _batch(), tol=0)
    with pytest.raises(ValueError, match="no Linear"):
        lsuv_(nn.Sequential(nn.Tanh()), torch.randn(4, 3))


def test_init_lsuv_from_the_command_line(capsys, tmp_path, tiny):
    import json

    from normlab.lm.cli import main

    assert main(["diagnose", *tiny, "--norm", "none", "--init", "lsuv", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout stays pure JSON
    tanhs = [x for x in report["snapshot"]["layers"] if x["kind"] == "tanh"]
    assert all(x["std"] ** 2 == pytest.approx(activation_variance("tanh"), rel=0.25) for x in tanhs)
    out = str(tmp_path / "run")
    assert (
        main(["train", *tiny, "--norm", "none", "--init", "lsuv", "--steps", "20", "--out", out])
        == 0
    )
    assert "lsuv: 2 of 2 hidden layers scaled" in capsys.readouterr().out
    assert main(["train", "--out", out, "--resume"]) == 0  # finished: LSUV does not run again
    assert "lsuv:" not in capsys.readouterr().out


def test_works_over_the_convolutions_of_a_conv_net_and_a_resnet():
    from models import ResNetLike

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    )  # fmt: skip
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    report = lsuv_(model, x, generator=torch.Generator().manual_seed(0))
    assert [(r.name, r.feeds) for r in report] == [("0", "relu"), ("2", "relu"), ("5", "output")]
    assert all(abs(r.variance / r.target - 1) <= 0.02 for r in report)
    # a ResNet: every conv feeds a BatchNorm (skipped); the classifier is scaled
    report = lsuv_(ResNetLike(), x, generator=torch.Generator().manual_seed(0))
    assert len(report) == 7 and [r.feeds for r in report].count("batchnorm") == 6
    assert report[-1].name == "fc" and report[-1].target == 1.0
