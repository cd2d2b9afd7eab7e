"""The same seed, config and thread count give the numbers recorded in tests/data, bit for bit.

``lecture_deep_trace.json`` holds the evaluations and the final weights' hash of
100 ``lecture-deep`` steps, eager (``--no-compile``) and compiled, recorded by
its ``command`` (``python tests/test_trace.py`` records them again). Float
arithmetic is only reproducible bit for bit with the same kernels: on another
torch version, CPU instruction set or processor (whose BLAS may take another
code path) the val losses are held to 1e-5 instead, and the weights' hash is not
compared.
"""

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

from normlab.lm.checkpoint import load_checkpoint
from normlab.lm.cli import main

TRACE_PATH = Path(__file__).parent / "data" / "lecture_deep_trace.json"
TRACE = json.loads(TRACE_PATH.read_text())


def _processor() -> str:
    """The processor's model name and a digest of its feature flags (Linux: a virtual
    machine may name every generation alike, and a BLAS picks its code path by the
    features), or what ``platform`` says elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        first = cpuinfo.read_text().split("\n\n")[0]  # the first processor's block
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:16]
        return f"{fields.get('model name', '')}; flags {flags}"
    return platform.processor()


def _kernels() -> dict:
    """What decides which kernels a run's arithmetic takes."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": _processor(),
    }


SAME_KERNELS = TRACE["recorded_with"] == _kernels()


def _weights_sha256(run: Path) -> str:
    h = hashlib.sha256()
    for name, value in load_checkpoint(run)["model"].items():
        h.update(name.encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


FLAGS = {"eager": ("--no-compile",), "compiled": ()}


def _train(out: Path, path: str) -> list[dict]:
    """Train as the trace's ``command`` on ``path`` (eager or compiled); the metrics rows."""
    assert main([*TRACE["command"].split()[1:], *FLAGS[path], "--out", str(out)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check(tmp_path, capsys, path: str) -> None:
    out = tmp_path / path
    rows = _train(out, path)
    capsys.readouterr()
    expected = TRACE[path]
    if SAME_KERNELS:
        assert rows == expected["metrics"]
        assert _weights_sha256(out) == expected["weights_sha256"]
    else:
        assert [r["step"] for r in rows] == [r["step"] for r in expected["metrics"]]
        for row, want in zip(rows, expected["metrics"], strict=True):
            assert row["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)


def test_eager_training_gives_the_recorded_numbers(tmp_path, capsys):
    _check(tmp_path, capsys, "eager")


@pytest.mark.slow
def test_compiled_training_gives_the_recorded_numbers(tmp_path, capsys):
    _check(tmp_path, capsys, "compiled")


def record(folder: Path) -> None:
    """Record both paths' numbers into the trace, on this machine's torch and CPU."""
    TRACE["recorded_with"] = _kernels()
    for path in FLAGS:
        rows = _train(folder / path, path)
        TRACE[path] = {"metrics": rows, "weights_sha256": _weights_sha256(folder / path)}
    TRACE_PATH.write_text(json.dumps(TRACE, indent=1) + "\n")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        record(Path(folder))
