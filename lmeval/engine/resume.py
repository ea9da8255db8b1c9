"""What a rerun may reuse: the finished parts that pass their checks, and an older run's
parts set aside (never deleted) until the new run has scored.

A part is reused only if it is intact (its checksum) and belongs to this run (the identity
hash); anything else is named in a
warning, removed, and scored again, so one corrupt or foreign file never reaches a table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .lock import LOCK_NAME
from .parts import PartError, has_parts, roundtrip, verify_part

log = logging.getLogger(__name__)


def finished_plans(folder: Path, keys: list[str], idh: str, columns: bool = True) -> set[str]:
    """Keys among ``keys`` whose part in ``folder`` is present and passes every check
    (``columns`` False: every check but the checksum, which the merge makes as it reads a part)."""
    if not folder.is_dir():
        return set()
    wanted = set(keys)
    done = set()
    for path in sorted(folder.glob("*.parquet")):
        if path.stem not in wanted:
            continue  # not a part of this plan (the manifest check guards the plan itself)
        try:
            verify_part(path, idh, columns)
        except PartError as exc:
            log.warning("result part %s is not reused: %s. It will be scored again.", path, exc)
            path.unlink(missing_ok=True)
            continue
        done.add(path.stem)
    return done


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what a run
    that creates ``folder`` creates, and removes again if it fails before its first part."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


class ReplacedParts:
    """What a run changes in its folder before its first part, undone if it fails before one:
    the parts folder and manifest it creates, an older run's parts it sets aside (under
    --overwrite, those of another identity; under --fresh, any), and the output folder itself
    when the run created it. So a start that fails (a missing GPU, a bad `bos`) leaves the
    folder as it found it, and the corrected rerun is not refused as a partial run of another
    config. Set-aside parts are put back then, or dropped once the new run has finished.

    Made under the run lock, so nothing it sees missing belongs to another run."""

    def __init__(self, parts: Path, made_folders: list[Path] | None = None):
        self.parts = parts
        self.aside = parts.with_name(f".parts-replaced-{os.getpid()}")
        self.created = not parts.exists()
        made = list(made_folders or [])
        # Only the lock inside: no other run used the folder between its creation and the lock.
        self.made_folders = made if made and {p.name for p in made[0].iterdir()} <= {LOCK_NAME} else []

    def set_aside(self, identity: dict, always: bool = False) -> None:
        """Move the parts folder aside when its manifest names another identity, or ``always``."""
        if not self.parts.exists():
            return
        if not always:
            try:
                previous = json.loads((self.parts / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return
            if previous == roundtrip(identity):
                return
        os.replace(self.parts, self.aside)
        self.created = True

    def restore_if_nothing_scored(self) -> None:
        """Undo this run's changes to its folder when it wrote no part."""
        if has_parts(self.parts):
            return
        if self.created and self.parts.exists():
            shutil.rmtree(self.parts)
        if self.aside.exists():
            os.replace(self.aside, self.parts)
        if self.made_folders:
            shutil.rmtree(self.made_folders[0], ignore_errors=True)  # this run made it: all it holds is this run's
            for folder in self.made_folders[1:]:
                try:
                    folder.rmdir()  # only while empty: another process may have put something there since
                except OSError:
                    break

    def discard(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.aside)
