"""Faults a real run meets, with real processes and a real filesystem (docs/RELIABILITY.md).

A full disk is a small tmpfs and a read-only disk a read-only bind mount: both need root
and ``mount``, and the tests that use them are skipped, saying why, where they are missing.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from processes import start_run

from normlab.lm.checkpoint import load_checkpoint
from normlab.lm.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _mount(*args) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def _umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _no_temporaries(folder) -> bool:
    return not list(folder.glob(".*.tmp"))


# a model whose checkpoint is big enough to measure a disk in
WIDE = ["--n-layer", "2", "--n-hidden", "64", "--n-embd", "8", "--diagnose-every", "0"]


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, tiny, capsys
):
    flags = ["train", *tiny, *WIDE, "--optimizer", "adamw"]
    probe = tmp_path / "probe"
    assert run(capsys, *flags, "--steps", 1, "--out", probe)[0] == 0
    size = (probe / "checkpoint.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for the logs and one checkpoint, not for the next one beside it
    if not _mount("-t", "tmpfs", "-o", f"size={size * 3 // 2 + 16384}", "tmpfs", disk):
        pytest.skip("a full disk needs root and mount -t tmpfs")
    try:
        out = disk / "run"
        code, _, err = run(capsys, *flags, "--steps", 50, "--checkpoint-every", 1, "--out", out)
        line = _one_line(err)
        assert code == 1 and "No space left on device" in line and "checkpoint.pt" in line
        assert "last good checkpoint is kept" in line
        assert load_checkpoint(out)["progress"]["step"] < 50  # loadable: the step-0 one
        assert _no_temporaries(out)
    finally:
        _umount(disk)


def test_resume_on_a_read_only_folder_is_one_line_and_changes_nothing(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", *tiny, "--steps", 10, "--out", out)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if not (_mount("--bind", out, read_only) and _mount("-o", "remount,ro,bind", read_only)):
        _umount(read_only)
        pytest.skip("a read-only disk needs root and mount --bind")
    try:
        code, _, err = run(capsys, "train", "--out", read_only, "--resume", "--steps", 20)
        line = _one_line(err)
        assert code == 1 and "Read-only file system" in line and str(read_only) in line
    finally:
        _umount(read_only)
    assert (out / "checkpoint.pt").read_bytes() == before and _no_temporaries(out)


def _without_root_rights() -> list[str]:
    """A command prefix under which permission bits apply: root ignores them otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("permission bits bind root only without CAP_DAC_OVERRIDE: needs setpriv")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_permission_denied_is_one_line(tmp_path, tiny):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    out = parent / "run"
    command = [sys.executable, "-m", "normlab", "train", *tiny, "--steps", "5", "--out", str(out)]
    result = subprocess.run([*_without_root_rights(), *command], capture_output=True, text=True)
    parent.chmod(0o755)
    line = _one_line(result.stderr)
    assert result.returncode == 1 and "Permission denied" in line and str(out) in line
    assert not out.exists()


def _train_cmd(tiny, out, steps=3000):
    return [
        sys.executable, "-m", "normlab", "train", *tiny, "--steps", str(steps),
        "--eval-every", "1000", "--checkpoint-every", "50", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_folder_removed_under_a_running_run_is_one_line(tmp_path, tiny):
    out = tmp_path / "run"
    proc = start_run(_train_cmd(tiny, out), out)
    shutil.rmtree(out)
    _, err = proc.communicate(timeout=120)
    line = _one_line(err)
    assert proc.returncode == 1 and "No such file or directory" in line and str(out) in line


@pytest.mark.slow
def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, tiny):
    out = tmp_path / "run"
    first = start_run(_train_cmd(tiny, out), out)
    first.send_signal(signal.SIGSTOP)  # it holds the lock, and cannot finish while refused
    try:
        resume = [*_train_cmd(tiny, out)[:4], "--out", out, "--resume"]
        for cmd in (_train_cmd(tiny, out), resume):
            result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
            line = _one_line(result.stderr)
            assert (
                result.returncode == 2
                and f"in use by another normlab run (process {first.pid})" in line
            )
    finally:
        first.kill()
        first.wait()
    # the killed run's lock is free; of two resumes started together, exactly one takes it
    resume = [sys.executable, "-m", "normlab", "train", "--out", str(out), "--resume"]
    both = [
        subprocess.Popen(resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in "ab"
    ]
    codes = sorted(p.wait(timeout=300) for p in both)
    assert codes == [0, 2]
    assert load_checkpoint(out)["progress"]["step"] == 3000


def _closed_stdout(argv) -> subprocess.CompletedProcess:
    """Run ``normlab ARGV`` with its stdout a pipe that is already closed (as after `| head`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "normlab", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, "", err)


@pytest.mark.parametrize(
    "argv",
    [["sample", "-n", "5000"], ["diagnose", "--json"], ["eval", "--json"]],
    ids=["sample", "diagnose", "eval"],
)
def test_a_closed_pipe_is_quiet_with_the_status_of_sigpipe(trained_run, argv):
    if argv[0] == "diagnose":
        argv = [*argv, "--run", trained_run]
    else:
        argv = [argv[0], "--run", trained_run, *argv[1:]]
    result = _closed_stdout(argv)
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == ""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("runs") / "trained"
    assert main(["train", *tiny, "--steps", "20", "--out", str(out)]) == 0
    return out


def test_a_checkpoint_of_another_format_version_names_both(tmp_path, trained_run, capsys):
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    state["format_version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(state, newer)
    code, _, err = run(capsys, "sample", "--run", newer)
    line = _one_line(err)
    assert code == 2 and "version 99" in line and "reads version 1" in line


def test_an_ended_run_continues_with_steps(tmp_path, tiny, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["train", *tiny, "--optimizer", "sgd", "--schedule", "step", "--eval-every", 10]
    assert run(capsys, *flags, "--steps", 40, "--out", straight)[0] == 0
    assert run(capsys, *flags, "--steps", 20, "--out", resumed)[0] == 0
    code, out, _ = run(capsys, "train", "--out", resumed, "--resume")
    assert code == 0 and "the run ended at step 20; to train on, resume with --steps N" in out
    code, _, err = run(capsys, "train", "--out", resumed, "--resume", "--steps", 20)
    assert code == 2 and "--steps must be more than that" in _one_line(err)
    assert run(capsys, "train", "--out", resumed, "--resume", "--steps", 40)[0] == 0
    # the step schedule does not depend on the total: the same run as 40 steps at once
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    metrics = (straight / "metrics.jsonl").read_text()
    assert (resumed / "metrics.jsonl").read_text() == metrics


def test_a_cosine_run_continued_says_what_happens_to_its_schedule(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    flags = ["--schedule", "cosine", "--optimizer", "adamw", "--lr", "0.01", "--steps", 20]
    assert run(capsys, "train", *tiny, *flags, "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", "--steps", 40)
    assert code == 0
    assert (
        "cosine schedule over 40 steps instead of 20: the learning rate at step 20 goes" in stdout
    )
    assert load_checkpoint(out)["train_config"]["steps"] == 40


def test_a_continued_run_records_as_it_began(tmp_path, tiny, capsys, monkeypatch):
    """Whether recordings run as a compiled graph is decided when a run starts, from its
    number of recordings, and kept: a run continued with more steps records as it began, so
    that it rounds as one run of the new total that began the same way would."""
    from normlab.lm import start

    monkeypatch.setattr(start, "RECORDINGS_TO_COMPILE", 4)
    flags = ["train", *tiny, "--eval-every", 10, "--diagnose-every", 10]
    assert run(capsys, *flags, "--steps", 40, "--out", tmp_path / "long")[0] == 0  # 4 recordings
    assert run(capsys, *flags, "--steps", 20, "--out", tmp_path / "short")[0] == 0  # 2
    assert run(capsys, "train", "--out", tmp_path / "short", "--resume", "--steps", 40)[0] == 0
    decided = [load_checkpoint(tmp_path / d)["progress"] for d in ("long", "short")]
    assert [p["records_compiled"] for p in decided] == [True, False]
    assert [p["recordings"] for p in decided] == [4, 4]  # every recording counted
