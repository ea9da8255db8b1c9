"""A corpus's columns read batch by batch or at given rows, without keeping the corpus resident.

Why: `datasets` memory-maps its Arrow cache for as long as the dataset lives, and every page
read through that map stays in the process's resident set until the map is closed. A run
reads every text once to validate it and once to score it, so the whole cache ended up
resident (119 MB for a corpus of 124M characters), and a run's memory grew with its corpus.
`MappedSource` keeps only where each record batch lies in the cache files and maps a file
for one read at a time: the pages a read touched leave the process when it returns (the
kernel keeps them in its page cache, which is shared and reclaimable, not the process's).

A table that is not a plain memory-mapped cache (a dataset held in memory, or one whose
columns `datasets` renames or casts when it loads them) is read through its own chunks
(`TableSource`), as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Transforms `datasets` replays on a memory-mapped table that leave every kept column's
# values and rows as the file stores them; any other (a rename, a cast, a slice) falls back.
_VALUE_KEEPING_REPLAYS = frozenset({"replace_schema_metadata", "select", "drop", "remove_column"})


class TableSource:
    """The columns of a `pyarrow.Table` already open (in memory, or mapped by `datasets`)."""

    def __init__(self, table):
        self.table = table

    def batches(self, names: list[str], max_rows: int) -> Iterator[tuple[int, object]]:
        """``(first row, record batch)`` over the columns ``names``, at most ``max_rows`` rows each."""
        start = 0
        for batch in self.table.select(names).to_batches(max_chunksize=max_rows):
            yield start, batch
            start += batch.num_rows

    def column(self, name: str, decode=None) -> ChunkedColumn:
        return ChunkedColumn(self.table.column(name).chunks, decode)


class ChunkedColumn:
    """One column read at given rows without concatenating its chunks, as Python values
    decoded as ``dataset[name]`` decodes them (``decode``).

    Why: ``ChunkedArray.take`` costs time in the number of chunks (10 ms for 1,000 chunks) on
    every call; resolving rows to chunks here costs only the rows asked for.
    """

    def __init__(self, chunks, decode=None):
        self.chunks, self.decode = [c for c in chunks if len(c)], decode
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks], dtype=np.int64)

    def fetch(self, rows: np.ndarray) -> list:
        """The Python values at ``rows``."""
        values: list = []
        for c, local in _runs_by_chunk(self.starts, rows):
            values.extend(_values_at(self.chunks[c], local))
        return self.decode(values) if self.decode is not None else values


@dataclass(frozen=True)
class _Batch:
    """Where one record batch lies: its file, its message's byte offset, its first row."""

    path: str
    offset: int
    start: int


class MappedSource:
    """The columns of `datasets` cache files (Arrow IPC streams), each file mapped for one read."""

    def __init__(self, paths: list[str]):
        import pyarrow as pa

        self.schemas: dict[str, Any] = {}  # path -> pyarrow.Schema
        self.record_batches: list[_Batch] = []
        start = 0
        for path in paths:
            with pa.memory_map(path) as source:
                reader = pa.ipc.MessageReader.open_stream(source)
                schema = self.schemas[path] = pa.ipc.read_schema(reader.read_next_message())
                for offset, n_rows in _batch_messages(source, reader, schema):
                    self.record_batches.append(_Batch(path, offset, start))
                    start += n_rows
        self.n_rows = start
        self.starts = np.array([b.start for b in self.record_batches] + [start], dtype=np.int64)

    def read(self, index: int, names: list[str]):
        """Record batch ``index``, its columns ``names``; the file is unmapped once the batch's
        buffers are freed."""
        import pyarrow as pa

        where = self.record_batches[index]
        with pa.memory_map(where.path) as source:
            source.seek(where.offset)
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(source), self.schemas[where.path])
        return batch.select(names)

    def batches(self, names: list[str], max_rows: int) -> Iterator[tuple[int, object]]:
        """``(first row, record batch)`` over the columns ``names``, at most ``max_rows`` rows each."""
        for index, where in enumerate(self.record_batches):
            batch = self.read(index, names)
            for first in range(0, batch.num_rows, max_rows):
                yield where.start + first, batch.slice(first, max_rows)
            del batch  # its pages leave the process before the next batch is mapped

    def column(self, name: str, decode=None) -> MappedColumn:
        return MappedColumn(self, name, decode)


class MappedColumn:
    """One column of a `MappedSource` read at given rows, as Python values (``decode``: as
    `ChunkedColumn`'s)."""

    def __init__(self, source: MappedSource, name: str, decode=None):
        self.source, self.name, self.decode = source, name, decode

    def fetch(self, rows: np.ndarray) -> list:
        values: list = []
        for index, local in _runs_by_chunk(self.source.starts, rows):
            column = self.source.read(index, [self.name]).column(0)
            values.extend(_values_at(column, local))
            del column
        return self.decode(values) if self.decode is not None else values


def open_source(dataset, table, names: list[str]):
    """A `MappedSource` over ``dataset``'s cache files when they hold ``table``'s columns
    ``names`` row for row, else a `TableSource` over ``table``."""
    paths = _cache_paths(dataset)
    if paths:
        try:
            source = MappedSource(paths)
        except (OSError, ValueError, TypeError):  # not an Arrow stream as `datasets` writes them
            return TableSource(table)
        if source.n_rows == table.num_rows and all(_same_type(source, table, name) for name in names):
            return source
    return TableSource(table)


def _cache_paths(dataset) -> list[str] | None:
    """The files of ``dataset``'s table, in row order, when it is memory-mapped cache files
    read as they are stored; None otherwise."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if getattr(dataset, "_indices", None) is not None:
        return None
    table = dataset.data
    if isinstance(table, MemoryMappedTable):
        blocks = [table]
    elif isinstance(table, ConcatenationTable) and all(len(row) == 1 for row in table.blocks):
        blocks = [row[0] for row in table.blocks]  # vertical concatenation only
    else:
        return None
    if not all(isinstance(b, MemoryMappedTable) for b in blocks):
        return None
    if any(name not in _VALUE_KEEPING_REPLAYS for b in blocks for name, _, _ in b.replays or ()):
        return None
    return [b.path for b in blocks]


def _same_type(source: MappedSource, table, name: str) -> bool:
    wanted = table.schema.field(name).type
    return all(name in s.names and s.field(name).type == wanted for s in source.schemas.values())


def _batch_messages(source, reader, schema) -> Iterator[tuple[int, int]]:
    """``(byte offset, rows)`` of each record-batch message after the schema."""
    import pyarrow as pa

    while True:
        offset = source.tell()
        try:
            message = reader.read_next_message()
        except StopIteration:
            return
        if message.type != "record batch":
            raise ValueError(f"unexpected Arrow message {message.type!r} (dictionary batches are not read here)")
        yield offset, pa.ipc.read_record_batch(message, schema).num_rows  # zero-copy: no body is read


def _runs_by_chunk(starts: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(chunk, rows within it)`` for each run of consecutive ``rows`` in one chunk."""
    rows = np.asarray(rows, dtype=np.int64)
    chunk = np.searchsorted(starts, rows, side="right") - 1
    for run in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(chunk)) + 1) if len(rows) else []:
        c = int(chunk[run[0]])
        yield c, rows[run] - starts[c]


def _values_at(array, local: np.ndarray) -> list:
    """Python values of ``array`` at ``local`` rows: a slice for consecutive rows, else a take."""
    if np.all(np.diff(local) == 1):
        return array.slice(int(local[0]), len(local)).to_pylist()
    return array.take(local).to_pylist()
