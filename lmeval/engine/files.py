"""Files of a run: the output folder, atomic writes, JSON, and the streamed token table.

Every file is written to a temporary name beside its target and renamed into place, so a
crash or a full disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError, option
from .schemas import schema_for, table_name, to_arrow

# Every file `lmeval run` may write; --overwrite removes exactly these, nothing else.
OUTPUT_FILES = (
    "tokens.parquet",
    "documents.parquet",
    "documents.csv",
    "summary.csv",
    "calibration.csv",
    "temperature.csv",
    "compare.csv",
    "compare_tokens.csv",
    "compare_documents.csv",
    "reliability.png",
    "checkpoints.png",
    "report.html",
    "run.json",
    "divergence.parquet",
    "divergence.csv",
    "divergence_tokens.csv",
    "divergence.png",
    "positions.csv",
    "positions.png",
    "words.parquet",
    # the token tables under output.tokens_layout: dataset (a folder of one file per part)
    "tokens",
    "divergence",
    "words",
)


def prepare_output_dir(path: str, overwrite: bool) -> Path:
    """Create the run dir. A finished run (it has results) is never replaced unless
    ``overwrite``; an interrupted one (it has parts/, no run.json) is left for `run` to resume.
    Nothing is deleted here: old results are replaced only when the new ones are written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output.dir: {out} is a file, not a folder. Choose another `output.dir`.")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    interrupted = (out / "parts").is_dir() and not (out / "run.json").exists()
    if existing and not (overwrite or interrupted):
        raise OutputError(
            f"output.dir: {out} already holds results ({', '.join(existing)}). "
            f"Pass {option('overwrite')} to replace them, or choose another `output.dir`."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lmeval-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output.dir: cannot write to {out} ({exc.strerror}). Check its permissions.") from exc
    return out


def clean_leftovers(out: Path) -> None:
    """Remove what a killed run left behind: temporary files of interrupted atomic writes, and
    parts an --overwrite had set aside. Called under the run lock, so no other run owns them."""
    leftovers = [*out.glob(".*.tmp-*"), *out.glob(".*.old-*"), *out.glob("parts/**/.*.tmp-*")]
    for path in [*leftovers, *out.glob(".lmeval-write-test*")]:
        _remove(path)
    for folder in out.glob(".parts-replaced-*"):
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def replace_outputs(out: Path):
    """Replace a folder's previous results with the ones written inside the block.

    run.json goes first, so that a kill mid-way leaves an interrupted run (parts, no
    run.json), which a rerun merges again; each table is then replaced by its atomic write;
    and previous files this run did not rewrite are removed at the end."""
    before = {name: _stamp(out / name) for name in OUTPUT_FILES if (out / name).exists()}
    (out / "run.json").unlink(missing_ok=True)
    yield
    for name, stamp in before.items():
        if name != "run.json" and _stamp(out / name) == stamp:
            _remove(out / name)


def _remove(path: Path) -> None:
    """A file, or a folder (a token dataset, or its temporary build) with what it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _stamp(path: Path):
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary name, then rename: a crash or a full
    disk never leaves a half-written file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_failed(path: Path, exc: OSError) -> OutputError:
    """The error of a write that failed, with its fix."""
    return OutputError(f"{path}: could not be written ({exc.strerror or exc}). {write_fix(path, exc)}")


def write_fix(path: Path, exc: OSError) -> str:
    """The fix for a failed write, by its cause: a missing folder is not a full disk."""
    if not path.parent.is_dir():  # pandas says so without an errno
        return f"Its folder {path.parent} does not exist: create it, or choose another path."
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space, or write somewhere with room."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Fix the permissions of {path.parent}, or choose another path."
    return "Check the path, its permissions and the free disk space."


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns parquet should dictionary-encode: text (model, doc_id, token), whose values
    repeat. pyarrow's default tries every column; on the float and position columns of a part
    that tripled the write time and made the file larger (an 89k-token part: 77 -> 25 ms,
    7.4 -> 6.3 MB), work on the writer thread that competes with scoring."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def write_parquet(table: pa.Table, tmp: Path, row_group_rows: int | None = None) -> None:
    """One parquet file, dictionary encoding where values repeat (`dictionary_columns`);
    ``row_group_rows``: rows per row group (None: pyarrow's default, one group up to 1M rows)."""
    pq.write_table(table, tmp, use_dictionary=dictionary_columns(table.schema), row_group_size=row_group_rows)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """A table as parquet (under its schema in `schemas`, when it has one) or CSV, atomically."""
    if path.suffix == ".parquet":
        schema = schema_for(path, list(frame.columns))
        table = to_arrow(frame, schema) if schema is not None else pa.Table.from_pandas(frame, preserve_index=False)
        atomic_write(path, lambda tmp: write_parquet(table, tmp))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_figure(fig, path: Path) -> None:
    """A matplotlib Figure as a PNG, atomically (the analyses draw, the engine writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


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

    def __init__(self, path: Path, schema: pa.Schema | None = None, table: str | None = None):
        self.path = path
        self.table = table or table_name(path)  # whose schema the rows take (a dataset's part file: its table's)
        self.schema = schema  # None: the file's schema, with the optional columns of the first rows
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer: pq.ParquetWriter | None = None
        self.n_rows = 0  # rows written so far: the next write's first row

    def write(self, frame: pd.DataFrame) -> tuple[Path, int, int]:
        """Append ``frame``; returns where its rows will be once closed: (file, first row, stop)."""
        table = self._arrow(frame)
        try:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, self.schema, use_dictionary=dictionary_columns(self.schema))
            self.writer.write_table(table)
        except OSError as exc:
            raise write_failed(self.path, exc) from exc
        self.n_rows += len(frame)
        return self.path, self.n_rows - len(frame), self.n_rows

    def _arrow(self, frame: pd.DataFrame) -> pa.Table:
        """``frame`` under the table's schema, settled by the first rows (their attrs become the
        file's, which pandas reads back)."""
        if self.schema is None:
            schema = schema_for(Path(self.table), list(frame.columns))
            assert schema is not None, f"{self.table} has no schema in lmeval.engine.schemas"
            attrs = {PANDAS_ATTRS: json.dumps(frame.attrs, default=_json_default)} if frame.attrs else None
            self.schema = schema.with_metadata(attrs) if attrs else schema
        return to_arrow(frame, self.schema)

    def abort(self) -> None:
        """Give up: close and remove the temporary file."""
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: could not be written ({exc.strerror}).") from exc


class TokenDataset(TokenWriter):
    """Streams a token table into a folder of parquet files, one per call (a part's rows): a
    dataset that pandas, pyarrow, polars, DuckDB and Spark read as one table, in the file
    names' order, which is the rows' order. The folder is built under a hidden temporary name
    (readers skip names starting with a dot) and renamed into place on close."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        super().__init__(path, schema)
        self.n_files = 0

    def write(self, frame: pd.DataFrame) -> tuple[Path, int, int]:
        table = self._arrow(frame)
        name = f"part-{self.n_files:06d}.parquet"
        try:
            self.tmp.mkdir(exist_ok=True)
            write_parquet(table, self.tmp / name)
        except OSError as exc:
            raise write_failed(self.path, exc) from exc
        self.n_files += 1
        self.n_rows += len(frame)
        return self.path / name, 0, len(frame)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> None:
        if not self.n_files:
            return
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        try:
            if self.path.exists():  # a previous run's folder (--overwrite): set aside, then dropped
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: could not be written ({exc.strerror}).") from exc
        shutil.rmtree(old, ignore_errors=True)


# Above this many characters (about 10^8 tokens at ~4 characters a token, a single file of a
# few GB), `output.tokens_layout: auto` writes each token table as a folder of one file per part.
TOKENS_DATASET_ABOVE_CHARS = 400_000_000


def token_layout(setting: str, n_chars: int | None) -> tuple[str, str]:
    """("file" | "dataset", why) for ``output.tokens_layout`` on a corpus of ``n_chars``
    characters (None: a stream, whose size is unknown until it is read)."""
    if setting != "auto":
        return setting, f"output.tokens_layout: {setting}"
    if n_chars is None:
        return "dataset", "auto: a streamed corpus, whose size is unknown before it is read"
    relation = "above" if n_chars > TOKENS_DATASET_ABOVE_CHARS else "at most"
    return (
        "dataset" if n_chars > TOKENS_DATASET_ABOVE_CHARS else "file",
        f"auto: the corpus holds {n_chars:,} characters, {relation} {TOKENS_DATASET_ABOVE_CHARS:,}",
    )


def token_writer(out: Path, name: str, layout: str) -> TokenWriter:
    """The writer of token table ``name`` (e.g. tokens.parquet): one file, or a folder named
    without the suffix (tokens/) under the dataset layout."""
    return TokenDataset(out / Path(name).stem) if layout == "dataset" else TokenWriter(out / name)


def token_table(out: Path, name: str) -> Path | None:
    """Where a run folder holds token table ``name``: the file, its dataset folder, or None."""
    for path in (out / name, out / Path(name).stem):
        if path.exists():
            return path
    return None


PANDAS_ATTRS = b"PANDAS_ATTRS"  # where pandas keeps a DataFrame's attrs in parquet


def rewrite_table(path: Path, transform) -> None:
    """Map ``transform`` over a streamed table's row groups (each a DataFrame with the file's
    attrs) into a new file renamed over it: an analysis's second pass, a row group in memory
    at a time. A dataset folder (`TokenDataset`) is rewritten file by file."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.exists() else []
    for file in files:
        _rewrite_file(file, transform, table_name(path))


def _rewrite_file(path: Path, transform, table_name: str) -> None:
    source = pq.ParquetFile(path)
    stored = (source.schema_arrow.metadata or {}).get(PANDAS_ATTRS)
    writer = TokenWriter(path, table=table_name)
    try:
        for i in range(source.num_row_groups):
            frame = source.read_row_group(i).to_pandas()
            frame.attrs = json.loads(stored) if stored else {}
            writer.write(transform(frame))
        writer.close()
    except BaseException:
        writer.abort()
        raise
