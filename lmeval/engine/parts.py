"""Result parts: the per-token arrays of a group of documents, written as soon as they exist.

A run dir holds ``parts/<model>/<key>.parquet``. Each part covers a fixed group of
documents, planned from the corpus alone (so it does not depend on batch size or on how many
processes score), and its key is a hash of the group's document ids: a part name never comes
from a document id, so no id can escape the run dir. Parts are written atomically, so a
killed run keeps every finished part and a rerun scores only the missing groups.
``parts/manifest.json`` records what the parts were computed from; resuming with a different
config, model or corpus is refused.

Parts prove themselves: each records a checksum of its columns and metadata, the hash of the run identity
it was scored for, and the protocol it was scored with. A part that is unreadable, truncated,
corrupted or foreign fails `verify_part`, and the run rescores it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError, option
from .files import atomic_write, write_json, write_parquet

META_KEY = b"lmeval"
# A part is written in row groups of this many rows: the writer encodes one group at a time, so
# a 106k-token part's write holds 8 MB beside its columns instead of 22 MB (and is no slower),
# on the writer thread while scoring goes on. Parts are read whole, so nothing else changes.
PART_ROW_GROUP_ROWS = 16384


def plan_groups(texts_chars: list[int], part_chars: int) -> list[list[int]]:
    """Consecutive document indices grouped until each group holds >= ``part_chars`` characters."""
    groups, current, size = [], [], 0
    for i, n_chars in enumerate(texts_chars):
        current.append(i)
        size += n_chars
        if size >= part_chars:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def part_key(doc_ids: list) -> str:
    """A file-safe name for a group: a hash of its document ids (never the ids themselves)."""
    text = json.dumps([str(d) for d in doc_ids], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def model_dirname(name: str) -> str:
    """A model's folder under parts/: its name made file-safe, plus a hash to keep it unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return f"{safe[:48]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class PartError(Exception):
    """A part that cannot be trusted; the message says why. Internal: the run rescores it."""


def write_part(path: Path, columns: dict[str, np.ndarray], meta: dict) -> None:
    """Write one part: 1-D columns as they are, (N, K) columns as ``name.k``, ``meta`` (with
    the columns' checksum added) in the schema."""
    arrays = {}
    for name, values in columns.items():
        if values.ndim == 2:
            for k in range(values.shape[1]):
                arrays[f"{name}.{k}"] = values[:, k]
        else:
            arrays[name] = values
    meta = {**meta, "checksum": part_checksum(arrays, meta)}
    table = pa.table(arrays).replace_schema_metadata({META_KEY: json.dumps(meta, default=_plain).encode("utf-8")})
    atomic_write(path, lambda tmp: write_parquet(table, tmp, PART_ROW_GROUP_ROWS))


def part_checksum(arrays: dict[str, np.ndarray], meta: dict) -> str:
    """sha256 over the columns (`columns_checksum`) and every metadata field but the checksum
    itself. Why the metadata too: the merge reads the per-document sums (``nll_sum``,
    ``n_tokens``, ``n_bytes``, ``n_words``, ...) and ``doc_ids`` from it, not from the columns,
    so one flipped bit there would change a table while the columns still pass."""
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(fields, sort_keys=True, default=_plain, allow_nan=True).encode("utf-8")
    return hashlib.sha256(columns_checksum(arrays).encode("ascii") + b"\0" + text).hexdigest()


def columns_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every column's name, kind and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        values = np.asarray(arrays[name])
        data = (
            "\0".join(map(str, values)).encode("utf-8")
            if values.dtype == object
            else np.ascontiguousarray(values).tobytes()
        )
        for piece in (name.encode("utf-8"), values.dtype.kind.encode(), data):
            digest.update(len(piece).to_bytes(8, "little") + piece)
    return digest.hexdigest()


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


# What reading a damaged footer or its metadata raises: the part is unreadable.
_FOOTER_ERRORS = (OSError, ValueError, KeyError, TypeError, pa.ArrowException)


def read_meta(path: Path) -> dict:
    """A part's metadata; `PartError` when the file or its metadata cannot be read."""
    try:
        return _meta_of(pq.read_schema(path))
    except _FOOTER_ERRORS as exc:
        raise _unreadable(exc) from None


def _meta_of(schema: pa.Schema) -> dict:
    return json.loads(schema.metadata[META_KEY])


def _unreadable(exc: Exception) -> PartError:
    return PartError(f"unreadable ({type(exc).__name__}: {exc})")


def read_part(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A part's columns (``name.k`` re-stacked into (N, K) arrays) and metadata, after checking
    its checksum; `PartError` when it is unreadable, truncated or corrupted."""
    try:
        parquet = pq.ParquetFile(path)  # its footer parsed once, for the metadata and the columns
        meta = _meta_of(parquet.schema_arrow)
    except _FOOTER_ERRORS as exc:
        raise _unreadable(exc) from None
    try:
        # A column at a time: one column's Arrow buffers beside the arrays, never the whole table's
        # (its row groups are copied into one array per column either way).
        flat = {
            name: parquet.read(columns=[name]).column(0).to_numpy(zero_copy_only=False)
            for name in parquet.schema_arrow.names
        }
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _unreadable(exc) from None
    if part_checksum(flat, meta) != meta.get("checksum"):
        raise PartError("its checksum does not match its columns and metadata (corrupted)")
    return _stack(flat), meta


def verify_part(path: Path, identity_hash: str, columns: bool = True) -> dict:
    """A part's metadata; `PartError` unless ``path`` is intact and was scored for this run
    (``identity_hash``: the same config, models and data). ``columns`` False reads the
    metadata alone (the file's footer) and leaves the checksum to whoever reads the columns."""
    meta = read_part(path)[1] if columns else read_meta(path)
    if meta.get("identity") != identity_hash:
        raise PartError("it was scored for another run (another config, protocol, model or corpus)")
    return meta


def read_columns(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read a part's columns back (checked), re-stacking ``name.k`` columns into (N, K) arrays."""
    stacked, _ = read_part(path)
    return stacked if names is None else {k: stacked[k] for k in names if k in stacked}


def _stack(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, Any] = {}  # a column, or the list of a family's columns name.0, name.1, ...
    for name, values in flat.items():
        base, _, k = name.rpartition(".")
        if base and k.isdigit():
            out.setdefault(base, []).append(values)
        else:
            out[name] = values
    return {k: (np.stack(v, axis=1) if isinstance(v, list) else v) for k, v in out.items()}


def open_parts(run_dir: Path, identity: dict, fresh: bool) -> Path:
    """The parts folder of a run, checked against (or stamped with) the run's identity."""
    parts = run_dir / "parts"
    manifest = parts / "manifest.json"
    if fresh and parts.exists():
        shutil.rmtree(parts)
    if not manifest.exists() and has_parts(parts):
        raise OutputError(
            f"output.dir: {parts} holds result parts but no manifest.json, so nothing says what they were "
            f"scored from. Rerun with {option('fresh')} to discard them, or restore the manifest."
        )
    if manifest.exists():
        previous = read_manifest(manifest)
        changed = [key for key in identity if previous.get(key) != roundtrip(identity[key])]
        if changed:
            raise OutputError(
                f"output.dir: {run_dir} holds a partial run made with a different {', '.join(changed)}. "
                f"Rerun with {option('fresh')} to discard it and start over, or choose another `output.dir`."
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        write_json(identity, manifest)
    return parts


def read_manifest(manifest: Path) -> dict:
    """The identity a parts folder was stamped with; `OutputError` when the file is damaged
    (cut short by a full disk or a copy, or edited), since nothing then says what the parts are."""
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise OutputError(
            f"output.dir: {manifest} must be the JSON record of what the finished parts were scored from, and it "
            f"cannot be read ({reason}). Rerun with {option('fresh')} to discard the finished parts and start over."
        ) from None
    if not isinstance(previous, dict):
        raise OutputError(
            f"output.dir: {manifest} must hold a JSON object (got {type(previous).__name__}). "
            f"Rerun with {option('fresh')} to discard the finished parts and start over."
        )
    return previous


def has_parts(parts: Path) -> bool:
    """Whether a parts folder holds any finished part: a model's, or a divergence pair's
    (those sit one level deeper, under ``divergence/<baseline>/<model>/``)."""
    return any(parts.rglob("*.parquet"))


def roundtrip(value):
    """The value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=_plain))


def finished_keys(folder: Path) -> set[str]:
    """Keys of parts already written completely (temporary files are ignored)."""
    return {p.stem for p in folder.glob("*.parquet")} if folder.exists() else set()


def identity_hash(identity: dict) -> str:
    """The run identity as one hash, recorded in every part."""
    return hashlib.sha256(json.dumps(roundtrip(identity), sort_keys=True).encode("utf-8")).hexdigest()
