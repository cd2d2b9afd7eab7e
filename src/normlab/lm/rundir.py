"""A run folder: what ``normlab train`` writes, and what ``--resume`` reads back.

A run folder holds ``config.json``, ``checkpoint.pt`` (see
``normlab.lm.checkpoint``), ``metrics.jsonl`` (one line per evaluation),
``diagnostics.jsonl`` (one line per recording), ``summary.json``,
``report.html`` and, with ``--tensorboard``, ``tensorboard/``. The logs are
appended a line at a time; a resumed run first cuts them back to what its
checkpoint covers, so a run killed at any moment and resumed logs exactly what
an uninterrupted run logs. Under several processes rank 0 alone writes.

A running run holds a lock on its folder (``.normlab.lock``, which names its
process): a second run or a resume on the same folder is refused. The kernel
drops the lock when the process ends, however it ends, so a killed run leaves
nothing stale behind. An OS error on the folder (a full disk, a read-only or
removed folder) is one line naming the file and the cause.

``StopSignals`` turns Ctrl-C and SIGTERM into a flag that the loop checks
between steps, so a run stops on a whole step and saves its checkpoint.
"""

import contextlib
import fcntl
import json
import math
import os
import signal
import sys
from pathlib import Path

import orjson
from tqdm.auto import tqdm

from normlab.diagnostics import Snapshot, snapshot_from_dict, snapshot_to_dict
from normlab.errors import NormlabError, StorageError, first_line
from normlab.files import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from normlab.lm.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from normlab.lm.distributed import Ranks
from normlab.report import log_metrics, log_snapshot, open_tensorboard

METRICS_NAME, DIAGNOSTICS_NAME = "metrics.jsonl", "diagnostics.jsonl"
LOCK_NAME = ".normlab.lock"


@contextlib.contextmanager
def _writing(path: Path, what: str = "write"):
    """An OSError on ``path`` as one line: the file and the cause."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"cannot {what} {path}: {e.strerror or e}") from None


class RunFolder:
    """The files of one run, written by rank 0 only; the training loop logs into it.

    The loop calls ``progress_bar``, ``step``, ``recording``, ``metrics`` and ``save``;
    ``train()`` calls the rest, in a ``with`` block that closes the folder (and lets the
    lock go) however the run ends.
    """

    def __init__(self, path: Path, ranks: Ranks) -> None:
        self.path = Path(path)
        self.writes = ranks.is_main
        self.tensorboard = None
        self._lock: int | None = None  # the lock file's descriptor while this run holds it
        self._logs = {
            name: _JsonLines(self.path / name) for name in (METRICS_NAME, DIAGNOSTICS_NAME)
        }

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lock(self) -> None:
        """Hold the folder (creating it) for this run, or raise naming the process that does.

        ``flock`` is the kernel's: it ends with the process that holds it, so a lock
        left by a killed run is free, and two processes can never both hold it.
        """
        if not self.writes:
            return
        if self.path.exists() and not self.path.is_dir():
            raise NormlabError(f"--out {self.path} is a file; the run folder must be a folder")
        path = self.path / LOCK_NAME
        with _writing(path, "lock"):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NormlabError(
                f"{self.path} is in use by another normlab run (process {holder}); wait for it "
                "to end, or choose another --out"
            ) from None
        except OSError as e:  # a filesystem without locks: the run goes on unguarded
            print(f"normlab: warning: cannot lock {path} ({e.strerror})", file=sys.stderr)
        with _writing(path, "lock"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    # -- starting or resuming
    def check_new(self) -> None:
        """Refuse a folder that already holds a run."""
        if (self.path / CHECKPOINT_NAME).exists():
            raise NormlabError(
                f"{self.path} already holds a run; continue it with --resume, or choose another "
                "--out"
            )

    def load_checkpoint(self) -> dict:
        return load_checkpoint(self.path)

    def start(self, config: dict, tensorboard: bool) -> None:
        """A new run: ``config.json`` and empty logs."""
        if self.writes:
            self._open(tensorboard)
            with _writing(self.path / "config.json"):
                atomic_write_json(self.path / "config.json", config)
            for name in (METRICS_NAME, DIAGNOSTICS_NAME):
                with _writing(self.path / name):
                    (self.path / name).write_text("")

    def resume(self, step: int, tensorboard: bool) -> list[Snapshot]:
        """A resumed run at ``step``: the logs cut back to what the checkpoint covers
        (an evaluation at step k follows update k; a recording at step k precedes update
        k + 1). Returns the recordings kept."""
        if not self.writes:
            return []
        self._open(tensorboard)
        for log in self._logs.values():  # a descriptor held open would keep the file replaced
            log.close()
        _truncate_jsonl(self.path / METRICS_NAME, lambda row: row["step"] <= step)
        kept = _truncate_jsonl(self.path / DIAGNOSTICS_NAME, lambda row: row["step"] < step)
        try:
            return [snapshot_from_dict(row) for row in kept]
        except (TypeError, KeyError) as e:  # a field it lacks, or one it does not know
            raise NormlabError(
                f"{self.path / DIAGNOSTICS_NAME} holds a recording this normlab cannot read "
                f"({first_line(e)}); move it aside to resume without the recordings"
            ) from None

    def _open(self, tensorboard: bool) -> None:
        with _writing(self.path):
            remove_stale_temporaries(self.path)
        if tensorboard:
            self.tensorboard = open_tensorboard(self.path)

    # -- what the loop logs
    def progress_bar(self, total: int, initial: int) -> tqdm:
        return tqdm(
            total=total,
            initial=initial,
            unit="step",
            desc="train",
            disable=None if self.writes else True,
        )

    def step(self, step: int, loss: float) -> None:
        """After optimizer step ``step``: nothing, as the logs hold evaluations and recordings."""

    def recording(self, snapshot: Snapshot) -> None:
        """A recording: its row in ``diagnostics.jsonl``."""
        if self.writes:
            self._logs[DIAGNOSTICS_NAME].append(snapshot_to_dict(snapshot))
            if self.tensorboard is not None:
                log_snapshot(self.tensorboard, snapshot)

    def metrics(self, row: dict, bar: tqdm) -> None:
        """An evaluation: ``{"step", "train_loss", "val_loss", "lr"}``."""
        if not self.writes:
            return
        self._logs[METRICS_NAME].append(row)
        if self.tensorboard is not None:
            log_metrics(self.tensorboard, row)
        bar.write(
            f"step {row['step']:>7,}: train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
            f"lr {row['lr']:.2e}"
        )

    def save(self, state: dict) -> None:
        """The checkpoint (``state`` from every rank, written by rank 0)."""
        if not self.writes:
            return
        path = self.path / CHECKPOINT_NAME
        try:
            save_checkpoint(self.path, state)
        except OSError as e:
            kept = "; the last good checkpoint is kept" if path.exists() else ""
            raise StorageError(f"cannot write {path}: {e.strerror or e}{kept}") from None

    @property
    def kept(self) -> str:
        """What a stopped run leaves, for its message."""
        return f"the last good checkpoint in {self.path} is kept"

    @property
    def resume_hint(self) -> str:
        return f"checkpoint saved, continue with: normlab train --out {self.path} --resume"

    # -- the end
    def read_metrics(self) -> list[dict]:
        return _read_jsonl(self.path / METRICS_NAME)

    def write_summary(self, summary: dict) -> None:
        with _writing(self.path / "summary.json"):
            atomic_write_json(self.path / "summary.json", summary)

    def write_report(self, page: str) -> None:
        with _writing(self.path / "report.html"):
            atomic_write_bytes(self.path / "report.html", page.encode())

    def close(self) -> None:
        """Close the logs and the TensorBoard files, and let the folder go (the lock file
        stays, unlocked)."""
        for log in self._logs.values():
            log.close()
        if self.tensorboard is not None:
            with _writing(self.path / "tensorboard"):
                self.tensorboard.close()
            self.tensorboard = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (UTF-8, as orjson writes it); a last line cut short by a
    kill is skipped."""
    rows = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # cut short: not JSON, or not even whole UTF-8
                continue
    return rows


def _truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` (atomically) with only the rows for which ``keep(row)`` holds."""
    rows = [row for row in _read_jsonl(path) if keep(row)]
    with _writing(path):
        atomic_write_bytes(path, b"".join(_json_line(row) for row in rows))
    return rows


def _json_line(row: dict) -> bytes:
    """``row`` as one line of JSON: by orjson, ten times faster than json (a recording's row
    is 24 KB), where every float in it is finite; by json where one is not, as orjson would
    write NaN and infinities as null, and a row keeps them (a diverged run's statistics)."""
    if _all_finite(row):
        try:
            return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # a type orjson does not take (numpy's scalars), which json does
            pass
    return (json.dumps(row, separators=(",", ":")) + "\n").encode()


def _all_finite(obj) -> bool:
    """Whether every float in ``obj`` (JSON's types, nested) is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        obj = obj.values()
    elif isinstance(obj, (list, tuple)):
        try:  # a list of numbers (a histogram's counts) in one call: NaN and ±inf sum to one
            return math.isfinite(sum(obj))
        except (TypeError, OverflowError):  # containers, None or strings; ints beyond a float
            pass
    else:
        return True
    for value in obj:
        kind = type(value)
        if kind is int or kind is str or value is None:
            continue
        if not (math.isfinite(value) if kind is float else _all_finite(value)):
            return False
    return True


class _JsonLines:
    """A JSON-lines log, appended a row at a time through one descriptor held open
    (``O_APPEND``), opened at its first row: opening the file for each row would cost as much
    as writing it. A row is one ``write``; a kill mid-row leaves a last line cut short, which
    ``_read_jsonl`` skips."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, row: dict) -> None:
        data = _json_line(row)
        with _writing(self.path):
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            while data:  # a regular file writes it all, unless the disk fills midway
                data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StopSignals:
    """Turn the first Ctrl-C or SIGTERM into a flag checked between steps, so no step is left
    half done and the run saves its checkpoint.

    SIGTERM is what Slurm, Kubernetes and systemd send before they kill a job, and what
    torchrun sends its workers on Ctrl-C. A second signal of the same kind stops at once.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.received: list[int] = []
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    @property
    def raised(self) -> bool:
        return bool(self.received)

    @property
    def first(self) -> int:
        """The first signal received (SIGINT if none)."""
        return self.received[0] if self.received else signal.SIGINT

    def _handle(self, signum, frame):
        if signum in self.received:  # the same signal again: stop now (SIGINT then SIGTERM is one)
            raise KeyboardInterrupt
        self.received.append(signum)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
