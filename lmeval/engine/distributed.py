"""Data-parallel scoring: which process this is, and which part groups it scores.

``torchrun`` and ``accelerate launch`` start one process per device and describe the job in
environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Each process scores a share of the corpus's part groups and writes their
parts into the shared run dir; rank 0 alone prepares the run dir and merges the parts into
the tables. Parts are keyed by document group, never by rank, so a run resumes with any
number of processes.

The process group only coordinates: barriers and a few small Python objects (an error, the
list of unfinished groups). Per-token results travel through the file system, so the run
dir must be on a file system that every rank can see.

Ranks that finish early wait for the slowest rank and for rank 0's merge; they give up
after ``LMEVAL_DIST_TIMEOUT_S`` seconds (12 hours by default). An error raised on one rank
is raised on every rank (`Context.call`), so none waits for a rank that has failed.

A single process (``WORLD_SIZE`` unset or 1) creates no process group, and `Context`'s
methods are then plain function calls.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar, cast

from ..errors import LmevalError

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT_ENV = "LMEVAL_DIST_TIMEOUT_S"
# Ranks that finish early wait for the slowest one and then for rank 0's merge; gloo's
# default of 30 minutes would kill a long run whose shares are uneven.
DEFAULT_TIMEOUT_S = 12 * 3600


class LaunchError(LmevalError):
    """The launcher's environment does not describe a usable process group."""


class RankFailed(RuntimeError):
    """Another rank raised an error that is not an `LmevalError` (a bug); its traceback is in its log."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """Read the job's shape from ``torchrun`` / ``accelerate launch`` variables; no launcher = one process."""
    env = os.environ if environ is None else environ
    world_size = _env_int(env, "WORLD_SIZE", default=1, minimum=1)
    if world_size == 1:
        return Launch()
    rank = _env_int(env, "RANK", default=None, minimum=0)
    if rank >= world_size:
        raise LaunchError(f"RANK: must be below WORLD_SIZE={world_size} (got {rank}). {_LAUNCH_HINT}")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key)]
    if missing:
        raise LaunchError(
            f"{', '.join(missing)}: must be set when WORLD_SIZE={world_size} (got nothing). "
            f"{_LAUNCH_HINT}, which set them, or unset WORLD_SIZE."
        )
    return Launch(rank, world_size, _env_int(env, "LOCAL_RANK", default=rank, minimum=0))


_LAUNCH_HINT = "Start the job with torchrun or accelerate launch"


def _env_int(env: Mapping[str, str], key: str, default: int | None, minimum: int, hint: str = _LAUNCH_HINT) -> int:
    text = env.get(key)
    if text is None or text == "":
        if default is None:
            raise LaunchError(f"{key}: must be set by the launcher (got nothing). {hint}.")
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise LaunchError(f"{key}: must be an integer >= {minimum} (got {text!r}). {hint}.")
    return value


class Context:
    """This process's place in the job, and the few collectives a run needs.

    With one process every method is a plain local call, so code written against a
    `Context` runs unchanged without a launcher.
    """

    def __init__(self, launch: Launch):
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a small picklable Python object)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return cast(T, box[0])  # rank 0's obj, now on every rank

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def call(self, fn: Callable[[], T], *, main_only: bool = False) -> T | None:
        """Run ``fn`` on every rank (on rank 0 alone with ``main_only``), then wait for all ranks.

        If ``fn`` raised on any rank, every rank raises: the same `LmevalError` (so each prints
        the same message), or `RankFailed` pointing at the rank whose traceback tells the
        story. No rank is left waiting for one that failed. Ranks that did not run ``fn``
        get None.
        """
        if self.world_size == 1:
            return fn()
        result, failure = None, None
        if self.is_main or not main_only:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, after every rank has heard of it
                failure = exc
        failures = self.gather(_shareable(failure, self.rank))
        if failure is not None:
            raise failure
        first = next((f for f in failures if f is not None), None)
        if first is not None:
            raise first
        return result


def _shareable(exc: Exception | None, rank: int) -> Exception | None:
    """``exc`` as another rank can receive it: user errors travel whole, bugs as a pointer."""
    if exc is None:
        return None
    if isinstance(exc, LmevalError):
        try:
            return pickle.loads(pickle.dumps(exc))  # a traceback never pickles; its message does
        except Exception:  # an attribute that does not pickle: the message is what matters
            return LmevalError(str(exc))
    return RankFailed(f"rank {rank} failed with {type(exc).__name__}: {exc}. See that rank's traceback above.")


@contextlib.contextmanager
def launched(environ: Mapping[str, str] | None = None) -> Iterator[Context]:
    """The job's `Context`; joins (and afterwards leaves) the process group a launcher set up.

    A process group that already exists (a script that initialised one itself) is used as
    it is and left open. Ranks other than 0 log lmeval's messages at WARNING and above only.
    """
    launch = _existing_group() or launch_from_env(environ)
    if launch.world_size == 1:
        yield Context(launch)
        return
    import torch.distributed as dist

    logger = logging.getLogger("lmeval")
    level = logger.level
    if launch.rank != 0 and logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    created = not dist.is_initialized()
    clean = False
    try:
        if created:
            _init_process_group(launch)
        yield Context(launch)
        clean = True
    finally:
        logger.setLevel(level)
        if created and dist.is_initialized():
            _leave(dist, clean)


def _leave(dist, clean: bool) -> None:
    """Destroy the process group. After a clean run, first meet every rank at a barrier (no
    rank tears down while a peer is still in the last collective) and drop finished work
    objects, which can hold tensors that gloo's threads would release during shutdown."""
    if clean:
        dist.barrier()
        gc.collect()
    dist.destroy_process_group()


def _existing_group() -> Launch | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    return Launch(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def _init_process_group(launch: Launch) -> None:
    """gloo on CPU; on CUDA, nccl for CUDA tensors and gloo for the small objects we exchange.

    The coordination objects live in CPU memory, so gloo carries them and long waits never
    sit in an NCCL collective; each rank's default CUDA device is its ``LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():
        n_devices = torch.cuda.device_count()
        if launch.local_rank >= n_devices:
            raise LaunchError(
                f"LOCAL_RANK: must be below the number of visible GPUs ({n_devices}) (got {launch.local_rank}). "
                "Start at most one process per GPU (--nproc_per_node / --num_processes)."
            )
        torch.cuda.set_device(launch.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    timeout = _env_int(os.environ, TIMEOUT_ENV, DEFAULT_TIMEOUT_S, minimum=1, hint="Give seconds, or unset it")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    log.info("rank %d of %d (local rank %d), backend %s", launch.rank, launch.world_size, launch.local_rank, backend)


def assign(groups: Sequence, weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Share ``groups`` among ``world_size`` ranks so each gets about the same total weight.

    The weight is the work a group costs (its documents' characters, a stand-in for
    tokens): balancing by group count would leave the rank with one huge document scoring
    long after the others are done. Longest-processing-time greedy: groups in order of
    decreasing weight, each to the least-loaded rank (ties: lower group index first, lower
    rank first), so every rank computes the same answer. Returns, per rank, the indices into
    ``groups`` it scores, in increasing order; ranks beyond the number of groups get none.
    """
    if world_size < 1:
        raise ValueError(f"assign: world_size must be >= 1 (got {world_size}).")
    if len(weights) != len(groups):
        raise ValueError(f"assign: weights must have one entry per group (got {len(weights)} for {len(groups)}).")
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(groups)), key=lambda i: (-weights[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (load + weights[index], rank))
    return [sorted(share) for share in shares]
