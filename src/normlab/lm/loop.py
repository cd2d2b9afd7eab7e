"""The training loop: ``run_loop`` reads straight down, batch → step → log → eval →
checkpoint → stop. It trains a ``Training`` and logs into a ``RunFolder``, or for the
experiments and benchmarks into a ``MemoryLog``.
"""

import contextlib
import math
import signal
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from normlab.diagnostics import SecondOrderStats, Snapshot
from normlab.errors import Interrupted, TrainingDiverged
from normlab.lm.distributed import global_outcome
from normlab.lm.evaluate import evaluate
from normlab.lm.optim import lr_at
from normlab.lm.rundir import RunFolder, StopSignals
from normlab.lm.state import Progress, Training
from normlab.lm.step import Recording


class MemoryLog:
    """A run without a folder (experiments, benchmarks): every step's loss and end time, and
    every evaluation, kept in memory; nothing is saved."""

    kept = "nothing was saved"
    resume_hint = "nothing was saved"

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc
        self.step_losses: list[float] = []
        self.step_ends: list[float] = []  # time.perf_counter() after each step
        self.rows: list[dict] = []
        self.second_order: list[tuple[int, SecondOrderStats]] = []  # (step, what it measured)

    def progress_bar(self, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, unit="step", desc=self.desc, leave=False)

    def step(self, step: int, loss: float) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_losses.append(loss)

    def recording(self, snapshot: Snapshot) -> None:
        if snapshot.second_order is not None:
            self.second_order.append((snapshot.step, snapshot.second_order))

    def metrics(self, row: dict, bar: tqdm) -> None:
        self.rows.append(row)

    def save(self, state: dict) -> None:
        pass


@torch.no_grad()
def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


class Stopwatch:
    """The loop's clock, kept in ``Progress``: the training time (steps and evaluations), and
    each step's time by whether it was recorded. A start's first plain step compiles the
    step, and its first recording the recording's graph (or, untraced, watches what the model
    writes in place): neither is a typical step of its kind, and their times are left out of
    the step times (not out of the training time)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._lap = time.perf_counter()
        self._step_start = self._lap
        self._first = {True: True, False: True}  # by recorded: the start's first is yet to come

    def step_started(self) -> None:
        self._step_start = time.perf_counter()

    def step_done(self, recorded: bool, aside_s: float = 0.0) -> None:
        """The step ended; ``aside_s`` of its seconds (a second-order measurement) are not the
        step's own."""
        if not self._first[recorded]:
            seconds = time.perf_counter() - self._step_start - aside_s
            self.progress.add_step_time(seconds, recorded)
        self._first[recorded] = False
        self.progress.recordings += recorded

    def recordings_aside(self, seconds: float) -> None:
        """Seconds outside the steps that went to recordings (taking those measured in earlier
        steps): the recordings' time all the same."""
        self.progress.recorded_step_s += seconds

    def lap(self) -> None:
        """Add the seconds since the last lap to the training time."""
        self._lap = self.progress.lap(self._lap)


# A recording's Snapshot and its row in diagnostics.jsonl are a few hundred microseconds of
# Python, which take about twice as long run alone between a hundred compiled steps (the
# caches hold the steps' data) as run one after another: the loop takes them this many at a
# time, in the step of the last, and all that wait before a checkpoint and at the end. A
# start's first recording is taken at once: its row says the run is under way.
RECORDINGS_AT_ONCE = 10


class Waiting:
    """The recordings the loop's steps measured whose Snapshots (``Recording.take``) and rows
    are yet to be made, in the order of their steps; all of them are taken when the block ends,
    however it ends: a diverged or stopped run keeps the recordings it made."""

    def __init__(self, log: "RunFolder | MemoryLog", clock: Stopwatch) -> None:
        self.log, self.clock = log, clock
        self.recordings: list[Recording] = []
        self._taken = False  # this start has taken a recording

    def __enter__(self) -> "Waiting":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.take_aside()
            return
        with contextlib.suppress(Exception):  # the error under way is the one to say
            self.take_aside()

    def append(self, recording: Recording) -> None:
        """A step's recording: with it ``RECORDINGS_AT_ONCE`` wait, or it is the start's first,
        all are taken."""
        self.recordings.append(recording)
        if len(self.recordings) == RECORDINGS_AT_ONCE or not self._taken:
            self.take()

    def take(self) -> None:
        """Every Snapshot waiting, into the recorder's history and the log."""
        while self.recordings:
            self.log.recording(self.recordings.pop(0).take())
            self._taken = True

    def take_aside(self) -> None:
        """``take``, outside a step: its time is the recordings' all the same."""
        started = time.perf_counter()
        self.take()
        self.clock.recordings_aside(time.perf_counter() - started)


def run_loop(t: Training, log: RunFolder | MemoryLog) -> None:
    """Train ``t`` to its last step, its target loss, or a Ctrl-C, logging into ``log``."""
    cfg, progress = t.train_config, t.progress
    bar = log.progress_bar(cfg.steps, progress.step)
    clock = Stopwatch(progress)
    with StopSignals() as signals, Waiting(log, clock) as waiting:
        while progress.step < cfg.steps and progress.time_to_target_s is None:
            clock.step_started()
            lr = lr_at(progress.step, cfg)
            xb, yb = t.batches.next()
            recording = t.records_at(progress.step)
            recorder = t.diagnostics if recording else None  # None on ranks other than 0
            second_order, second_order_s = None, 0.0
            if t.measures_second_order_at(progress.step):  # on the weights the step starts from
                started = time.perf_counter()
                second_order = t.second_order(xb, yb, lr, progress.step)
                second_order_s = time.perf_counter() - started
                progress.second_order_measurements += 1
                progress.second_order_s += second_order_s
            result = t.step(
                xb, yb, lr, recorder, progress.step, recording_step=recording, take=False
            )
            if result.recording is not None:
                result.recording.second_order = second_order
                waiting.append(result.recording)  # taken now or later, in a step's time
            loss, interrupted = global_outcome(result.loss, signals.raised, t.ranks)
            log.step(progress.step + 1, loss)
            clock.step_done(recording, aside_s=second_order_s)
            progress.step += 1
            step = progress.step
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at step {step}; stopped, and {log.kept} "
                    "(try a lower --lr)"
                )
            if progress.init_loss is None:
                progress.init_loss = loss
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            done = step == cfg.steps
            if step % cfg.eval_every == 0 or done:
                losses = {k: evaluate(t.eval_model, *xy, t.ranks) for k, xy in t.eval_sets.items()}
                if not all(math.isfinite(v) for v in losses.values()):
                    raise TrainingDiverged(
                        f"the evaluation loss became {losses['val']} at step {step}; stopped, "
                        f"and {log.kept} (try a lower --lr)"
                    )
                clock.lap()
                target = cfg.target_val_loss
                if target is not None and losses["val"] <= target:
                    done, progress.time_to_target_s = True, progress.train_time_s
                log.metrics(
                    {"step": step, **{f"{k}_loss": v for k, v in losses.items()}, "lr": lr}, bar
                )
            if step % cfg.checkpoint_every == 0 or done or interrupted:
                waiting.take_aside()  # a checkpoint covers the recordings before it
                clock.lap()
                if not _all_finite(t.model):  # never overwrite a good checkpoint with bad weights
                    raise TrainingDiverged(
                        f"the weights became NaN or infinite by step {step}; stopped, and "
                        f"{log.kept} (try a lower --lr)"
                    )
                log.save(t.checkpoint_state())
            if interrupted:
                bar.close()
                name = signal.Signals(signals.first).name
                hint = log.resume_hint
                raise Interrupted(f"interrupted by {name} at step {step}; {hint}", signals.first)
            if done:
                break
    bar.close()
    clock.lap()
