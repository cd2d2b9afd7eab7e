"""The compiled step: the same training as autograd + torch.optim.SGD / AdamW, on every model."""

import json
import subprocess
import sys

import pytest
import torch

from normlab.diagnostics import Diagnostics
from normlab.diagnostics.snapshot import snapshot_to_dict
from normlab.lm import compiled as compiled_module
from normlab.lm.cli import main
from normlab.lm.compiled import CompiledStep, compile_cache_dir
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.model import LanguageModel
from normlab.lm.optim import make_optimizer
from normlab.lm.presets import PRESETS
from normlab.lm.step import TrainStep

LECTURE_DEEP = PRESETS["lecture-deep"]["model"]


@pytest.fixture(scope="module")
def names():
    return load_dataset(None, 3)


def _models(names, **overrides):
    config = ModelConfig(**{**LECTURE_DEEP, **overrides}, vocab_size=names.vocab.size)
    return (LanguageModel(config, torch.Generator().manual_seed(0), verbose=False) for _ in "ab")


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


# every architecture option the CLI builds, on lecture-deep
ARCHITECTURES = [
    {},  # lecture-deep: BatchNorm everywhere, output BatchNorm
    {"norm": "none", "output_bn": False},  # biases, no BatchNorm
    {"nonlinearity": "relu"},
    {"block_size": 10, "residual": True},  # 10 × 10 = 100: every block residual
    {"norm": "none", "bias": False, "output_bn": False},
    {"init": "lecture", "norm": "none", "output_bn": False, "n_layer": 1},  # random biases
    {"norm": "layer", "dropout": 0.2, "embed_dropout": 0.1},
    {"norm": "group", "n_groups": 4, "nonlinearity": "relu"},
    {"arch": "wavenet", "block_size": 8, "n_layer": 3, "n_embd": 4},
]


@pytest.mark.parametrize("overrides", ARCHITECTURES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("optimizer_name, lr", [("sgd", 0.1), ("adamw", 0.01)])
def test_the_step_equals_autograd_and_the_optimizer(
    names, overrides, weight_decay, optimizer_name, lr
):
    reference, model = _models(names, **overrides)
    cfg = TrainConfig(optimizer=optimizer_name, lr=lr, weight_decay=weight_decay)
    optimizer, own_optimizer = make_optimizer(reference, cfg), make_optimizer(model, cfg)
    step = CompiledStep(model, own_optimizer, compile=False)
    checked, tol = (30, 1e-5) if optimizer_name == "sgd" else (10, 1e-3)
    for i, (x, y) in enumerate(_batches(names, 30, block_size=model.config.block_size)):
        rng = torch.get_rng_state()  # the same dropout masks on both sides
        _, loss = reference(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        torch.set_rng_state(rng)
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


def _assert_same_recording(a, b, path="snapshot"):
    """Two recordings' statistics (snapshot_to_dict) agree: values to float32 rounding, and
    histograms and shares beyond a threshold up to values that rounding moves across an edge.

    Rounding moves a value by far less than a bin's width (2% of the range), so it crosses
    at most one edge, and only from a bin beside that edge: at each edge the cumulative
    counts may differ by at most what the two bins beside it hold. How many do cross depends
    on the processor's summation order (gradients of about 1e-9 change sign at the edge at 0
    in a residual network), so no count tuned to one processor is assumed."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_recording(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and a and all(type(c) is int for c in a):  # histogram counts
        assert sum(a) == sum(b), path
        a, b = torch.tensor(a), torch.tensor(b)
        moved = (a.cumsum(0) - b.cumsum(0)).abs()[:-1]  # across each inner edge
        beside = torch.minimum(a[:-1] + a[1:], b[:-1] + b[1:])  # the two bins at that edge
        assert (moved <= beside).all(), path
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_recording(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.endswith((".saturated", ".dead")):
        # a share of values (units) beyond a threshold: rounding moves a value lying within
        # float32 rounding of it across, as it moves a histogram's (the compiled step's tanh
        # is inductor's, not ATen's); a handful of the thousands of values a layer has
        assert b == pytest.approx(a, abs=1e-3), path
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), path
    else:
        assert a == b, path


@pytest.mark.parametrize("overrides", ARCHITECTURES)
def test_a_recording_on_the_fast_path_measures_what_autograd_does(names, overrides):
    reference, model = _models(names, **overrides)
    cfg = TrainConfig(optimizer="sgd", lr=0.1)
    autograd = TrainStep(reference, make_optimizer(reference, cfg), batch_size=32, compile=False)
    optimizer = make_optimizer(model, cfg)
    fast = TrainStep(model, optimizer, batch_size=32)
    recorders = Diagnostics(reference), Diagnostics(model)
    for i, (x, y) in enumerate(_batches(names, 4, block_size=model.config.block_size)):
        rng = torch.get_rng_state()  # the same dropout masks on both sides
        if i % 2:  # a plain step between recordings: the compiled graph
            expected = autograd(x, y, 0.1).loss
            torch.set_rng_state(rng)
            torch.testing.assert_close(fast(x, y, 0.1).loss, expected, atol=1e-5, rtol=1e-5)
            continue
        expected = autograd(x, y, 0.1, recorders[0], i).snapshot
        torch.set_rng_state(rng)
        measured = fast(x, y, 0.1, recorders[1], i).snapshot
        _assert_same_recording(snapshot_to_dict(expected), snapshot_to_dict(measured))
        # every recording runs in the recording's own compiled graph, the first included,
        # but where the model draws dropout masks (compiled._draws_masks)
        draws_masks = overrides.get("dropout", 0) > 0 or overrides.get("embed_dropout", 0) > 0
        assert len(fast.core._forms) == (0 if draws_masks else 1)
    assert len(measured.layers) == len(recorders[1].layers)  # every layer, with its gradient
    assert all(layer.grad_std is not None for layer in measured.layers)
    assert fast.core.compile and fast.core._proven  # the plain steps' graph, no fallback
    assert fast.core.compile_recordings  # no recording graph failed
    assert all(p.grad is None for p in model.parameters())  # a recording sets no .grad
    assert not recorders[1].armed and not recorders[1]._handles  # no hook left attached


def test_a_recording_graph_that_fails_to_compile_is_one_line_and_recordings_run_untraced(
    names, monkeypatch, capsys
):
    def fails_for_recordings(graph, inputs, options):  # the plain step's graph runs as traced
        if any(
            node.target == torch.ops.normlab.output_summary.default for node in graph.graph.nodes
        ):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return graph

    monkeypatch.setattr(compiled_module, "inductor_compile", fails_for_recordings)
    reference, model = _models(names)
    cfg = TrainConfig(optimizer="sgd", lr=0.1)
    autograd = TrainStep(reference, make_optimizer(reference, cfg), batch_size=32, compile=False)
    fast = TrainStep(model, make_optimizer(model, cfg), batch_size=32)
    recorders = Diagnostics(reference), Diagnostics(model)
    for i, (x, y) in enumerate(_batches(names, 5)):
        recorded = i % 2 == 0  # recording 0 fails to compile, 2 and 4 run untraced
        expected = autograd(x, y, 0.1, recorders[0] if recorded else None, i)
        got = fast(x, y, 0.1, recorders[1] if recorded else None, i)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
        if recorded:
            _assert_same_recording(
                snapshot_to_dict(expected.snapshot), snapshot_to_dict(got.snapshot)
            )
    for name, value in reference.state_dict().items():  # the failed graph applied nothing
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-5, rtol=1e-5)
    assert fast.core.compile and not fast.core.compile_recordings and not fast.core._forms
    assert not recorders[1]._handles  # the failed trace's hooks detached
    assert capsys.readouterr().out.strip().splitlines() == [
        "normlab: compiling the recording step failed (no C++ compiler found); "
        "recordings run untraced"
    ]


def test_no_compiler_is_one_line_when_a_recording_comes_first(names, monkeypatch, capsys):
    """A run's step 0 records: its recording graph fails before any plain step has compiled,
    and the plain step's line, which says the step runs uncompiled, is the only one."""

    def no_compiler(graph, inputs, options):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled_module, "inductor_compile", no_compiler)
    model, _ = _models(names)
    step = TrainStep(model, make_optimizer(model, TrainConfig(optimizer="sgd")), batch_size=32)
    diagnostics = Diagnostics(model)
    for i, (x, y) in enumerate(_batches(names, 3)):
        step(x, y, 0.1, diagnostics if i == 0 else None, i)
    assert not step.core.compile and not step.core.compile_recordings
    assert capsys.readouterr().out.strip().splitlines() == [
        "normlab: compiling the step failed (no C++ compiler found); the step runs uncompiled"
    ]


def test_a_recording_runs_untraced_where_its_graph_would_not_hold_the_update_or_repay(names):
    """AdamW updates after the graph: its recordings run untraced, as do those of a step
    compiled off, and those of a run too short to repay a recording graph's compile."""
    sgd, adamw = TrainConfig(optimizer="sgd"), TrainConfig(optimizer="adamw", lr=0.01)
    for cfg, compile, recordings in ((adamw, True, True), (sgd, False, True), (sgd, True, False)):
        model, _ = _models(names)
        optimizer = make_optimizer(model, cfg)
        step = TrainStep(
            model, optimizer, batch_size=32, compile=compile, compile_recordings=recordings
        )
        diagnostics = Diagnostics(model)
        for i, (x, y) in enumerate(_batches(names, 3)):
            snapshot = step(x, y, 0.01, diagnostics, i).snapshot
            assert len(snapshot.layers) == len(diagnostics.layers)
        assert not step.core._forms


def test_a_recording_on_the_fast_path_keeps_an_output_a_later_layer_writes_in_place(names):
    """A BatchNorm's output doubled in place as the next layer takes it: a compiled run's
    recording holds the output as it left the BatchNorm, as an autograd run's does and as a copy
    taken at the hook."""
    reference, model = _models(names)
    copies = []
    for m in (reference, model):
        m.blocks[0][1].register_forward_hook(
            lambda _m, _i, out: copies.append(out.detach().clone()) if _m.training else None
        )
        m.blocks[0][2].register_forward_pre_hook(lambda _m, inputs: inputs[0].mul_(2))
    cfg = TrainConfig(optimizer="sgd", lr=0.1)
    autograd = TrainStep(reference, make_optimizer(reference, cfg), batch_size=32, compile=False)
    optimizer = make_optimizer(model, cfg)
    fast = TrainStep(model, optimizer, batch_size=32)
    recorders = Diagnostics(reference), Diagnostics(model)
    # the recordings run in the recording's graph, which copies the output at its hook
    for i, (x, y) in enumerate(_batches(names, 2)):
        expected = autograd(x, y, 0.1, recorders[0], i).snapshot
        copy = copies[-1]  # taken as the BatchNorm's output left it, before the doubling
        measured = fast(x, y, 0.1, recorders[1], i).snapshot
        for snapshot in (expected, measured):
            layer = {layer.name: layer for layer in snapshot.layers}.get("blocks.0.1")
            assert layer is not None  # recorded, not dropped as overwritten
            assert layer.mean == pytest.approx(copy.mean().item(), abs=1e-6)
            assert layer.std == pytest.approx(copy.std().item(), rel=1e-5)
        assert copy.std().item() == pytest.approx(1.0, rel=0.01)  # normalized, not doubled
    assert len(fast.core._forms) == 1


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_the_step_is_the_same_arithmetic_in_float64(names, optimizer_name, nonlinearity):
    reference, model = (
        m.double() for m in _models(names, residual=True, block_size=10, nonlinearity=nonlinearity)
    )
    cfg = TrainConfig(optimizer=optimizer_name, lr=0.01, weight_decay=0.1)
    optimizer = make_optimizer(reference, cfg)
    step_optimizer = make_optimizer(model, cfg)
    step = CompiledStep(model, step_optimizer, compile=False)
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


@pytest.mark.parametrize(
    "overrides, optimizer_name",
    [
        # lecture-deep with SGD: tests/test_trace.py holds both paths to their records
        ({"norm": "layer", "dropout": 0.2, "embed_dropout": 0.1, "residual": True}, "adamw"),
        ({"arch": "wavenet", "block_size": 8, "n_layer": 3, "n_embd": 4}, "adamw"),
    ],
)
def test_the_compiled_step_equals_the_eager_step(names, overrides, optimizer_name):
    eager_model, compiled_model = _models(names, **overrides)
    cfg = TrainConfig(optimizer=optimizer_name, lr=0.01)
    eager = CompiledStep(eager_model, make_optimizer(eager_model, cfg), compile=False)
    compiled = CompiledStep(compiled_model, make_optimizer(compiled_model, cfg))
    for x, y in _batches(names, 10, block_size=eager_model.config.block_size):
        rng = torch.get_rng_state()
        eager_loss = eager(x, y, 0.01)
        torch.set_rng_state(rng)
        assert compiled(x, y, 0.01).item() == pytest.approx(eager_loss.item(), abs=1e-5)
    assert compiled._proven  # compiled, not fallen back
    expected = eager_model.state_dict()
    for name, value in compiled_model.state_dict().items():  # AdamW's float32 drift: see above
        torch.testing.assert_close(value, expected[name], atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        {"param": "mup", "output_bn": False},  # a param group per rate scale, each its own rate
        {"norm": "layer", "dropout": 0.2, "residual": True, "block_size": 10},
        {"arch": "wavenet", "block_size": 8, "n_layer": 3, "n_embd": 4},
    ],
)
def test_the_compiled_sgd_step_updates_in_its_graph_as_torch_optim_does(names, overrides):
    """SGD's update is part of the compiled graph, at each group's rate as a tensor: a new
    rate every step is new data, not a new graph; a new weight decay is a new graph."""
    eager_model, compiled_model = _models(names, **overrides)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.1)
    eager = CompiledStep(eager_model, make_optimizer(eager_model, cfg), compile=False)
    compiled = CompiledStep(compiled_model, make_optimizer(compiled_model, cfg))
    batches = list(_batches(names, 12, block_size=eager_model.config.block_size))
    for i, (x, y) in enumerate(batches):
        lr = 0.1 / (1 + i)
        if i == 8:  # the groups' settings, read at each step as torch.optim reads them
            for step in (eager, compiled):
                step.optimizer.param_groups[0]["weight_decay"] = 0.0
        rng = torch.get_rng_state()
        eager_loss = eager(x, y, lr)
        torch.set_rng_state(rng)
        assert compiled(x, y, lr).item() == pytest.approx(eager_loss.item(), abs=1e-5)
    assert compiled._update_in_graph and len(compiled._proven) == 2  # the decay's two graphs
    assert [g["lr"] for g in compiled.optimizer.param_groups] == compiled.rates.tolist()
    expected = eager_model.state_dict()
    for name, value in compiled_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert compiled.optimizer.state_dict()["state"] == {}  # torch.optim's SGD keeps none


class _WithAnUnusedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(27, 4)
        self.head = torch.nn.Linear(12, 27)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.embedding(x).flatten(1)), None


@pytest.mark.parametrize("optimizer_name, compile", [("adamw", False), ("sgd", True)])
def test_a_parameter_the_loss_does_not_use_is_left_alone_as_torch_optim_does(
    names, optimizer_name, compile
):
    reference, model = _WithAnUnusedLayer(), _WithAnUnusedLayer()
    model.load_state_dict(reference.state_dict())
    cfg = TrainConfig(optimizer=optimizer_name, lr=0.01, weight_decay=0.1)
    optimizer, own_optimizer = make_optimizer(reference, cfg), make_optimizer(model, cfg)
    step = CompiledStep(model, own_optimizer, compile=compile)
    before = model.unused.weight.detach().clone()
    for x, y in _batches(names, 5):
        logits, _ = reference(x)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
        step(x, y, 0.01)
    assert bool(step._proven) == compile  # compiled, not fallen back
    assert torch.equal(model.unused.weight, before)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-5, rtol=1e-5)
    # no state for it, as torch.optim keeps none
    assert model.unused.weight not in own_optimizer.state
    assert own_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_the_compile_cache_is_the_users_own(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "normlab" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_a_batch_of_other_strides_gets_its_own_graph(names):
    """The step calls inductor without dynamo's guards, so its own key must tell apart what
    they would: the same shape laid out differently runs a graph compiled for that layout."""
    a, b = _models(names)
    sgd = TrainConfig(optimizer="sgd")
    step = CompiledStep(a, make_optimizer(a, sgd))
    eager = CompiledStep(b, make_optimizer(b, sgd), compile=False)
    for i, (x, y) in enumerate(_batches(names, 4)):
        if i % 2:  # the same values, every other column of a wider tensor: strides (6, 2)
            x = torch.stack([x, torch.zeros_like(x)], dim=2).flatten(1)[:, ::2]
            assert x.stride() == (6, 2)
        torch.testing.assert_close(step(x, y, 0.1), eager(x, y, 0.1), atol=1e-6, rtol=1e-6)
    assert len(step._proven) == 2


def test_importing_the_step_leaves_the_compiler_unloaded():
    """inductor's entry imports dynamo (seconds): a command that never compiles skips it."""
    code = "import sys, normlab.lm.cli; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_a_failed_compile_is_one_line_and_the_same_step_uncompiled(names, monkeypatch, capsys):
    def broken_compile(graph, inputs, options):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(compiled_module, "inductor_compile", broken_compile)
    a, b = _models(names)
    sgd = TrainConfig(optimizer="sgd")
    broken = CompiledStep(a, make_optimizer(a, sgd))
    eager = CompiledStep(b, make_optimizer(b, sgd), compile=False)
    for x, y in _batches(names, 3):
        assert torch.equal(broken(x, y, 0.1), eager(x, y, 0.1))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "normlab: compiling the step failed (no C++ compiler found); the step runs uncompiled"
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
    # AdamW, whose float32 drift (see above) moves a weight by up to a few lr = 3e-3; SGD's
    # lecture-deep is held to its recorded numbers on both paths by tests/test_trace.py
    [("default", 1e-3, 1e-2)],
)
def test_compiled_training_matches_eager_training_over_100_steps(tmp_path, preset, tol, weight_tol):
    eager, _ = _train(tmp_path, "eager", "--no-compile", preset=preset)
    compiled, stdout = _train(tmp_path, "compiled", preset=preset)  # compiled by default
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


@pytest.mark.parametrize("flags, compiled", [((), True), (("--no-compile",), False)])
def test_the_step_is_compiled_unless_turned_off(flags, compiled, capsys):
    command = ["bench", "--preset", "lecture-deep", "--steps", "10", "--device", "cpu", *flags]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["compiled"] is compiled


def test_a_new_batch_shape_that_fails_to_compile_falls_back_too(names, monkeypatch, capsys):
    def compiles_once(graph, inputs, options):  # the first graph "compiles" (runs as traced)
        if compiles_once.calls:
            raise RuntimeError("no C++ compiler found")
        compiles_once.calls += 1
        return graph

    compiles_once.calls = 0
    monkeypatch.setattr(compiled_module, "inductor_compile", compiles_once)
    a, b = _models(names)
    sgd = TrainConfig(optimizer="sgd")
    step = CompiledStep(a, make_optimizer(a, sgd))
    eager = CompiledStep(b, make_optimizer(b, sgd), compile=False)
    for batch_size in (32, 32, 20, 20):
        x, y = next(_batches(names, 1, batch_size=batch_size))
        torch.testing.assert_close(step(x, y, 0.1), eager(x, y, 0.1), atol=1e-6, rtol=1e-6)
    assert capsys.readouterr().out.strip().splitlines() == [
        "normlab: compiling the step failed (no C++ compiler found); the step runs uncompiled"
    ]


def test_a_compiled_step_that_fails_after_updating_is_not_applied_twice(names, monkeypatch, capsys):
    def updates_then_fails(graph, inputs, options):
        def compiled(*args):
            graph(*args)  # the whole step, its in-place updates included
            raise RuntimeError("the compiled kernel failed at run time")

        return compiled

    monkeypatch.setattr(compiled_module, "inductor_compile", updates_then_fails)
    a, b = _models(names)
    adamw = TrainConfig(optimizer="adamw", lr=0.01)
    failing = CompiledStep(a, make_optimizer(a, adamw))
    eager = CompiledStep(b, make_optimizer(b, adamw), compile=False)
    for x, y in _batches(names, 3):
        assert torch.equal(failing(x, y, 0.01), eager(x, y, 0.01))
    for name, value in b.state_dict().items():  # weights, running statistics, counts
        assert torch.equal(a.state_dict()[name], value), name
    assert (
        "compiling the step failed (the compiled kernel failed at run time)"
        in capsys.readouterr().out
    )
