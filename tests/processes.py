"""Runs in processes of their own, for the tests that kill, signal or race them."""

import subprocess
import time


def start_run(command: list, out) -> subprocess.Popen:
    """Start ``command`` (a ``normlab train``) and return once it wrote its first checkpoint."""
    proc = subprocess.Popen(
        list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc
