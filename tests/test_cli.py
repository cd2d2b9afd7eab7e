"""Every command end to end in-process, and every bad input: one line on stderr, exit 2."""

import argparse
import json
import pickle
from dataclasses import fields

import pytest
import torch

from normlab.lm.cli import build_parser, configs_from_args, main
from normlab.lm.config import ModelConfig, TrainConfig
from normlab.lm.presets import PRESETS


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, match):
    assert code == 2
    assert err.startswith("normlab: error:") and err.count("\n") == 1, err
    assert match in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *tiny, "--steps", "60", "--eval-every", "30", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is empty"),
        (b"\n \n", "only blank lines"),
        (b"ann\n\xc3\x28x\n", "not valid UTF-8 (line 2)"),
        (b"ann\nbo\n", "too few"),
    ],
)
def test_bad_data_files(tmp_path, capsys, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / "r")
    assert_usage_error(code, err, match)
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


def test_missing_data_and_directory(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", tmp_path / "none.txt", "--out", tmp_path / "r")
    assert_usage_error(code, err, "does not exist")
    code, _, err = run(capsys, "train", "--data", tmp_path, "--out", tmp_path / "r")
    assert_usage_error(code, err, "is a directory")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--norm", "weight"], "invalid choice: 'weight'"),
        (["train", "--steps", "ten"], "invalid int value"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["sample"], "--run"),
        ([], "required"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--bias"], "needs no bias"),
        (["--norm", "group", "--n-groups", "5"], "divisible"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--lr", "-1"], "lr must be a positive"),
        (["--threads", "0"], "threads must be at least 1"),
    ],
)
def test_bad_configs(tmp_path, tiny, capsys, flags, match):
    code, _, err = run(capsys, "train", *tiny, *flags, "--out", tmp_path / "r")
    assert_usage_error(code, err, match)


def test_cuda_when_unavailable(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "train", *tiny, "--device", "cuda", "--out", tmp_path / "r")
    assert_usage_error(code, err, "no CUDA device")


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--resume")
    assert_usage_error(code, err, "--resume needs --out")
    code, _, err = run(capsys, "train", "--resume", "--out", tmp_path)
    assert_usage_error(code, err, "no checkpoint")


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path, trained, capsys):
    good = (trained / "checkpoint.pt").read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a checkpoint at all",
        "empty": b"",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        code, _, err = run(capsys, "sample", "--run", path)
        assert_usage_error(code, err, "not a loadable checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, _, err = run(capsys, "eval", "--run", foreign)
    assert_usage_error(code, err, "not a normlab checkpoint")


class _Exploit:
    def __reduce__(self):  # unpickling this would create a file: it must never run
        return (open, ("/tmp/normlab-pwned-by-checkpoint", "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path, capsys):
    import os

    target = "/tmp/normlab-pwned-by-checkpoint"
    if os.path.exists(target):
        os.remove(target)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "normlab-checkpoint", "x": _Exploit()}, evil, pickle_protocol=2)
    code, _, err = run(capsys, "sample", "--run", evil)
    assert_usage_error(code, err, "not a loadable checkpoint")
    assert not os.path.exists(target)
    evil.write_bytes(pickle.dumps(_Exploit()))
    code, _, err = run(capsys, "sample", "--run", evil)
    assert_usage_error(code, err, "not a loadable checkpoint")
    assert not os.path.exists(target)


def test_sample(trained, capsys):
    code, out, _ = run(capsys, "sample", "--run", trained, "-n", 7, "--seed", 3)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 8 and "new (not in the training set)" in lines[-1]
    assert all(line.rstrip().endswith(("new", "in train")) for line in lines[:-1])
    again = run(capsys, "sample", "--run", trained, "-n", 7, "--seed", 3)[1]
    assert again == out  # the same seed, the same samples
    code, out, _ = run(capsys, "sample", "--run", trained, "-n", 5, "--prefix", "ma")
    assert all(line.startswith("ma") for line in out.strip().splitlines()[:-1])


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--prefix", "Q!"], "not in the vocabulary"),
        (["--temperature", "0"], "temperature must be a positive number"),
        (["--temperature", "nan"], "temperature must be a positive number"),
        (["--top-k", "0"], "top-k"),
        (["-n", "0"], "at least 1"),
    ],
)
def test_sample_bad_flags(trained, capsys, flags, match):
    code, _, err = run(capsys, "sample", "--run", trained, *flags)
    assert_usage_error(code, err, match)


def test_eval_running_and_calibrated(trained, capsys):
    code, out, _ = run(capsys, "eval", "--run", trained, "--split", "test", "--calibrate", "--json")
    result = json.loads(out)
    assert code == 0 and result["split"] == "test" and result["step"] == 60
    assert abs(result["calibrated_loss"] - result["running_stats_loss"]) < 0.5
    code, out, _ = run(capsys, "eval", "--run", trained)
    assert code == 0 and out.startswith("val loss at step 60:")


def test_eval_calibrate_without_batchnorm(tmp_path, tiny, capsys):
    out = tmp_path / "ln"
    run(capsys, "train", *tiny, "--norm", "layer", "--steps", 5, "--out", out)
    code, _, err = run(capsys, "eval", "--run", out, "--calibrate")
    assert_usage_error(code, err, "no BatchNorm")


def test_bench_prints_one_json_line(capsys, names_file):
    code, out, _ = run(
        capsys,
        "bench",
        "--preset",
        "lecture-deep",
        "--batch-size",
        32,
        "--steps",
        20,
        "--threads",
        1,
        "--data",
        names_file,
    )
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["steps_per_s"] > 0 and result["batch_size"] == 32
    assert result["preset"] == "lecture-deep"


def test_propagate_prints_the_table(capsys):
    code, out, _ = run(capsys, "propagate", "--n-layer", 10)
    assert code == 0 and "kaiming+BN" in out and out.count("\n") >= 6


def test_train_help_lists_every_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in (
        "--data",
        "--out",
        "--preset",
        "--steps",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--n-layer",
        "--n-hidden",
        "--n-embd",
        "--block-size",
        "--norm",
        "--init",
        "--nonlinearity",
        "--residual",
        "--seed",
        "--device",
        "--threads",
        "--eval-every",
        "--checkpoint-every",
        "--target-val-loss",
        "--resume",
    ):
        assert flag in help_text, flag


def test_incomplete_checkpoint(tmp_path, capsys):
    path = tmp_path / "partial.pt"
    torch.save({"format": "normlab-checkpoint", "format_version": 1, "model": {}}, path)
    code, _, err = run(capsys, "sample", "--run", path)
    assert_usage_error(code, err, "incomplete checkpoint")


def test_sample_refuses_changed_data(tmp_path, tiny, names_file, capsys):
    data = tmp_path / "names.txt"
    data.write_text(names_file.read_text())
    out = tmp_path / "run"
    run(capsys, "train", *tiny, "--data", data, "--steps", 5, "--out", out)
    data.write_text(names_file.read_text() + "zzz\n")
    code, _, err = run(capsys, "sample", "--run", out)
    assert_usage_error(code, err, "has changed")


def test_diagnose_healthy_and_broken(capsys, names_file):
    data = ["--data", str(names_file), "--threads", "1"]
    code, out, _ = run(capsys, "diagnose", "--preset", "lecture-deep", *data, "--strict")
    assert code == 0 and "verdicts: none" in out and "blocks.4.2" in out
    broken = ["--init", "naive", "--norm", "none", "--n-layer", "10"]
    code, out, _ = run(capsys, "diagnose", "--preset", "lecture-deep", *broken, *data)
    assert code == 0 and "saturated" in out  # without --strict a verdict is not a failure
    code, out, _ = run(
        capsys, "diagnose", "--preset", "lecture-deep", *broken, *data, "--strict", "--json"
    )
    result = json.loads(out)
    assert code == 1 and {v["kind"] for v in result["verdicts"]} >= {"saturated"}


def test_diagnose_a_run(trained, capsys):
    code, out, _ = run(capsys, "diagnose", "--run", trained, "--json")
    result = json.loads(out)
    assert code == 0 and result["snapshot"]["step"] == 60
    code, _, err = run(capsys, "diagnose", "--run", trained, "--lr", "1")
    assert_usage_error(code, err, "drop --lr")


def test_more_bad_inputs(tmp_path, tiny, trained, capsys):
    code, _, err = run(capsys, "train", *tiny, "--batch-size", 1, "--out", tmp_path / "r")
    assert_usage_error(code, err, "at least 2 examples")
    code, _, err = run(
        capsys, "train", *tiny, "--norm", "group", "--n-groups", 0, "--out", tmp_path / "r"
    )
    assert_usage_error(code, err, "n_groups must be at least 1")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run(capsys, "train", *tiny, "--out", a_file)
    assert_usage_error(code, err, "is a file")
    # a checkpoint whose weights do not fit its config
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    state["model_config"]["n_hidden"] = 17
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, _, err = run(capsys, "sample", "--run", bad)
    assert_usage_error(code, err, "does not fit its own config")


def test_a_run_checkpoints_at_step_0(tmp_path, tiny, capsys, monkeypatch):
    import normlab.lm.rundir

    saved = []
    real_save = normlab.lm.rundir.save_checkpoint

    def recording_save(folder, state):
        saved.append(state["progress"]["step"])
        real_save(folder, state)

    monkeypatch.setattr(normlab.lm.rundir, "save_checkpoint", recording_save)
    run(capsys, "train", *tiny, "--steps", 5, "--checkpoint-every", 100, "--out", tmp_path / "r")
    assert saved == [0, 5]  # a kill before the first periodic checkpoint can still resume


def _train_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_config_field_has_one_flag_made_from_its_declaration():
    actions = {a.dest: a for a in _train_parser()._actions}
    for config in (ModelConfig, TrainConfig):
        for field in fields(config):
            if not field.metadata["flag"]:
                assert field.name not in actions, field.name
                continue
            action = actions[field.name]
            assert action.option_strings[0] == "--" + field.name.replace("_", "-")
            assert action.help == field.metadata["help"] and action.default is None
            if field.metadata["choices"]:
                assert set(action.choices) == set(field.metadata["choices"]) - {None}
    args = _train_parser().parse_args(["--min-lr-ratio", "0.2", "--no-sync-batchnorm"])
    model_config, train_config = configs_from_args(args)
    assert train_config.min_lr_ratio == 0.2 and train_config.sync_batchnorm is False
    assert model_config == ModelConfig(**PRESETS["default"]["model"])  # the rest: the preset's


def test_diagnose_your_own_model_from_a_factory(tmp_path, capsys, monkeypatch):
    factory = tmp_path / "my_models.py"
    factory.write_text(
        "import torch\n"
        "def conv_net():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))\n"
        "def broken():\n"
        "    raise RuntimeError('no weights here')\n"
        "def batch():\n"
        "    return torch.randn(16, 3, 8, 8)\n"
    )
    model = ["diagnose", "--model", f"{factory}:conv_net"]
    code, out, _ = run(capsys, *model, "--input-shape", "16,3,8,8", "--html", tmp_path / "p.html")
    assert code == 0 and "conv" in out and "relu" in out and (tmp_path / "p.html").exists()
    code, out, _ = run(capsys, *model, "--batch", f"{factory}:batch", "--json")
    assert code == 0 and json.loads(out)["snapshot"]["layers"][0]["kind"] == "conv"
    monkeypatch.chdir(tmp_path)  # a module name is found in the working folder, as python -m
    code, out, _ = run(
        capsys, "diagnose", "--model", "my_models:conv_net", "--batch", "my_models:batch"
    )
    assert code == 0 and "conv" in out
    for argv, message in [
        (["--model", f"{factory}:broken", "--input-shape", "2,3"], "factory"),
        (["--model", f"{factory}:missing", "--input-shape", "2,3"], "cannot load"),
        (["--model", "no_such_module:f", "--input-shape", "2,3"], "cannot load"),
        (["--model", f"{factory}:conv_net", "--input-shape", "2,5"], "rejected the batch"),
        (["--model", f"{factory}:conv_net"], "--input-shape"),
        (["--model", f"{factory}:conv_net", "--input-shape", "2,3", "--lr", "1"], "drop --lr"),
    ]:
        code, _, err = run(capsys, "diagnose", *argv)
        assert_usage_error(code, err, message)


def test_help_lists_each_choice_flags_choices_and_the_top_level_says_what_normlab_does(capsys):
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        usage = parser.format_usage()
        for action in parser._actions:
            if action.choices is not None and action.option_strings:  # every choice, by name
                assert "{" + ",".join(map(str, action.choices)) + "}" in usage, (name, action)
        assert " PATH" not in usage.replace("--data PATH", ""), (name, usage)  # a path is a path
    top = build_parser().format_help()
    assert "BatchNorm" in top and "normlab.audit" in top and "example:" in top
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    from normlab import __version__

    assert exit_info.value.code == 0 and capsys.readouterr().out == f"normlab {__version__}\n"
