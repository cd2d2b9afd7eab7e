"""The experiments: their building blocks, and every --quick mode end to end through the CLI."""

import json
import math

import pytest
import torch

from normlab.lm.cli import main
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.data import load_dataset
from normlab.lm.experiments import lecture
from normlab.lm.experiments.common import Context, fit, new_model, train_config
from normlab.lm.init_schemes import scale_lecture_
from normlab.lm.presets import LECTURE_SGD
from normlab.lm.train import train


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_lecture_stages_scale_the_randn_tensors_as_the_lecture_does():
    data = load_dataset(None, 3)
    models = {}
    for stage in lecture.STAGES:
        model = new_model(lecture.stage_config(stage), data, 0)
        scale_lecture_(model, stage.scales)
        models[stage.name] = model
    hidden = {name: m.blocks[0][0] for name, m in models.items()}
    assert hidden["original"].weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert hidden["tanh fix"].weight.std().item() == pytest.approx(0.2, rel=0.05)
    assert hidden["kaiming"].weight.std().item() == pytest.approx((5 / 3) / math.sqrt(30), rel=0.05)
    assert hidden["kaiming"].bias is None and hidden["batchnorm"].bias is None
    assert models["softmax fix"].head[0].bias.abs().max() == 0
    assert models["kaiming"].head[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert models["batchnorm"].blocks[0][1].momentum == 0.001
    x, y = data.splits["train"][0][:4096], data.splits["train"][1][:4096]
    _, loss = models["original"](x, y)
    assert loss.item() > 15  # the lecture's confidently wrong start (≈ 27)
    _, loss = models["softmax fix"](x, y)
    assert loss.item() == pytest.approx(math.log(27), abs=0.1)


@pytest.mark.parametrize("init, compiled", [("kaiming", False), ("lsuv", False), ("kaiming", True)])
def test_fit_gives_the_losses_of_normlab_train(tmp_path, names_file, init, compiled, capsys):
    shape = dict(block_size=3, n_layer=2, n_hidden=16, n_embd=4, norm="none", init=init)
    mcfg = ModelConfig(**shape)
    # the experiments' recipe, LECTURE_SGD, as normlab train would run it
    tcfg = TrainConfig(
        **{**LECTURE_SGD, "steps": 40, "eval_every": 40, "seed": 3, "compile": compiled},
        data=str(names_file),
    )
    tcfg.threads = 1
    summary = train(mcfg, tcfg, tmp_path / "run")
    data = load_dataset(names_file, 3)
    model = new_model(ModelConfig(**shape), data, 3)
    ctx = Context("fit", tmp_path, True, 3, torch.device("cpu"), "", compile=compiled)
    result = fit(model, data, train_config(steps=40, batch_size=32, seed=3), ctx)
    assert result.losses["val"] == summary["val_loss"]
    assert result.losses["train"] == summary["train_loss"]
    assert result.init_loss == summary["init_loss"]
    assert (result.lsuv is not None) == (init == "lsuv")
    assert "compiling the step failed" not in capsys.readouterr().out


def _quick(capsys, tmp_path, name):
    out = tmp_path / name
    code, stdout, err = run(
        capsys, "experiment", name, "--quick", "--out", out, "--threads", "1", "--device", "cpu"
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name and results["quick"] is True
    assert f"normlab experiment {name} --seed 42" in results["command"]
    assert (out / f"{name}.png").stat().st_size > 1000
    return results, stdout


def test_experiment_lecture_quick(capsys, tmp_path):
    results, stdout = _quick(capsys, tmp_path, "lecture")
    stages = results["stages"]
    assert [s["stage"] for s in stages] == [s.name for s in lecture.STAGES]
    assert stages[0]["init_loss"] > 15 and stages[1]["init_loss"] < 3.6
    assert stages[0]["tanh_saturated_step0"] > stages[2]["tanh_saturated_step0"]
    assert all(math.isfinite(s["val_loss"]) for s in stages)
    assert "calibrated_val_loss" in stages[-1]
    assert "val within ±0.03 of the lecture" in stdout


def test_experiment_depth_quick(capsys, tmp_path):
    results, stdout = _quick(capsys, tmp_path, "depth")
    cells = results["cells"]
    assert len(cells) == len(results["variants"]) * 2
    # the depth scale keeps the residual sum, and so the last layer's saturation, small
    by = {(c["variant"], c["depth"]): c for c in cells}
    scaled, unscaled = by[("kaiming 5/3 + residual/√2L", 5)], by[("kaiming 5/3 + residual", 5)]
    assert scaled["saturated_last"] < unscaled["saturated_last"] / 2
    naive = [c for c in cells if c["variant"] == "naive"]
    assert all("saturated" in c["verdicts"] and c["loss_step0"] > 10 for c in naive)
    lsuv = [c for c in cells if c["variant"] == "lsuv"]
    assert all(len(c["lsuv"]) == c["depth"] for c in lsuv)
    assert "lsuv: 5 of 5 hidden layers scaled" in stdout


def test_experiment_batchnorm_quick(capsys, tmp_path):
    results, _ = _quick(capsys, tmp_path, "batchnorm")
    assert results["tracker_matches_model_buffers"] < 1e-5  # the tracker is BatchNorm's update
    rc = results["running_vs_calibrated"]
    assert rc["train_loss_calibrated_eval"] == pytest.approx(
        rc["train_loss_full_batch_train_mode"], abs=1e-4
    )
    assert [row["momentum"] for row in results["momentum"]] == [0.1, 0.01, 0.001, None]
    bias = results["bias_before_bn"]
    assert bias["max_abs_bias_grad"] < 1e-5 < bias["max_abs_weight_grad"]
    assert bias["max_step_loss_diff"] < 1e-4
    assert results["single_example"]["max_abs_logit_diff"] < 1e-4
    assert {(r["batch_size"], r["norm"]) for r in results["gap"]} == {
        (32, "batch"),
        (32, "none"),
        (128, "batch"),
        (128, "none"),
    }


def test_experiment_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "experiment", "lecture", "--quick", "--threads", "0")
    assert code == 2 and err.startswith("normlab: error:") and err.count("\n") == 1
    assert "--threads must be at least 1" in err
    file = tmp_path / "f"
    file.write_text("")
    code, _, err = run(capsys, "experiment", "depth", "--quick", "--out", file)
    assert code == 2 and "is a file" in err and err.count("\n") == 1
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    code, _, err = run(capsys, "experiment", "depth", "--quick", "--out", tmp_path / "done")
    assert code == 2 and "already holds results" in err
    with pytest.raises(SystemExit) as e:
        main(["experiment", "nonsense"])
    assert e.value.code == 2


def test_experiment_lr_find_quick(capsys, tmp_path):
    results, stdout = _quick(capsys, tmp_path, "lr-find")
    assert set(results["setups"]) == {"default", "lecture-deep"}
    for setup in results["setups"].values():
        assert len(setup["grid"]) == 7 and 1e-7 <= setup["suggestion"] <= 10
        best = min(row["val_loss"] for row in setup["grid"])
        assert setup["best_val_loss"] == best
        assert setup["gap"] == pytest.approx(setup["suggested_val_loss"] - best)
    assert "the range test suggests" in stdout


def test_experiment_sharpness_quick(capsys, tmp_path):
    results, _ = _quick(capsys, tmp_path, "sharpness")
    runs = results["runs"]
    assert [run["lr"] for run in runs] == [1.0, 2.0]
    for run in runs:
        assert [step for step, _ in run["sharpness"]] == [0, 50, 100, 150]
        assert run["stability_line"] == 2 / run["lr"]
        assert run["peak"] > run["at_start"]  # progressive sharpening, from the same start
    assert runs[0]["at_start"] == runs[1]["at_start"]  # the same initial weights


def test_experiment_width_quick(capsys, tmp_path):
    results, _ = _quick(capsys, tmp_path, "width")
    grid = results["grid"]
    assert {(r["param"], r["width"], r["lr"]) for r in grid} == {
        (param, width, lr)
        for param in ("standard", "mup")
        for width in results["widths"]
        for lr in results["lrs"]
    }
    for param, best in results["best_lr"].items():
        for width, lr in best.items():  # the lowest val loss of its width
            cells = [r for r in grid if r["param"] == param and r["width"] == int(width)]
            assert lr == min(cells, key=lambda r: r["val_loss"])["lr"]
    assert results["coord_check"]["mup"]["flagged"] == {}
    assert (tmp_path / "width" / "coordcheck-mup.png").stat().st_size > 1000
