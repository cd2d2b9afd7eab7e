"""A run folder: what ``normlab train`` writes, and what ``--resume`` reads back.

A run folder holds ``config.json``, ``checkpoint.pt`` (see
``normlab.checkpoint``), ``metrics.jsonl`` (one line per evaluation),
``diagnostics.jsonl`` (one line per recording), ``summary.json``,
``report.html`` and, with ``--tensorboard``, ``tensorboard/``. The logs are
appended a line at a time; a resumed run first cuts them back to what its
checkpoint covers, so a run killed at any moment and resumed logs exactly what
an uninterrupted run logs. Under several processes rank 0 alone writes.

``StopSignals`` turns Ctrl-C into a flag that the loop checks between steps.
"""

import json
import signal
from pathlib import Path

from tqdm.auto import tqdm

from normlab.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from normlab.diagnostics import Snapshot, snapshot_from_dict, snapshot_to_dict
from normlab.distributed import Ranks
from normlab.errors import NormlabError
from normlab.report import log_metrics, log_snapshot, open_tensorboard

METRICS_NAME, DIAGNOSTICS_NAME = "metrics.jsonl", "diagnostics.jsonl"


class RunFolder:
    """The files of one run, written by rank 0 only; the training loop logs into it.

    The loop calls ``progress_bar``, ``step``, ``metrics`` and ``save``;
    ``train()`` calls the rest.
    """

    def __init__(self, path: Path, ranks: Ranks) -> None:
        self.path = Path(path)
        self.writes = ranks.is_main
        self.tensorboard = None

    # -- starting or resuming
    def check_new(self) -> None:
        """Refuse a folder that is a file or already holds a run."""
        if self.path.exists() and not self.path.is_dir():
            raise NormlabError(f"--out {self.path} is a file; the run folder must be a folder")
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
            atomic_write_json(self.path / "config.json", config)
            (self.path / METRICS_NAME).write_text("")
            (self.path / DIAGNOSTICS_NAME).write_text("")

    def resume(self, step: int, tensorboard: bool) -> list[Snapshot]:
        """A resumed run at ``step``: the logs cut back to what the checkpoint covers
        (an evaluation at step k follows update k; a recording at step k precedes update
        k + 1). Returns the recordings kept."""
        if not self.writes:
            return []
        self._open(tensorboard)
        _truncate_jsonl(self.path / METRICS_NAME, lambda row: row["step"] <= step)
        kept = _truncate_jsonl(self.path / DIAGNOSTICS_NAME, lambda row: row["step"] < step)
        return [snapshot_from_dict(row) for row in kept]

    def _open(self, tensorboard: bool) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
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

    def step(self, step: int, loss: float, snapshot: Snapshot | None) -> None:
        """After optimizer step ``step``: its recording, if it was one."""
        if snapshot is not None and self.writes:
            _append_jsonl(self.path / DIAGNOSTICS_NAME, snapshot_to_dict(snapshot))
            if self.tensorboard is not None:
                log_snapshot(self.tensorboard, snapshot)

    def metrics(self, row: dict, bar: tqdm) -> None:
        """An evaluation: ``{"step", "train_loss", "val_loss", "lr"}``."""
        if not self.writes:
            return
        _append_jsonl(self.path / METRICS_NAME, row)
        if self.tensorboard is not None:
            log_metrics(self.tensorboard, row)
        bar.write(
            f"step {row['step']:>7,}: train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
            f"lr {row['lr']:.2e}"
        )

    def save(self, state: dict) -> None:
        """The checkpoint (``state`` from every rank, written by rank 0)."""
        if self.writes:
            save_checkpoint(self.path, state)

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
        atomic_write_json(self.path / "summary.json", summary)

    def write_report(self, page: str) -> None:
        atomic_write_bytes(self.path / "report.html", page.encode())

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut short by a kill is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` (atomically) with only the rows for which ``keep(row)`` holds."""
    rows = [row for row in _read_jsonl(path) if keep(row)]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return rows


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


class StopSignals:
    """Turn the first Ctrl-C into a flag checked between steps, so no step is left half done.

    With ``also_sigterm`` SIGTERM counts as Ctrl-C: torchrun answers a Ctrl-C by
    sending SIGTERM to its workers, which then still save their checkpoint.
    """

    def __init__(self, also_sigterm: bool = False) -> None:
        self.signals = (signal.SIGINT, signal.SIGTERM) if also_sigterm else (signal.SIGINT,)

    def __enter__(self):
        self.received = set()
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    @property
    def raised(self) -> bool:
        return bool(self.received)

    def _handle(self, signum, frame):
        if signum in self.received:  # a second Ctrl-C: stop now (SIGINT then SIGTERM is one)
            raise KeyboardInterrupt
        self.received.add(signum)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
