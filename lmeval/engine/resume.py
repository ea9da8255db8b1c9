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

from .parts import PartError, has_parts, roundtrip, verify_part

log = logging.getLogger(__name__)


def finished_plans(folder: Path, keys: list[str], idh: str) -> set[str]:
    """Keys among ``keys`` whose part in ``folder`` is present and passes every check."""
    if not folder.is_dir():
        return set()
    wanted = set(keys)
    done = set()
    for path in sorted(folder.glob("*.parquet")):
        if path.stem not in wanted:
            continue  # not a part of this plan (the manifest check guards the plan itself)
        try:
            verify_part(path, idh)
        except PartError as exc:
            log.warning("result part %s is not reused: %s. It will be scored again.", path, exc)
            path.unlink(missing_ok=True)
            continue
        done.add(path.stem)
    return done


class ReplacedParts:
    """Under --overwrite, an older run's parts of another identity are moved aside, not
    deleted: if the new run fails before it scores anything, they are put back; once it has
    finished, they are dropped."""

    def __init__(self, parts: Path, overwrite: bool = False):
        self.parts = parts
        self.aside = parts.with_name(f".parts-replaced-{os.getpid()}")
        self.created = overwrite and not parts.exists()  # only --overwrite undoes its changes

    def set_aside_if_foreign(self, identity: dict) -> None:
        manifest = self.parts / "manifest.json"
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if previous != roundtrip(identity):
            os.replace(self.parts, self.aside)
            self.created = True

    def restore_if_nothing_scored(self) -> None:
        """Undo this run's changes to the parts folder when it wrote no part."""
        if has_parts(self.parts) or not self.created:
            return
        if self.parts.exists():
            shutil.rmtree(self.parts)
        if self.aside.exists():
            os.replace(self.aside, self.parts)

    def discard(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.aside)
