"""Runs in processes of their own, for the tests that kill, signal or race them."""

import os
import subprocess
import time

import torch.distributed as dist

from normlab.lm.checkpoint import load_checkpoint


def start_run(
    command: list, out, past_step: int | None = None, timeout: float = 60
) -> subprocess.Popen:
    """Start ``command`` (a ``normlab train``) and return once it wrote its first checkpoint,
    or with ``past_step``, a checkpoint past that step."""
    proc = subprocess.Popen(
        list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    while not _checkpointed(out, past_step):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


def _checkpointed(out, past_step: int | None) -> bool:
    if not (out / "checkpoint.pt").exists():
        return False
    return past_step is None or load_checkpoint(out)["progress"]["step"] > past_step


def leave_process_group() -> None:
    """End a rank that ``torch.multiprocessing.spawn`` started: meet every peer (no rank leaves
    while another still reads from it), destroy the group, and exit at once. Under load, gloo's
    threads can abort the process in the interpreter's own teardown ("terminate called without
    an active exception", pytorch#190489; a fix in torch, pytorch#179291, was abandoned), after
    the rank's work and its results are done; exiting before that teardown leaves the test
    judging the work alone."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
