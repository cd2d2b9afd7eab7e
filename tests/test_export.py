"""normlab export: ONNX checked by onnxruntime for every architecture option, and safetensors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from normlab.lm.cli import main
from normlab.lm.export import load_safetensors
from normlab.lm.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {
    "batchnorm": [],
    "layernorm": ["--norm", "layer"],
    "groupnorm": ["--norm", "group", "--n-groups", "4"],
    "none": ["--norm", "none"],
    "residual": ["--residual", "--n-hidden", "12", "--n-embd", "4", "--block-size", "3"],
    "output-batchnorm": ["--output-bn"],
    "relu": ["--nonlinearity", "relu"],
    "wavenet": ["--arch", "wavenet", "--block-size", "4", "--n-layer", "2"],
}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _trained(tmp_path, capsys, tiny, name, *flags):
    out = tmp_path / name
    code, _, err = run(capsys, "train", *tiny, "--steps", 30, *flags, "--out", out)
    assert code == 0, err
    return out


def _onnx_logits(path, X: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"idx": X.numpy()})
    return logits


def _assert_onnx_equals_normlab(run_folder, onnx_path):
    model, data, _ = load_run(run_folder, device="cpu")
    X = data.splits["val"][0][:256]
    with torch.no_grad():
        expected = model(X)[0].numpy()
    np.testing.assert_allclose(_onnx_logits(onnx_path, X), expected, atol=1e-5, rtol=0)
    for i in range(5):  # one example at a time: the fixed statistics of eval mode
        np.testing.assert_allclose(
            _onnx_logits(onnx_path, X[i : i + 1]), expected[i : i + 1], atol=1e-5, rtol=0
        )


@pytest.mark.slow
@pytest.mark.parametrize("flags", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_onnx_runs_in_onnxruntime_as_normlab_evaluates(tmp_path, capsys, tiny, flags):
    folder = _trained(tmp_path, capsys, tiny, "run", *flags)
    code, out, err = run(capsys, "export", "--run", folder, "--format", "onnx")
    assert code == 0, err
    path = folder / "model.onnx"
    assert f"wrote {path}" in out
    _assert_onnx_equals_normlab(folder, path)
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 18
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]  # folded


@pytest.mark.slow
def test_unfolded_batchnorms_are_batchnormalization_nodes(tmp_path, capsys, tiny):
    folder = _trained(tmp_path, capsys, tiny, "run", "--output-bn")
    out = tmp_path / "unfolded.onnx"
    assert (
        run(capsys, "export", "--run", folder, "--format", "onnx", "--no-fold", "--out", out)[0]
        == 0
    )
    nodes = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert nodes.count("BatchNormalization") == 3  # two hidden, one on the output
    _assert_onnx_equals_normlab(folder, out)


def test_safetensors_rebuild_the_model_with_its_config_and_vocabulary(tmp_path, capsys, tiny):
    folder = _trained(tmp_path, capsys, tiny, "run", "--ema", "0.9")
    code, out, _ = run(capsys, "export", "--run", folder, "--format", "safetensors")
    assert code == 0 and "model.safetensors" in out and "model.json" in out
    config = json.loads((folder / "model.json").read_text())
    assert config["model_config"]["n_hidden"] == 16 and config["vocab"][0] == "a"
    rebuilt, vocab = load_safetensors(folder / "model.safetensors")
    model, data, _ = load_run(folder, device="cpu")  # the moving average, as eval uses
    X = data.splits["val"][0][:64]
    with torch.no_grad():
        assert torch.equal(rebuilt(X)[0], model(X)[0])
    assert vocab == data.vocab


@pytest.mark.slow
def test_calibrate_exports_the_calibrated_statistics(tmp_path, capsys, tiny):
    from normlab.calibrate import calibrate_batchnorm

    folder = _trained(tmp_path, capsys, tiny, "run")
    out = tmp_path / "calibrated.safetensors"
    assert run(capsys, "export", "--run", folder, "--format", "safetensors", "--calibrate",
               "--out", out)[0] == 0  # fmt: skip
    model, data, _ = load_run(folder, device="cpu")
    calibrate_batchnorm(model, data.splits["train"][0])
    rebuilt, _ = load_safetensors(out)
    for name, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name


def _sample_onnx():
    spec = importlib.util.spec_from_file_location("sample_onnx", ROOT / "examples/sample_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_torch_free_sampler_gives_normlabs_names_when_greedy(tmp_path, capsys, tiny):
    folder = _trained(tmp_path, capsys, tiny, "run")
    assert run(capsys, "export", "--run", folder, "--format", "onnx")[0] == 0
    sampler = _sample_onnx()
    session, chars, block_size = sampler.load(str(folder / "model.onnx"))
    model, data, _ = load_run(folder, device="cpu")
    from normlab.lm.sample import generate

    max_len = 2 * data.max_item_len + 5  # as normlab sample
    ours = generate(model, data.vocab, 8, max_len, top_k=1, generator=torch.Generator())
    assert sampler.generate(session, chars, block_size, 8, max_len, top_k=1) == ours
    drawn = sampler.generate(session, chars, block_size, 50, max_len, seed=1)
    assert len(set(drawn)) > 1 and all(set(name) <= set(chars) for name in drawn)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "export", "--run", empty, "--format", "onnx")
    assert code == 2 and "no checkpoint" in err and err.count("\n") == 1
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "export", "--run", corrupt, "--format", "safetensors")
    assert code == 2 and "not a loadable checkpoint" in err and err.count("\n") == 1
    folder = _trained(tmp_path, capsys, tiny, "run")
    for out, message in (
        (tmp_path / "missing" / "m.onnx", "does not exist"),
        (tmp_path, "is a folder"),
    ):
        code, _, err = run(capsys, "export", "--run", folder, "--format", "onnx", "--out", out)
        assert code == 2 and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["export", "--run", str(folder), "--format", "tflite"])
    assert e.value.code == 2
