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

The shards of one run (`lmeval run --shard I/N`, separate processes, perhaps on separate
nodes) each hold the lock shared: they write disjoint parts and never merge or clean up
while holding it, so they run side by side, while a plain run or `lmeval merge` (exclusive)
is refused as long as any shard holds it, and a shard is refused while either runs. The last
shard to let go removes the file (it finds it can take the lock exclusively). flock over NFS
is emulated with byte-range locks on Linux; on a file system without locks the shards still
write disjoint parts, and the merge still checks every part.
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

    def __init__(self, folder: Path, shared: bool = False, role: str | None = None):
        """``shared``: a shard's lock, held beside the other shards'; ``role`` names the
        holder in the message another run gets (``shard 0/2``)."""
        self.path = Path(folder) / LOCK_NAME
        self.shared, self.role = shared, role
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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
        if self.role:
            record["role"] = self.role
        os.ftruncate(fd, 0)  # shards sharing the lock: the record names the latest one
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.shared:
                try:  # the last shard holding it (no other holder) removes the file; the others leave it
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # the finally closes the descriptor, which drops this shard's hold
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
    role = f"{record['role']}, " if record.get("role") else ""
    return f"{role}pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
