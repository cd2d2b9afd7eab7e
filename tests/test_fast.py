"""The hand-written compiled step: the same training as autograd + torch.optim.SGD / AdamW."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from normlab import fast as fast_module
from normlab.config import ModelConfig, TrainConfig
from normlab.data import load_dataset
from normlab.distributed import SINGLE, Ranks
from normlab.fast import COVERS, FastStep, unsupported
from normlab.model import MLPLanguageModel
from normlab.optim import make_optimizer
from normlab.presets import PRESETS

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


# AdamW's first steps move every weight by about ±lr whatever the size of its gradient, so
# float32 rounding grows: with ReLU, nudging every initial weight by one ulp moves autograd's
# own loss by 5e-5 within 10 steps and 4.5e-3 within 30 (and a ReLU that flips near 0 adds
# its own). In float32 the AdamW losses are compared over the first 10 steps, to 1e-3; the
# float64 test below holds AdamW, weights, moments and all, to 1e-9 over 20 steps.


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
@pytest.mark.parametrize("optimizer_name, lr", [("sgd", 0.1), ("adamw", 0.01)])
def test_the_step_by_hand_equals_autograd_and_the_optimizer(
    names, overrides, weight_decay, optimizer_name, lr
):
    reference, model = _models(names, **overrides)
    cfg = TrainConfig(optimizer=optimizer_name, lr=lr, weight_decay=weight_decay)
    optimizer, own_optimizer = make_optimizer(reference, cfg), make_optimizer(model, cfg)
    step = FastStep(model, own_optimizer, compile=False)
    checked, tol = (30, 1e-5) if optimizer_name == "sgd" else (10, 1e-3)
    for i, (x, y) in enumerate(_batches(names, 30, block_size=model.config.block_size)):
        _, loss = reference(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        fast_loss = step(x, y, lr).item()
        if i < checked:
            assert fast_loss == pytest.approx(loss.item(), abs=tol)
    if optimizer_name == "sgd":
        expected = reference.state_dict()
        for name, value in model.state_dict().items():  # weights, running statistics, counts
            torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    # the moments live in the optimizer's own state, in torch's format: checkpoints load either way
    theirs, ours = optimizer.state_dict(), own_optimizer.state_dict()
    assert theirs["param_groups"] == ours["param_groups"]
    assert theirs["state"].keys() == ours["state"].keys()
    for i, state in theirs["state"].items():
        assert state.keys() == ours["state"][i].keys()
        for key, value in state.items():
            mine = ours["state"][i][key]
            assert (mine.shape, mine.dtype, mine.device) == (value.shape, value.dtype, value.device)
        assert torch.equal(ours["state"][i]["step"], state["step"])


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_the_step_by_hand_is_the_same_arithmetic_in_float64(names, optimizer_name, nonlinearity):
    reference, model = (
        m.double() for m in _models(names, residual=True, block_size=10, nonlinearity=nonlinearity)
    )
    cfg = TrainConfig(optimizer=optimizer_name, lr=0.01, weight_decay=0.1)
    optimizer = make_optimizer(reference, cfg)
    step_optimizer = make_optimizer(model, cfg)
    step = FastStep(model, step_optimizer, compile=False)
    for x, y in _batches(names, 20, block_size=10):
        _, loss = reference(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert step(x, y, 0.01).item() == pytest.approx(loss.item(), abs=1e-12)
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-9, rtol=1e-9, msg=name)
    theirs, ours = optimizer.state_dict()["state"], step_optimizer.state_dict()["state"]
    for i, state in theirs.items():  # AdamW's moments
        for key, value in state.items():
            torch.testing.assert_close(ours[i][key], value, atol=1e-9, rtol=1e-9, msg=key)


def test_what_it_does_not_cover_is_named():
    model, train = ModelConfig(**LECTURE_DEEP), TrainConfig()
    assert unsupported(model, train, SINGLE) is None
    assert unsupported(model, TrainConfig(optimizer="adamw"), SINGLE) is None
    assert unsupported(ModelConfig(norm="layer"), train, SINGLE) == "norm layer"
    assert unsupported(ModelConfig(dropout=0.1), train, SINGLE) == "dropout 0.1"
    assert unsupported(model, train, Ranks(0, 2)) == "several processes"


def test_the_coverage_table_names_every_config_field():
    # a new config field must be placed: covered for any value, or for some values only
    every_field = {f.name for config in (ModelConfig, TrainConfig) for f in fields(config)}
    assert set(COVERS) == every_field
    for name, values in COVERS.items():
        if values is not None:  # the covered values are valid ones
            assert values, name


def test_a_failed_compile_is_one_line_and_the_same_step_uncompiled(names, monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(fast_module.torch, "compile", broken_compile)
    a, b = _models(names)
    sgd = TrainConfig(optimizer="sgd")
    broken = FastStep(a, make_optimizer(a, sgd))
    eager = FastStep(b, make_optimizer(b, sgd), compile=False)
    for x, y in _batches(names, 3):
        assert torch.equal(broken(x, y, 0.1), eager(x, y, 0.1))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "normlab: torch.compile failed (no C++ compiler found); the step runs uncompiled"
    ]


def _train(tmp_path, name, *flags, preset="lecture-deep"):
    out = tmp_path / name
    command = [sys.executable, "-m", "normlab", "train", "--preset", preset]
    command += ["--steps", "100", "--eval-every", "100", "--threads", "1", "--device", "cpu"]
    result = subprocess.run(
        [*command, "--out", str(out), *flags], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, tol, weight_tol",
    # SGD; AdamW, whose float32 drift (see above) moves a weight by up to a few lr = 3e-3
    [("lecture-deep", 1e-4, 1e-4), ("default", 1e-3, 1e-2)],
)
def test_compiled_training_matches_eager_training_over_100_steps(tmp_path, preset, tol, weight_tol):
    eager, _ = _train(tmp_path, "eager", preset=preset)
    compiled, stdout = _train(tmp_path, "compiled", "--compile", preset=preset)
    assert "does not cover" not in stdout and "failed" not in stdout
    for log in ("metrics.jsonl",):
        a, b = (json.loads((d / log).read_text().splitlines()[-1]) for d in (eager, compiled))
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=tol)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=tol)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (eager, compiled))
    for name, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][name], value, atol=weight_tol, rtol=tol, msg=name)
    state_a, state_b = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()  # AdamW's moments, saved from the compiled step
    for i, state in state_a.items():
        assert torch.equal(state_b[i]["step"], state["step"])


def test_compile_says_what_it_does_not_cover_and_trains_anyway(tmp_path):
    _, stdout = _train(tmp_path, "dropout", "--compile", "--dropout", "0.1")
    assert "--compile does not cover dropout 0.1; training with autograd" in stdout


def test_a_compiled_step_that_fails_after_updating_is_not_applied_twice(names, monkeypatch, capsys):
    def updates_then_fails(fn, **kwargs):
        def compiled(*args):
            fn(*args)  # the whole step, its in-place updates included
            raise RuntimeError("the compiled kernel failed at run time")

        return compiled

    monkeypatch.setattr(fast_module.torch, "compile", updates_then_fails)
    a, b = _models(names)
    adamw = TrainConfig(optimizer="adamw", lr=0.01)
    failing = FastStep(a, make_optimizer(a, adamw))
    eager = FastStep(b, make_optimizer(b, adamw), compile=False)
    for x, y in _batches(names, 3):
        assert torch.equal(failing(x, y, 0.01), eager(x, y, 0.01))
    for name, value in b.state_dict().items():  # weights, running statistics, counts
        assert torch.equal(a.state_dict()[name], value), name
    assert (
        "torch.compile failed (the compiled kernel failed at run time)" in capsys.readouterr().out
    )
