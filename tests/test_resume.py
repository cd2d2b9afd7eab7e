"""Kill-and-resume with real processes: SIGKILL at any moment, or Ctrl-C, then --resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from processes import start_run

from normlab.lm.checkpoint import load_checkpoint

STEPS = 3000


def _cmd(tiny, out):
    # dropout makes the global torch RNG part of what a resume must restore
    return [
        sys.executable,
        "-m",
        "normlab",
        "train",
        *tiny,
        "--optimizer",
        "adamw",
        "--dropout",
        "0.1",
        "--ema",  # the moving average too is part of what a resume must restore
        "0.99",
        "--lr",
        "0.01",
        "--steps",
        str(STEPS),
        "--eval-every",
        "500",
        "--checkpoint-every",
        "25",
        "--out",
        str(out),
    ]


def _resume_cmd(out):
    return [sys.executable, "-m", "normlab", "train", "--out", str(out), "--resume"]


def _start_and_signal(cmd, out, sig, delay, past_step=None):
    """Start a run, wait for its first checkpoint (with ``past_step``, for one past that
    step), wait ``delay`` s more, send ``sig``."""
    proc = start_run(cmd, out, past_step, timeout=60 if past_step is None else 120)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("runs") / "full"
    subprocess.run(_cmd(tiny, out), check=True, capture_output=True)
    return out


def _assert_same_run(a, b, steps=STEPS):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["progress"]["step"] == cb["progress"]["step"] == steps
    for weights in ("model", "train_model"):  # with --ema: the average, and what trains
        for k, v in ca.get(weights, {}).items():
            assert torch.equal(v, cb[weights][k]), (weights, k)
    for pid, state in ca["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, cb["optimizer"]["state"][pid][k]), (pid, k)
    for log in ("metrics.jsonl", "diagnostics.jsonl"):
        assert (a / log).read_text() == (b / log).read_text(), log
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("train_loss", "val_loss", "test_loss", "init_loss"):
        assert sa[key] == sb[key], key


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(uninterrupted, tmp_path, tiny):
    out = tmp_path / "killed"
    rng = random.Random(os.getpid())  # a different moment on every run of the suite
    code, _ = _start_and_signal(_cmd(tiny, out), out, signal.SIGKILL, rng.uniform(0, 0.5))
    assert code == -signal.SIGKILL
    first_stop = load_checkpoint(out)["progress"]["step"]
    print("killed after checkpoint at step", first_stop)
    assert first_stop < STEPS
    # killed again, this time during the resumed run
    code, _ = _start_and_signal(_resume_cmd(out), out, signal.SIGKILL, rng.uniform(0, 0.5))
    assert code == -signal.SIGKILL
    subprocess.run(_resume_cmd(out), check=True, capture_output=True)
    _assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_and_resumes_bit_identically(uninterrupted, tmp_path, tiny, sig):
    # SIGTERM is what a job scheduler sends before it kills a job: the run saves, as for Ctrl-C
    out = tmp_path / "interrupted"
    code, err = _start_and_signal(_cmd(tiny, out), out, sig, 0.2)
    assert code == 128 + sig  # 130, 143: the shell's status for a process ended by the signal
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"interrupted by {sig.name} at step" in lines[0], err
    assert "--resume" in lines[0]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert load_checkpoint(out)["progress"]["step"] == step < STEPS
    subprocess.run(_resume_cmd(out), check=True, capture_output=True)
    _assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [
        # AdamW updates after the compiled graph, by its fused kernel; dropout: what the
        # compiled step draws
        ["--optimizer", "adamw", "--lr", "0.01", "--dropout", "0.1"],
        # SGD updates in the graph, at a rate the schedule changes every step
        ["--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "0.01", "--dropout", "0.1"],
        # without dropout, and with RECORDINGS_TO_COMPILE recordings (every 10th step), every
        # recording runs in its own compiled graph, the resumed run's first one included
        ["--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "0.01", "--diagnose-every", "10"],
    ],
    ids=["adamw", "sgd", "sgd-recordings-compiled"],
)
def test_a_compiled_run_killed_and_resumed_is_bit_identical(tmp_path, tiny, optimizer):
    steps = 10_000  # the compiled step is fast: a run long enough to be killed in the middle

    def command(out):
        # the moving average: what follows the step
        flags = [*optimizer, "--ema", "0.99"]
        flags += ["--compile", "--steps", str(steps), "--eval-every", "5000"]
        flags += ["--checkpoint-every", "100", "--out", str(out)]
        return [sys.executable, "-m", "normlab", "train", *tiny, *flags]

    straight = tmp_path / "straight"
    result = subprocess.run(command(straight), check=True, capture_output=True, text=True)
    assert "compiling the step failed" not in result.stdout  # compiled, not fallen back
    out = tmp_path / "killed"
    delay = random.Random(os.getpid()).uniform(0, 0.5)
    # killed once it trains compiled: past its first checkpoint after step 0, which the
    # compile comes before
    code, _ = _start_and_signal(command(out), out, signal.SIGKILL, delay, past_step=0)
    assert code == -signal.SIGKILL
    assert 0 < load_checkpoint(out)["progress"]["step"] < steps
    subprocess.run(_resume_cmd(out), check=True, capture_output=True)
    _assert_same_run(straight, out, steps)


def test_a_run_written_by_an_earlier_normlab_loads_samples_and_resumes_as_it_did(tmp_path, capsys):
    """tests/data/run_21b7d77: a run folder from normlab at commit 21b7d77 (its command in
    expected.json), and what that normlab printed when it sampled, evaluated and resumed it."""
    import shutil
    from pathlib import Path

    from normlab.lm.cli import main

    source = Path(__file__).parent / "data" / "run_21b7d77"
    expected = json.loads((source / "expected.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert main(["sample", "--run", str(run), "-n", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == expected["sample -n 5 --seed 1"]
    assert main(["eval", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected["eval --json"]
    assert main(["train", "--out", str(run), "--resume", "--steps", "60"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    resumed = expected["train --resume --steps 60"]
    assert {key: summary[key] for key in resumed} == resumed  # bit for bit
