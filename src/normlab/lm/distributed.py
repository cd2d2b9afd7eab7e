"""Data-parallel training on PyTorch's own engine: torchrun and torch.distributed.

Every process (rank) draws the same global batch from the same generator and
takes its own contiguous slice of it, so the examples a step sees do not
depend on the number of processes; ``normlab.nn.SyncBatchNorm`` combines the
BatchNorm statistics across ranks, so a run on N processes computes what one
process computes with the same global batch. Each rank's loss is its rows' sum
over the global batch size, and the step (``normlab.lm.compiled``) sums the
gradients over the ranks: the global batch's gradient exactly, also when the
slices have unequal sizes. Rank 0 alone prints and writes.

    torchrun --standalone --nproc-per-node 2 -m normlab train ...   # or: normlab train --nproc 2

What is here: who this process is (``Ranks``), the device and the threads a run
asks for, starting and ending the process group, the batch slice, sums across
ranks, agreeing on an error, and the ``--nproc`` launcher.
"""

import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.errors import ConfigError, NormlabError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def say(self, *args, **kwargs) -> None:
        """``print`` on rank 0; the other ranks stay quiet."""
        if self.is_main:
            print(*args, **kwargs)


SINGLE = Ranks()  # one process: rank 0 of 1


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_ranks() -> Ranks:
    """The ranks of the initialized default process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_type(name: str) -> str:
    """The device type ``--device name`` asks for: ``auto`` is cuda where there is one, else
    cpu; cuda without one is a one-line error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available (try auto)")
    return name


def resolve_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """auto → cuda where there is one, else cpu; under several processes, one GPU per process."""
    name = device_type(name)
    if name == "cuda" and ranks is not None and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """Run torch's CPU operators on ``threads`` threads (None: torch's own choice)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def init_process_group(device: str) -> Ranks:
    """Join the run torchrun started: gloo on CPU, NCCL on CUDA (``device`` is auto|cpu|cuda)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_type(device) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)  # one GPU per process, before NCCL starts
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current_ranks()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, ranks: Ranks) -> slice:
    """This rank's contiguous rows of ``n``: sizes differ by at most one, the first ranks larger.

    >>> [shard(10, Ranks(r, 3)) for r in range(3)]
    [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    base, extra = divmod(n, ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return slice(start, start + base + (ranks.rank < extra))


def all_reduce_sum(t: Tensor, ranks: Ranks) -> Tensor:
    """``t`` summed over all ranks (in place; returned for chaining); a no-op on one process."""
    if ranks.distributed:
        dist.all_reduce(t)
    return t


def agree(error: NormlabError | None, ranks: Ranks) -> None:
    """Raise on every rank if any rank failed: the lowest failing rank's error, for rank 0 to say.

    For checks that every rank makes (run folder, configuration, data): without
    this, a rank that failed alone would leave the others waiting in their next
    collective.
    """
    if not ranks.distributed:
        if error is not None:
            raise error
        return
    mine = None if error is None else (str(error), error.exit_code)
    failed = [(r, e) for r, e in enumerate(gather_objects(mine, ranks)) if e is not None]
    if failed:
        rank, (message, exit_code) = failed[0]
        agreed = NormlabError(message if rank == 0 else f"[rank {rank}] {message}")
        agreed.exit_code = exit_code
        raise agreed


def global_outcome(loss: Tensor, interrupted: bool, ranks: Ranks) -> tuple[float, bool]:
    """The loss over the whole batch, and whether any process was interrupted.

    Every rank then takes the same decisions (stop on a NaN, checkpoint on
    Ctrl-C), so none is left waiting in a collective the others have left.
    """
    if not ranks.distributed:
        return loss.item(), interrupted
    flag = torch.tensor(float(interrupted), dtype=torch.float64, device=loss.device)
    shared = all_reduce_sum(torch.stack((loss.detach().double(), flag)), ranks)  # (2,)
    return shared[0].item(), bool(shared[1].item())


def gather_objects(obj, ranks: Ranks) -> list:
    """``obj`` from every rank, in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    everyone = [None] * ranks.world_size
    dist.all_gather_object(everyone, obj)
    return everyone


@torch.no_grad()
def broadcast_state(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers, in place, on every rank: what DDP's constructor does,
    for a step that sums gradients without DDP (``normlab.lm.compiled``). Ranks can start apart: an
    initialization that draws from each rank's own generator (LSUV's batches through
    dropout) scales each rank's weights differently."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t, src=0)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m normlab ARGV`` on ``nproc`` local processes through torch's launcher.

    The same as ``torchrun --standalone --nproc-per-node NPROC -m normlab ARGV``,
    except that a failed process is one line here, not the launcher's report.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: don't oversubscribe the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # the workers speak for themselves; the launcher's logging would repeat it as a wall of text
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "normlab", *argv)
    except SignalException as e:  # Ctrl-C: the workers got it too, saved and said so
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the root cause; the others were stopped
        if failure.exitcode < 0:  # killed by a signal: it could not say so itself
            name = signal.Signals(-failure.exitcode).name
            print(f"normlab: error: process {rank} of {nproc} was killed ({name})", file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode  # the process said why, in one line
    return 0


def describe_failure(e: BaseException) -> str:
    """One line for an unexpected error in one process of a run (its traceback would be one of
    a wall of them); NORMLAB_TRACEBACK=1 shows the traceback instead."""
    rank = os.environ.get("RANK", "0")  # the process group may be gone by now
    first = (str(e).strip().splitlines() or [""])[0]
    if any(s in first for s in ("Connection reset by peer", "Connection closed by peer")):
        return f"[rank {rank}] lost contact with another process of this run, which stopped"
    return f"[rank {rank}] {type(e).__name__}: {first[:300]}"
