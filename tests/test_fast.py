"""The hand-written compiled step: the same training as autograd + torch.optim.SGD."""

import json
import subprocess
import sys

import pytest
import torch

from normlab import fast as fast_module
from normlab.data import load_dataset
from normlab.fast import FastStep, unsupported
from normlab.model import MLPLanguageModel, ModelConfig
from normlab.presets import PRESETS
from normlab.train import TrainConfig, make_optimizer

LECTURE_DEEP = PRESETS["lecture-deep"]["model"]


@pytest.fixture(scope="module")
def names():
    return load_dataset(None, 3)


def _models(names, **overrides):
    config = ModelConfig(**{**LECTURE_DEEP, **overrides}, vocab_size=names.vocab.size)
    return (MLPLanguageModel(config, torch.Generator().manual_seed(0), verbose=False) for _ in "ab")


def _batches(names, n, batch_size=32, block_size=3):
    X, Y = (
        names.splits["train"] if block_size == 3 else load_dataset(None, block_size).splits["train"]
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ix = torch.randint(0, len(X), (batch_size,), generator=g)
        yield X[ix], Y[ix]


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # lecture-deep: BatchNorm everywhere, output BatchNorm
        {"norm": "none", "output_bn": False},  # biases, no BatchNorm
        {"nonlinearity": "relu"},
        {"block_size": 10, "residual": True},  # 10 × 10 = 100: every block residual
        {"norm": "none", "bias": False, "output_bn": False},
        {"init": "lecture", "norm": "none", "output_bn": False, "n_layer": 1},  # random biases
    ],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_step_by_hand_equals_autograd_and_sgd(names, overrides, weight_decay):
    reference, model = _models(names, **overrides)
    optimizer = make_optimizer(reference, TrainConfig(optimizer="sgd", weight_decay=weight_decay))
    step = FastStep(model, weight_decay, compile=False)
    for x, y in _batches(names, 30, block_size=model.config.block_size):
        _, loss = reference(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert step(x, y, 0.1).item() == pytest.approx(loss.item(), abs=1e-5)
    expected = reference.state_dict()
    for name, value in model.state_dict().items():  # weights, running statistics, counts
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_what_it_does_not_cover_is_named(names):
    model, _ = _models(names)
    assert unsupported(model, "sgd") is None
    assert "adamw" in unsupported(model, "adamw")
    layer_norm, _ = _models(names, norm="layer")
    assert "layer" in unsupported(layer_norm, "sgd")
    dropout, _ = _models(names, dropout=0.1)
    assert "dropout" in unsupported(dropout, "sgd")


def test_a_failed_compile_is_one_line_and_the_same_step_uncompiled(names, monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(fast_module.torch, "compile", broken_compile)
    a, b = _models(names)
    broken, eager = FastStep(a), FastStep(b, compile=False)
    for x, y in _batches(names, 3):
        assert torch.equal(broken(x, y, 0.1), eager(x, y, 0.1))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "normlab: torch.compile failed (no C++ compiler found); the step runs uncompiled"
    ]


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    command = [sys.executable, "-m", "normlab", "train", "--preset", "lecture-deep"]
    command += ["--steps", "100", "--eval-every", "100", "--threads", "1", "--device", "cpu"]
    result = subprocess.run(
        [*command, "--out", str(out), *flags], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.mark.slow
def test_compiled_training_matches_eager_training_over_100_steps(tmp_path):
    eager, _ = _train(tmp_path, "eager")
    compiled, _ = _train(tmp_path, "compiled", "--compile")
    for log in ("metrics.jsonl",):
        a, b = (json.loads((d / log).read_text().splitlines()[-1]) for d in (eager, compiled))
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (eager, compiled))
    for name, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][name], value, atol=1e-4, rtol=1e-4, msg=name)


def test_compile_says_what_it_does_not_cover_and_trains_anyway(tmp_path):
    _, stdout = _train(tmp_path, "adamw", "--compile", "--optimizer", "adamw", "--lr", "0.01")
    assert "--compile does not cover optimizer adamw" in stdout
