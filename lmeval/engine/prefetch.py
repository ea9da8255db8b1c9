"""Overlap a run's host work with scoring: tokenize the next part and write the last one while
the current one is scored.

Both run in one background thread each; the writer's thread also folds each part it wrote
into the run's merge, in order, so the analyses' per-part work is off the scoring thread too.
The tokenizer (Rust) and the parquet writer (Arrow, C++) release the GIL, so they proceed
while the model runs. Parts are still written in order and atomically; `close` waits for
every write, so when `score_parts` returns every part is on disk and merged, and an error in
a background step is raised there, never lost.

The two threads run at a lower scheduling priority (`BACKGROUND_NICENESS`, Linux only): on
a CPU the model's intra-op threads wait for each other at every parallel region, so a
background thread that takes a core from one of them stalls them all. Niced, it runs on the
cycles the model leaves (its work is a few percent of a part's), and never competes with it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
BACKGROUND_NICENESS = 10  # CFS weight 110 against the model's 1024: ~10% of a core when both want it


def _lower_priority() -> None:
    """Lower the calling thread's priority (a Linux thread is scheduled as its own task)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):  # a container that forbids it: the normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


def background_pool(name: str) -> ThreadPoolExecutor:
    """One niced worker thread (``name`` in thread listings)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lower_priority)


def prefetched(items: list[T], prepare: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Yield ``(item, prepare(item))`` in order, preparing item i + 1 while item i is used."""
    if not items:
        return
    with background_pool("lmeval-prefetch") as pool:
        pending = pool.submit(prepare, items[0])
        for i, item in enumerate(items):
            ready = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(prepare, items[i + 1])
            yield item, ready


class BackgroundWriter:
    """Runs writes one at a time, in order, off the scoring thread. Use as a context manager:
    leaving it waits for every write and re-raises the first error.

    At most ``max_pending`` writes wait: the next `submit` waits for the oldest, so a writer
    slower than scoring (a slow disk, a busy machine starving the niced thread) holds a few
    parts in memory, never a queue that grows with the corpus."""

    def __init__(self, max_pending: int = 2):
        self._pool = background_pool("lmeval-writer")
        self._futures: list[Future] = []
        self.max_pending = max_pending

    def submit(self, fn: Callable, *args) -> None:
        self._raise_finished()
        while len(self._futures) >= self.max_pending:
            self._futures.pop(0).result()
        self._futures.append(self._pool.submit(fn, *args))

    def _raise_finished(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
