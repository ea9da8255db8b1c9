"""Give the heap's freed pages back to the operating system between parts.

Why: scoring a part allocates and frees tens of megabytes of logits chunks per batch. glibc's
allocator keeps freed memory in its arenas, and once a long-lived allocation lands above it,
that memory is never returned: over hundreds of parts the resident set crept upward with the
corpus although nothing was kept. ``malloc_trim(0)`` releases every arena's free pages (not only
the heap's top), so the resident set after each part is what the run actually holds. Other C
libraries (macOS, musl) return memory differently; there this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time

# Trimming makes the next part's first allocations fault their pages in again (about 1 ms per
# 10,000 tokens of the demo model); at most once a second bounds that to a fraction of a percent.
MIN_INTERVAL_S = 1.0
_last_trim = [0.0]


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The C library the process already runs (dlopen of the program itself): no search.
        # ctypes.util.find_library would run `ldconfig -p` in a child process, mid-run, at the
        # first part's end.
        return ctypes.CDLL(None).malloc_trim  # glibc only; AttributeError elsewhere
    except (OSError, AttributeError):
        return None


def release_free_memory(force: bool = False) -> bool:
    """Return the allocator's free pages to the OS, at most once per `MIN_INTERVAL_S` unless
    ``force``; True when it did (glibc only)."""
    trim = _malloc_trim()
    now = time.monotonic()
    if trim is None or (not force and now - _last_trim[0] < MIN_INTERVAL_S):
        return False
    trim(0)
    _release_arrow_pool()
    _last_trim[0] = now
    return True


def _release_arrow_pool() -> None:
    """Arrow's allocator's cached free pages, back to the OS."""
    pyarrow = sys.modules.get("pyarrow")  # never the import's cost for a process that has not loaded it
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
