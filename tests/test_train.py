import itertools
import json
import math
import re

import pytest
import torch

from normlab.lm.checkpoint import load_checkpoint
from normlab.lm.cli import main
from normlab.lm.config import ModelConfig, TrainConfig, check_configs
from normlab.lm.model import LanguageModel
from normlab.lm.optim import lr_at, make_optimizer
from normlab.lm.presets import PRESETS
from normlab.lm.runs import load_state


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_step_schedule():
    cfg = TrainConfig(lr=0.1, schedule="step", decay_step=100, steps=200)
    assert lr_at(0, cfg) == 0.1 and lr_at(99, cfg) == 0.1
    assert lr_at(100, cfg) == pytest.approx(0.01) and lr_at(199, cfg) == pytest.approx(0.01)
    assert lr_at(150, TrainConfig(lr=0.1, schedule="step", decay_step=None)) == 0.1


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_configuration(name):
    preset = PRESETS[name]  # an unknown field is a TypeError here, a bad value a ConfigError
    check_configs(ModelConfig(**preset["model"]), TrainConfig(**preset["train"], preset=name))


def test_train_writes_a_complete_run_folder(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(
        capsys,
        "train",
        *tiny,
        "--steps",
        120,
        "--eval-every",
        50,
        "--checkpoint-every",
        40,
        "--out",
        out,
    )
    assert code == 0
    assert '"n_hidden": 16' in stdout  # the config is printed at start
    assert "of 20 new (not in the training set)" in stdout and f"run folder: {out}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "train_loss",
        "val_loss",
        "test_loss",
        "steps",
        "wall_s",
        "params",
        "preset",
        "seed",
        "time_to_target_s",
    ):
        assert key in summary, key
    assert summary["steps"] == 120 and summary["time_to_target_s"] is None
    assert summary["val_loss"] < summary["init_loss"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 100, 120]
    assert rows[-1]["val_loss"] == pytest.approx(summary["val_loss"])
    ckpt = load_checkpoint(out)
    assert ckpt["progress"]["step"] == 120 and ckpt["vocab"][0] == "a"
    assert json.loads((out / "config.json").read_text())["model"]["n_hidden"] == 16
    assert not list(out.glob(".*.tmp"))


def test_same_seed_same_numbers_and_another_seed_differs(tmp_path, tiny, capsys):
    def losses(name, seed):
        run(
            capsys,
            "train",
            *tiny,
            "--steps",
            60,
            "--eval-every",
            30,
            "--seed",
            seed,
            "--out",
            tmp_path / name,
        )
        return (tmp_path / name / "metrics.jsonl").read_text()

    assert losses("a", 1) == losses("b", 1)
    assert losses("a2", 2) != losses("b", 1)


def test_target_val_loss_stops_early(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(
        capsys,
        "train",
        *tiny,
        "--steps",
        400,
        "--eval-every",
        20,
        "--target-val-loss",
        3.0,
        "--out",
        out,
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] < 400 and summary["time_to_target_s"] > 0
    assert summary["best_val_loss"] <= 3.0 and "reached after" in stdout


def test_eval_train_examples_measures_a_fixed_subset_and_leaves_training_alone(
    tmp_path, tiny, capsys
):
    def rows(name, *flags):
        code, _, _ = run(
            capsys,
            "train",
            *tiny,
            "--steps",
            40,
            "--eval-every",
            20,
            *flags,
            "--out",
            tmp_path / name,
        )
        assert code == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines], json.loads(
            (tmp_path / name / "summary.json").read_text()
        )

    whole, whole_summary = rows("whole")
    part, part_summary = rows("part", "--eval-train-examples", 50)
    again, _ = rows("again", "--eval-train-examples", 50)
    assert part == again  # the same 50 examples every time
    # the same training: val losses and the final whole-split losses are unchanged ...
    assert [r["val_loss"] for r in part] == [r["val_loss"] for r in whole]
    assert part_summary["train_loss"] == whole_summary["train_loss"]
    # ... and only the periodic train loss is measured on the subset
    assert all(p["train_loss"] != w["train_loss"] for p, w in zip(part, whole, strict=True))
    whole_again, _ = rows("whole-again", "--eval-train-examples", 0)  # 0: the whole split
    assert whole_again == whole
    code, _, err = run(capsys, "train", *tiny, "--eval-train-examples", -1, "--out", tmp_path / "x")
    assert code == 2 and "eval_train_examples must be at least 0" in err


def test_ema_evaluates_and_saves_the_average_and_trains_the_weights(tmp_path, tiny, capsys):
    out, plain = tmp_path / "ema", tmp_path / "plain"
    flags = ["train", *tiny, "--steps", 60, "--eval-every", 30, "--optimizer", "adamw"]
    assert run(capsys, *flags, "--lr", 0.01, "--ema", 0.9, "--out", out)[0] == 0
    assert run(capsys, *flags, "--lr", 0.01, "--out", plain)[0] == 0
    ckpt, plain_ckpt = load_checkpoint(out), load_checkpoint(plain)
    for name, value in plain_ckpt["model"].items():  # the average does not steer the training
        assert torch.equal(ckpt["train_model"][name], value), name
    assert not torch.equal(
        ckpt["model"]["blocks.0.0.weight"], ckpt["train_model"]["blocks.0.0.weight"]
    )
    # the summary's losses and `normlab eval` are the average's
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, _ = run(capsys, "eval", "--run", out, "--json")
    loss = json.loads(stdout)["running_stats_loss"]
    assert code == 0 and loss == pytest.approx(summary["val_loss"], abs=1e-12)
    assert summary["val_loss"] != json.loads((plain / "summary.json").read_text())["val_loss"]
    code, _, err = run(capsys, *flags, "--ema", 1.0, "--out", tmp_path / "x")
    assert code == 2 and "ema must be in [0, 1)" in err


def test_a_checkpoint_from_an_unfused_optimizer_resumes_fused():
    model = LanguageModel(ModelConfig(block_size=3, n_layer=1, n_hidden=8, n_embd=2), verbose=False)
    old = make_optimizer(model, TrainConfig(optimizer="adamw"))
    for group in old.param_groups:  # as make_optimizer built it before it fused
        group["fused"], group["foreach"] = None, False
    model(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))[1].backward()
    old.step()
    ckpt = {"model": model.state_dict(), "optimizer": old.state_dict()}
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is None
    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw"))
    load_state(model, optimizer, ckpt)
    assert all(group["fused"] for group in optimizer.param_groups)
    for p in model.parameters():
        assert optimizer.state[p]["step"].dtype == torch.float32
        assert optimizer.state[p]["step"].device == p.device
    optimizer.step()  # the fused step accepts the loaded state
    assert optimizer.state[next(model.parameters())]["step"].item() == 2


def test_a_diverged_run_keeps_every_recording_it_made_the_last_one_nan(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    flags = ["--norm", "none", "--lr", "1e38", "--steps", 50, "--diagnose-every", 1]
    code, _, err = run(capsys, "train", *tiny, *flags, "--checkpoint-every", 50, "--out", out)
    assert code == 1
    bad_step = int(re.search(r"step (\d+)", err).group(1))
    lines = (out / "diagnostics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # json reads the NaN that json wrote
    assert [row["step"] for row in rows] == list(range(bad_step))  # none waiting left behind
    assert not math.isfinite(rows[-1]["loss"])
    assert all(math.isfinite(row["loss"]) for row in rows[:-1])


def test_divergence_stops_with_the_step_and_keeps_a_good_checkpoint(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        *tiny,
        "--norm",
        "none",
        "--lr",
        "1e38",
        "--steps",
        50,
        "--checkpoint-every",
        1,
        "--out",
        out,
    )
    assert code == 1
    assert (err.count("\n") == 1 and "NaN" in err) or "nan" in err or "inf" in err
    assert "Traceback" not in err
    bad_step = int(re.search(r"step (\d+)", err).group(1))
    ckpt = load_checkpoint(out)
    assert ckpt["progress"]["step"] < bad_step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_existing_run_is_not_overwritten(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    run(capsys, "train", *tiny, "--steps", 5, "--out", out)
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run(capsys, "train", *tiny, "--steps", 5, "--out", out)
    assert code == 2 and "--resume" in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_config_flags(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    run(capsys, "train", *tiny, "--steps", 5, "--out", out)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--lr", "0.5")
    assert code == 2 and "--lr" in err and err.count("\n") == 1


def test_resume_of_changed_data_is_refused(tmp_path, names_file, tiny, capsys):
    data = tmp_path / "names.txt"
    data.write_text(names_file.read_text())
    out = tmp_path / "run"
    run(capsys, "train", *tiny, "--data", data, "--steps", 5, "--out", out)
    data.write_text(names_file.read_text() + "zzz\n")
    code, _, err = run(capsys, "train", "--out", out, "--resume")
    assert code == 2 and "changed" in err


def test_resume_with_a_recording_of_another_format_is_one_line(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    run(capsys, "train", *tiny, "--steps", 10, "--diagnose-every", 5, "--out", out)
    rows = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    for row in rows:  # a field this normlab does not know
        for bn in row["batchnorms"]:
            bn["settled"] = bn.pop("time_constants") > 3
    (out / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", 20)
    assert code == 2 and err.count("\n") == 1
    assert "diagnostics.jsonl holds a recording this normlab cannot read" in err


def test_diagnostics_time_is_what_recorded_steps_add():
    from normlab.lm.state import Progress

    progress = Progress()
    for _ in range(99):
        progress.add_step_time(0.002, recorded=False)
    progress.add_step_time(0.010, recorded=True)
    assert progress.diagnostics_s() == pytest.approx(0.008)
    assert Progress(recorded_steps=1, recorded_step_s=0.01).diagnostics_s() == 0.01


def test_a_second_order_measurement_is_timed_apart_from_its_step(monkeypatch):
    from normlab.lm import loop
    from normlab.lm.state import Progress

    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    progress = Progress()
    clock = loop.Stopwatch(progress)
    steps = ((True, 5.0, 0.0), (False, 9.0, 0.0), (False, 0.002, 0.0), (True, 0.5, 0.49))
    for recorded, seconds, aside in steps:
        clock.step_started()
        now[0] += seconds
        clock.step_done(recorded, aside_s=aside)
    # the first recording and the first plain step (their compiles) are left out; the second
    # recorded step's own time is 0.01 s
    assert (progress.plain_steps, progress.plain_step_s) == (1, pytest.approx(0.002))
    assert (progress.recorded_steps, progress.recorded_step_s) == (1, pytest.approx(0.01))
    assert progress.recordings == 2  # both counted
    assert progress.step_s() == pytest.approx(0.012)


def test_summary_reports_the_cost_of_diagnostics(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    run(
        capsys,
        "train",
        *tiny,
        *("--steps", 50, "--diagnose-every", 10, "--second-order-every", 20, "--out", out),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diagnostics_recordings"] == 5  # every one, step 0's untimed one too
    assert summary["second_order_measurements"] == 3  # steps 0, 20 and 40
    assert 0 < summary["second_order_s"] < summary["train_time_s"]
    assert 0 < summary["diagnostics_s"] < summary["train_time_s"]
    assert summary["diagnostics_share"] < summary["diagnostics_step_share"] < 1
    # both seconds are rounded to the millisecond in summary.json, so the share they imply
    # lies in an interval that is wide when the run is short; the share itself has 4 decimals
    recorded, train, half_ms = summary["diagnostics_s"], summary["train_time_s"], 0.0005
    lowest = (recorded - half_ms) / (train + half_ms) - 0.00005
    highest = (recorded + half_ms) / (train - half_ms) + 0.00005
    assert lowest <= summary["diagnostics_share"] <= highest


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_the_steps_update_is_torch_optims_step_bit_for_bit(optimizer_name):
    """FunctionalUpdate, fed the gradients in a list, leaves the weights and the optimizer's
    state exactly as ``optimizer.step()`` does from ``.grad``, over several steps and both
    param groups (with and without weight decay)."""
    from normlab.lm.optim import FunctionalUpdate

    cfg = TrainConfig(optimizer=optimizer_name, lr=0.05, weight_decay=0.1)
    models = [LanguageModel(ModelConfig(n_hidden=16), verbose=False) for _ in "ab"]
    optimizers = [make_optimizer(m, cfg) for m in models]
    update = FunctionalUpdate(optimizers[1], list(models[1].parameters()))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for p, grad in zip(models[0].parameters(), grads, strict=True):
            p.grad = grad.clone()
        optimizers[0].step()
        update(grads)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in optimizers[0].state[p].items():
            assert torch.equal(value, optimizers[1].state[q][key]), key
