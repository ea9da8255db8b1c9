"""One run per output folder: an advisory lock held for the whole of `lmeval run`.

Two runs on one ``output.dir`` would each score and overwrite the other's parts, and the
survivor's tables would mix two protocols. So the process that owns a run folder holds an
exclusive ``flock`` on ``output.dir/.lmeval.lock`` from start to finish; a second run is
refused at once, naming the holder. The kernel drops the lock when its process dies, so a
lock left by a killed run (SIGKILL, a crash) is simply taken over by the next run: the file
may still name the dead holder, but nobody holds the lock on it. A finished run removes the
file; a run that locked a file which was removed meanwhile (by a holder that just finished)
tries again on the new one, so two runs never hold two different files. Ranks of one
torchrun / accelerate job share the lock of their rank 0 (only rank 0 takes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import OutputError

LOCK_NAME = ".lmeval.lock"


class RunLock:
    """An exclusive advisory lock on a run folder; use as a context manager."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"output.dir: {self.path.parent} is in use by another lmeval run ({holder}). "
                    "Wait for it to finish, or give this run another `output.dir`."
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file its holder removed on finishing: lock the current one
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: see the module docstring
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """Who holds the lock, from the record it wrote: pid, host and start time."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "holder unknown"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
