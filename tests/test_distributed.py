"""Data-parallel training: the batch slices, synchronized BatchNorm, and N processes = 1 process.

The multi-process tests start real processes on the gloo backend over loopback:
``torch.multiprocessing`` for the layer, ``normlab train --nproc`` (torch's
launcher) for whole runs.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from processes import leave_process_group

from normlab import nn as nl
from normlab.lm.distributed import Ranks, shard

# ---------------------------------------------------------------------------- the batch slices


@given(st.integers(1, 10_000), st.integers(1, 64))
def test_shards_partition_the_batch_in_order_with_sizes_within_one(n, world_size):
    slices = [shard(n, Ranks(r, world_size)) for r in range(world_size)]
    assert slices[0].start == 0 and slices[-1].stop == n
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------------- SyncBatchNorm, N ranks


def _batchnorm_rank(rank, world_size, init_file, shape, result_dir):
    """One rank: its rows of a fixed batch through a SyncBatchNorm, in float32 and float64."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    for dtype in (torch.float32, torch.float64):
        _batchnorm_forward_backward(rank, world_size, dtype, shape, result_dir)
    leave_process_group()


def _batchnorm_forward_backward(rank, world_size, dtype, shape, result_dir):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype) * 3 + 1  # the global batch, the same on every rank
    w = torch.randn(*shape, dtype=dtype)  # the loss Σ w·y over the global batch
    rows = shard(shape[0], Ranks(rank, world_size))
    bn = nl.SyncBatchNorm(shape[1], dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x_local = x[rows].clone().requires_grad_()
    for _ in range(2):  # twice: the running statistics move twice
        y = bn(x_local)
    (w[rows] * y).sum().backward()
    torch.save(
        {
            "y": y.detach(),
            "grad_x": x_local.grad,
            "grad_weight": bn.weight.grad,
            "grad_bias": bn.bias.grad,
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
        },
        result_dir / f"{rank}-{dtype}.pt",
    )


@pytest.mark.parametrize(
    ("world_size", "shape"), [(2, (32, 20)), (3, (7, 5)), (2, (5, 4, 3)), (3, (4, 3, 5, 5))]
)
def test_synced_batchnorm_on_n_ranks_equals_torch_on_the_whole_batch(tmp_path, world_size, shape):
    # (7, 5) on 3 ranks: 3, 2 and 2 rows; (5, 4, 3) is (N, C, L), 3 and 2 examples of 3
    # positions; (4, 3, 5, 5) is (N, C, H, W) on 3 ranks: 2, 1 and 1 examples
    mp.spawn(
        _batchnorm_rank, args=(world_size, tmp_path / "init", shape, tmp_path), nprocs=world_size
    )
    for dtype in (torch.float32, torch.float64):
        results = [
            torch.load(tmp_path / f"{r}-{dtype}.pt", weights_only=True) for r in range(world_size)
        ]
        _check_against_torch(results, dtype, shape)


def _check_against_torch(results, dtype, shape):

    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=dtype) * 3 + 1).requires_grad_()
    w = torch.randn(*shape, dtype=dtype)
    reference = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    ref = reference(shape[1], dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    for _ in range(2):
        y = ref(x)
    (w * y).sum().backward()

    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), x.grad, **tol)
    # each rank holds its own rows' share of the parameter gradients; DDP adds them up
    torch.testing.assert_close(sum(r["grad_weight"] for r in results), ref.weight.grad, **tol)
    torch.testing.assert_close(sum(r["grad_bias"] for r in results), ref.bias.grad, **tol)
    for r in results:  # the running statistics: torch's, and equal on every rank
        torch.testing.assert_close(r["running_mean"], ref.running_mean, **tol)
        torch.testing.assert_close(r["running_var"], ref.running_var, **tol)
        assert torch.equal(r["running_mean"], results[0]["running_mean"])
        assert torch.equal(r["running_var"], results[0]["running_var"])


def _plain_batchnorm_rank(rank, world_size, init_file, result_dir):
    """A BatchNorm1d under a process group: its own rows' statistics, as torch's."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank)) + rank
    ours, theirs = nl.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    torch.save({"ours": ours(x), "theirs": theirs(x)}, result_dir / f"{rank}.pt")
    # without a collective, a fast rank could tear the group down while the other still connects
    leave_process_group()


def test_batchnorm_is_synced_only_when_asked(tmp_path):
    # as in torch: a BatchNorm1d never talks to the other processes; SyncBatchNorm does
    mp.spawn(_plain_batchnorm_rank, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["ours"], result["theirs"], atol=1e-5, rtol=1e-5)


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, stride=2),
        nl.BatchNorm2d(4),
    ).double()


def _calibrate_rank(rank, world_size, init_file, result_dir):
    """Each rank calibrates on its own, uneven, shard of one data set."""
    from normlab.calibrate import calibrate_batchnorm

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    X = torch.randn(50, 3, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _conv_net()
    calibrate_batchnorm(model, X[shard(len(X), Ranks(rank, world_size))], batch_size=7)
    torch.save(model.state_dict(), result_dir / f"{rank}.pt")
    leave_process_group()


def test_calibration_on_n_ranks_gives_every_rank_the_whole_data_sets_statistics(tmp_path):
    from normlab.calibrate import calibrate_batchnorm

    mp.spawn(_calibrate_rank, args=(3, tmp_path / "init", tmp_path), nprocs=3)  # 17, 17, 16
    X = torch.randn(50, 3, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = _conv_net()
    calibrate_batchnorm(one, X, batch_size=50)
    for rank in range(3):
        state = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for name, value in one.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-12, rtol=1e-12, msg=name)


def _compiled_step_rank(rank, world_size, init_file, result_dir):
    """A model initialized differently on each rank, given a compiled step (no DDP)."""
    from normlab.lm.config import ModelConfig, TrainConfig
    from normlab.lm.model import LanguageModel
    from normlab.lm.optim import make_optimizer
    from normlab.lm.step import TrainStep

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    config = ModelConfig(n_layer=2, n_hidden=16, vocab_size=27)
    model = LanguageModel(config, torch.Generator().manual_seed(rank), verbose=False)
    optimizer = make_optimizer(model, TrainConfig())
    TrainStep(model, optimizer, 8, Ranks(rank, world_size), compile=False)
    torch.save(model.state_dict(), result_dir / f"{rank}.pt")
    leave_process_group()


def test_a_compiled_step_starts_every_rank_from_rank_0s_weights(tmp_path):
    # what DDP's constructor does; LSUV through dropout, for one, draws per-rank batches
    mp.spawn(_compiled_step_rank, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    zero, one = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    for name, value in zero.items():
        assert torch.equal(one[name], value), name


# ---------------------------------------------------------------------------- whole runs

LECTURE_DEEP_50 = [
    "--preset",
    "lecture-deep",
    "--steps",
    "50",
    "--batch-size",
    "33",  # on 2 processes, unequal shards of 17 and 16 rows
    "--eval-every",
    "50",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-compile",  # the autograd path: the reference, and no compile to wait for
]


def _normlab(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normlab", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def _train(out, *flags, nproc=1):
    result = _normlab("train", "--out", out, "--nproc", nproc, *flags)
    assert result.returncode == 0, result.stderr
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """50 steps of lecture-deep at global batch 33 on one process, with autograd: the run
    folder."""
    out = tmp_path_factory.mktemp("runs") / "one"
    _train(out, *LECTURE_DEEP_50)
    return out


@pytest.fixture(scope="module")
def one_process(one_process_run):
    return torch.load(one_process_run / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same on two processes, on the compiled step (step 0 records, every rank running that
    step untraced): the run folder."""
    out = tmp_path_factory.mktemp("runs") / "two"
    result = _normlab("train", "--out", out, "--nproc", 2, *LECTURE_DEEP_50, "--compile")
    assert result.returncode == 0, result.stderr
    assert "compiling the step failed" not in result.stdout
    return out


def test_two_processes_compiled_train_the_same_weights_as_one(one_process, two_processes):
    two = torch.load(two_processes / "checkpoint.pt", weights_only=True)
    assert _max_difference(one_process["model"], two["model"]) <= 1e-5
    running = [k for k in two["model"] if k.endswith(("running_mean", "running_var"))]
    assert len(running) == 12  # 6 BatchNorms
    stats = lambda ckpt: {k: ckpt["model"][k] for k in running}  # noqa: E731
    assert _max_difference(stats(one_process), stats(two)) <= 1e-5
    assert two["progress"]["step"] == 50
    assert len(two["rng"]["ranks"]) == 2  # each rank's own RNG, for an exact resume


def test_a_recording_on_two_compiled_processes_measures_the_global_gradient(
    one_process_run, two_processes
):
    # rank 0 records its own rows' activations, but the parameters' gradients and updates
    # are the global batch's: the same as one process on autograd measures
    one, two = (
        json.loads((run / "diagnostics.jsonl").read_text().splitlines()[0])["params"]
        for run in (one_process_run, two_processes)
    )
    assert [p["name"] for p in one] == [p["name"] for p in two]
    for a, b in zip(one, two, strict=True):
        for key in ("data_std", "grad_std", "grad_to_data", "update_to_data"):
            expected = pytest.approx(a[key], rel=1e-4) if a[key] is not None else None
            assert b[key] == expected, (a["name"], key)  # None: a constant BatchNorm gain


def test_without_synced_batchnorm_two_processes_compute_something_else(one_process, tmp_path):
    # the control for the test above: per-process statistics are a different computation
    local = _train(tmp_path / "local", *LECTURE_DEEP_50, "--no-sync-batchnorm", nproc=2)
    assert _max_difference(one_process["model"], local["model"]) > 1e-3


def test_sharded_evaluation_counts_every_example_once(two_processes):
    # the last eval of the run is sharded over 2 processes; `normlab eval` is one process
    logged = json.loads((two_processes / "metrics.jsonl").read_text().splitlines()[-1])
    result = _normlab("eval", "--run", two_processes, "--split", "val", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["running_stats_loss"] == pytest.approx(
        logged["val_loss"], abs=1e-6
    )


def test_only_rank_0_writes_and_prints(two_processes):
    summary = json.loads((two_processes / "summary.json").read_text())
    assert summary["steps"] == 50
    hidden = sorted(p.name for p in two_processes.iterdir() if p.name.startswith("."))
    assert hidden == [".normlab.lock"]  # no temporary file of another rank's write


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--batch-size", "1", "--norm", "layer", "--no-output-bn"],
            "--batch-size 1 is the global",
        ),
        (["--n-layer", "-1"], "n_layer must be at least 0"),
    ],
)
def test_a_bad_configuration_is_one_line_from_rank_0(tmp_path, flags, message):
    result = _normlab("train", "--nproc", "2", "--out", tmp_path / "run", *LECTURE_DEEP_50, *flags)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("normlab: error: ")
    assert message in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def _start_in_the_loop(out, flags) -> subprocess.Popen:
    """``normlab train --nproc 2`` in a session of its own, returned once rank 0 is training."""
    command = [sys.executable, "-m", "normlab", "train", "--nproc", "2", "--out", str(out), *flags]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a signal to its group reaches this run alone
    )
    recordings = out / "diagnostics.jsonl"  # its first line: step 0 is under way
    deadline = time.monotonic() + 120
    while not (recordings.exists() and recordings.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_ctrl_c_saves_and_resume_continues_the_same_run(tmp_path):
    flags = [*LECTURE_DEEP_50, "--steps", "300", "--eval-every", "300", "--diagnose-every", "1000"]
    out = tmp_path / "run"
    proc = _start_in_the_loop(out, flags)
    os.killpg(proc.pid, signal.SIGINT)  # as a Ctrl-C in a terminal: every process gets it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.count("checkpoint saved") == 1 and "Traceback" not in stderr
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert 0 < stopped < 300

    result = _normlab("train", "--out", out, "--resume", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    straight = _train(tmp_path / "straight", *flags, nproc=2)
    assert resumed["progress"]["step"] == 300
    assert _max_difference(resumed["model"], straight["model"]) == 0.0


def test_a_killed_process_is_one_line_not_a_wall_of_tracebacks(tmp_path):
    flags = [*LECTURE_DEEP_50, "--steps", "100000", "--diagnose-every", "1"]
    proc = _start_in_the_loop(tmp_path / "run", flags)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # as the OOM killer would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("normlab: error: process ") and "killed (SIGKILL)" in lines[-1]
    assert all(line.startswith("normlab: error: ") for line in lines), lines
