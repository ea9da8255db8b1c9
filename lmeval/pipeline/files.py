"""Files of a run: the output folder, atomic writes, JSON, and the streamed token table.

Every file is written to a temporary name beside its target and renamed into place, so a
crash or a full disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from .schemas import schema_for, to_arrow

# Every file `lmeval run` may write; --overwrite removes exactly these, nothing else.
OUTPUT_FILES = (
    "tokens.parquet", "documents.parquet", "documents.csv", "summary.csv", "calibration.csv",
    "temperature.csv", "compare.csv", "compare_tokens.csv", "compare_documents.csv", "reliability.png", "checkpoints.png", "run.json",
    "positions.csv", "positions.png",
)  # fmt: skip


def prepare_output_dir(path: str, overwrite: bool) -> Path:
    """Create the run dir. A finished run (it has run.json) is never replaced unless
    ``overwrite``; an interrupted one (it has parts/) is left for `run` to resume."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output.dir: {out} is a file, not a folder. Choose another `output.dir`.")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    interrupted = (out / "parts").is_dir() and not (out / "run.json").exists()
    if existing and not (overwrite or interrupted):
        raise OutputError(
            f"output.dir: {out} already holds results ({', '.join(existing)}). "
            "Pass --overwrite to replace them, or choose another `output.dir`."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in existing:  # replaced on request, or left half-done by an interrupted run
            (out / name).unlink()
        probe = out / ".lmeval-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output.dir: cannot write to {out} ({exc.strerror}). Check its permissions.") from exc
    return out


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary name, then rename: a crash or a full
    disk never leaves a half-written file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not be written ({exc.strerror or exc}). Free disk space or fix permissions.") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """A table as parquet (under its schema in `schemas`, when it has one) or CSV, atomically."""
    if path.suffix == ".parquet":
        schema = schema_for(path, list(frame.columns))
        table = to_arrow(frame, schema) if schema is not None else pa.Table.from_pandas(frame, preserve_index=False)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_json(data: dict, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (Path, tuple, set)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class TokenWriter:
    """Streams token tables into one parquet file, a row group per call, so the per-token
    rows of a large corpus never sit in memory together. Renamed into place on close."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        self.path = path
        self.schema = schema or schema_for(path)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = None

    def write(self, frame: pd.DataFrame) -> None:
        table = to_arrow(frame, self.schema)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: could not be written ({exc.strerror}).") from exc
