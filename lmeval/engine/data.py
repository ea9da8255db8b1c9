"""Documents: loading them with `datasets`, and tokenizing them with offsets and the BOS policy.

The tokenizer's own special tokens are never added (``add_special_tokens=False``): the one
conditioning token comes from the BOS policy alone, so there is never a double BOS, and
nothing is truncated.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from pathlib import Path

import numpy as np

from ..core.groups import GroupLabels, weight_problems
from ..errors import DataError
from ..producers.text import (  # noqa: F401  (re-exported: the engine's view of a text)
    ROLES_SCORED,
    SEPARATOR_ID,
    Document,
    Stream,
    TokenizedDocument,
    check_messages,
    check_texts,
    count_bytes,
    count_words,
    join_documents,
    resolve_prefix,
    split_stream,
    tokenize_documents,
)
from .columns import open_source
from .detokenize import detokenize_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """The documents to score, how many were skipped as empty, and a content fingerprint.

    ``documents`` is a list (in-memory texts, conversations) or an `ArrowDocuments` that reads
    texts from the dataset on demand, so a large corpus is never held as Python strings.
    """

    documents: Sequence[Document]
    n_skipped: int
    fingerprint: str
    groups: GroupLabels | None = None  # each document's groups, with data.group_by

    @cached_property
    def lengths(self) -> np.ndarray:
        """Characters of each document's scored text (after `data.detokenizer`), int64; planning needs no texts."""
        own = getattr(self.documents, "lengths", None)
        return own if own is not None else np.array([len(d.text) for d in self.documents], dtype=np.int64)

    @cached_property
    def doc_ids(self) -> Sequence:
        """Each document's id, in corpus order: naming parts needs no texts."""
        own = getattr(self.documents, "doc_ids", None)
        return own if own is not None else [d.doc_id for d in self.documents]

    def take(self, indices) -> list[Document]:
        """The documents at ``indices`` (a part's), read in one call where the corpus is Arrow-backed."""
        take = getattr(self.documents, "take", None)
        return take(indices) if take is not None else [self.documents[i] for i in indices]


class ArrowDocuments(Sequence):
    """A read-only sequence of `Document` read from an Arrow table on demand.

    Why: a corpus of millions of documents as Python objects costs gigabytes; the texts stay in
    the dataset's Arrow files, read a record batch at a time (`lmeval.engine.columns`), so only
    ``rows`` (document index -> table row), the ids and the lengths are kept. A text is read,
    BOM-stripped and detokenized when it is asked for, exactly as `load_documents` validated
    and fingerprinted it.
    """

    def __init__(self, columns: tuple, rows: np.ndarray, doc_ids: list, lengths: np.ndarray, detokenizer):
        self.texts, self.contexts = columns  # a MappedColumn or ChunkedColumn each; contexts may be None
        self.detokenizer = detokenizer
        self.rows, self.doc_ids, self.lengths = rows, doc_ids, lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        return self.take([range(len(self))[index]])[0]  # range: negative indices and IndexError as a list's

    def __iter__(self):
        """In corpus order, read ``BATCH_ROWS`` documents or about ``READ_CHARS`` characters at a time."""
        ends, start = np.cumsum(self.lengths), 0
        while start < len(self):
            budget = (ends[start - 1] if start else 0) + READ_CHARS
            stop = max(start + 1, min(start + BATCH_ROWS, int(np.searchsorted(ends, budget, side="right"))))
            yield from self.take(range(start, stop))
            start = stop

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # unhashable, as a list: == compares the documents

    def __repr__(self) -> str:
        return f"ArrowDocuments({len(self)} documents)"

    def take(self, indices) -> list[Document]:
        """The documents at ``indices``, their texts fetched from the table chunk by chunk."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self.rows[indices]
        texts = self.texts.fetch(rows)
        contexts = self.contexts.fetch(rows) if self.contexts is not None else [None] * len(rows)
        ids = [self.doc_ids[i] for i in indices.tolist()]
        documents = [Document(i, strip_bom(t), context=c) for i, t, c in zip(ids, texts, contexts)]
        return detokenize_documents(documents, self.detokenizer)


BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Compressed text files (`x.jsonl.gz`): `datasets` decompresses them by their last suffix.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
BOM = "\ufeff"
BATCH_ROWS = 10_000  # rows per record batch of the validating pass, and most documents per read when iterating
READ_CHARS = 2**20  # about the most characters one read holds when iterating (at least one document)


def file_format(name) -> str:
    """A data file's format suffix, looking through a compression suffix ('.jsonl.gz' -> '.jsonl')."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS and suffixes[-2] != ".parquet":
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def is_saved_dataset(path) -> bool:
    """A folder written by `datasets`' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and (
        ((p / "dataset_info.json").is_file() and (p / "state.json").is_file()) or (p / "dataset_dict.json").is_file()
    )


def _local_files(path: str) -> list[str] | None:
    """The files a local path or glob names, or None when it is not local (a hub id)."""
    if any(c in path for c in "*?["):
        return sorted(globlib.glob(path))
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.is_file() and file_format(f) in BUILDERS)
    if p.exists():
        return [str(p)]
    if path.startswith((".", "/", "~")) or file_format(path) in BUILDERS:
        raise DataError(
            f"data.path: {path} does not exist. Check the path (relative paths start at the config's folder)."
        )
    return None


def _load_saved(config):
    """A ``save_to_disk`` folder; a DatasetDict gives ``data.split``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(config.path)
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(
            f"data.path: cannot read the saved dataset {config.path} ({type(exc).__name__}: {exc}). "
            "Save it again with `save_to_disk`."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if config.split not in loaded:
            raise DataError(
                f"data.split: must be one of the saved splits {', '.join(loaded)} of {config.path} "
                f"(got {config.split!r}). Set data.split."
            )
        loaded = loaded[config.split]
    return loaded


def _with_documents(files: list[str], path: str) -> list[str]:
    """The files that hold anything; empty ones are named in a warning, and all empty is an error."""
    empty = []
    for name in files:
        has_text = os.path.getsize(name) > 0
        if has_text and file_format(name) == ".parquet":
            has_text = _parquet_rows(name) != 0
        elif has_text:
            has_text = check_utf8(name)
        if not has_text:
            empty.append(name)
    if len(empty) == 1 == len(files):
        got = (
            "a Parquet file with 0 rows"
            if file_format(empty[0]) == ".parquet" and os.path.getsize(empty[0])
            else f"an empty file: {os.path.getsize(empty[0])} bytes, no text"
        )
        raise DataError(f"data.path: {empty[0]} must hold documents (got {got}). Point data.path at the corpus.")
    if len(empty) == len(files):
        raise DataError(
            f"data.path: {path} must hold documents (got {len(empty)} empty files, e.g. {empty[0]}). "
            "Point data.path at the corpus."
        )
    if empty:
        log.warning("data.path: skipping %d empty file(s): %s", len(empty), ", ".join(empty))
    return [f for f in files if f not in empty]


def _first_bad_json_line(files: list[str]) -> str | None:
    """``file: line N (1-based) ...`` for the first non-blank line that is not a JSON object, if any."""
    import io

    for name in files:
        with _open_binary(name) as raw:
            for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace"), 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{name}: line {number} is not JSON ({exc.msg})"
                if not isinstance(value, dict):
                    return f"{name}: line {number} is not a JSON object (got {type(value).__name__})"
    return None


def _parquet_rows(path: str) -> int | None:
    """A Parquet file's row count from its footer (None when the footer cannot be read: the
    reader then names the damage)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except Exception:
        return None


def _load_dataset(config, streaming: bool = False):
    """Open the corpus with Hugging Face `datasets` (local files, a glob, a ``save_to_disk``
    folder, or a hub id); with ``streaming``, an iterable dataset read as it goes."""
    import datasets

    datasets.disable_progress_bars()
    # A parse failure is re-raised below as one DataError; datasets' own log of it is noise.
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    if is_saved_dataset(config.path):
        if streaming:
            raise DataError(
                f"data.streaming: {config.path} is a save_to_disk folder, already local and memory-mapped "
                "(got data.streaming: true). Drop data.streaming."
            )
        return _load_saved(config)
    files = _local_files(config.path)
    try:
        if files is None:
            return datasets.load_dataset(config.path, config.name, split=config.split, streaming=streaming)
        if not files:
            raise DataError(f"data.path: {config.path} matched no files. Check the pattern.")
        suffixes = {file_format(f) for f in files}
        if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
            raise DataError(
                f"data.path: files must share one of the extensions {', '.join(BUILDERS)} (got {sorted(suffixes)})."
            )
        builder = BUILDERS[suffixes.pop()]
        files = _with_documents(files, config.path)
        extra = {"sample_by": config.sample_by} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **extra)
    except DataError:
        raise
    except Exception as exc:  # datasets wraps parser errors in several types
        raise DataError(_unreadable(config, files, exc)) from exc


def _unreadable(config, files: list[str] | None, exc: Exception) -> str:
    """What went wrong reading ``data.path``, and the fix that goes with it."""
    cause = exc.__cause__ or exc
    what = f"{type(cause).__name__}: {cause}"
    if files is None:
        return (
            f"data.path: the hub dataset {config.path!r} cannot be loaded ({what}). Check the id (and "
            "data.name, data.split), the network, or the hub token; offline (HF_HUB_OFFLINE=1) only a cached "
            "copy loads. A local corpus must be a path that exists."
        )
    bad_line = _first_bad_json_line(files) if file_format(files[0]) == ".jsonl" else None
    if bad_line is not None:
        return (
            f"data.path: {bad_line}. Each line of a JSON Lines file must be one JSON object: fix or remove that line."
        )
    kind = {
        ".jsonl": "JSON Lines (one JSON object per line)",
        ".json": "JSON",
        ".csv": "CSV with a header row",
        ".parquet": "Parquet",
        ".txt": "UTF-8 text",
    }.get(file_format(files[0]), "a supported format")
    return f"data.path: cannot read {config.path} ({what}). Each file must be {kind}, as its extension says: fix or replace it."


def _open_binary(path: str):
    """The file's bytes, decompressed by its suffix (`COMPRESSIONS`)."""
    module = COMPRESSIONS.get(Path(path).suffix.lower())
    if module is None:
        return open(path, "rb")
    return importlib.import_module(module).open(path, "rb")


def check_utf8(path: str) -> bool:
    """Text corpora must be UTF-8; say where they are not (the JSON/CSV readers would not).
    Returns whether the file holds anything but whitespace and a BOM."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    try:
        with _open_binary(path) as f:
            for block in iter(lambda: f.read(2**20), b""):
                try:
                    has_text = bool(decoder.decode(block).strip().lstrip(BOM)) or has_text
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}: must be UTF-8 text, but byte {offset + exc.start} is not ({exc.reason}). "
                        "Re-encode the file, e.g. `iconv -f latin1 -t utf-8`."
                    ) from None
                offset += len(block)
    except (OSError, EOFError) as exc:  # a damaged .gz/.bz2/.xz, or an unreadable file
        raise DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc}). Check or recreate the file.") from None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: must be UTF-8 text; it ends inside a character ({exc.reason}).") from None
    return has_text


def load_documents(config) -> Corpus:
    """Read documents from ``config`` (a `DataConfig`); empty or whitespace-only texts are
    skipped and counted, never scored as zero. Texts stay in the Arrow table (`ArrowDocuments`):
    one streaming pass validates every row and computes the lengths and the fingerprint."""
    dataset = _load_dataset(config)
    columns = list(dataset.column_names)
    for key in ("context_field", "messages_field"):
        name = getattr(config, key, None)
        if name is not None and name not in columns:
            raise DataError(
                f"data.{key}: {name!r} is not a column of {config.path}. Available columns: {', '.join(columns)}."
            )
    if getattr(config, "messages_field", None) is not None:
        return _load_conversations(config, dataset)
    if config.text_field not in columns:
        raise DataError(
            f"data.text_field: {config.text_field!r} is not a column of {config.path}. "
            f"Available columns: {', '.join(columns)}."
        )
    if config.id_field is not None and config.id_field not in columns:
        raise DataError(
            f"data.id_field: {config.id_field!r} is not a column of {config.path}. Available columns: {', '.join(columns)}."
        )
    levels = tuple(getattr(config, "group_by", None) or ())
    absent = [level for level in levels if level not in columns]
    if absent:
        raise DataError(
            f"data.group_by: {', '.join(map(repr, absent))} must be columns of {config.path}. "
            f"Available columns: {', '.join(columns)}."
        )
    dataset, context_field = flat_rows(dataset), getattr(config, "context_field", None)
    names = list(
        dict.fromkeys(n for n in (config.id_field, config.text_field, context_field, *levels) if n is not None)
    )
    source = open_source(dataset, dataset.data.table, names)
    scan = _Scan(config, {name: _decoder(dataset, name) for name in names})
    for start, batch in source.batches(names, BATCH_ROWS):
        if not scan.add_batch(start, batch):
            break
    if not scan.n_documents:
        without = f", {scan.n_skipped_group} without a group" if scan.n_skipped_group else ""
        raise DataError(
            f"data.path: {config.path} holds no non-empty documents ({scan.n_skipped} empty{without}). Nothing to score."
        )
    fields = (config.text_field, context_field)
    readers = tuple(source.column(n, scan.decoders[n]) if n else None for n in fields)
    rows, lengths = np.concatenate(scan.rows).astype(np.int64), np.concatenate(scan.lengths).astype(np.int64)
    documents = ArrowDocuments(readers, rows, scan.doc_ids, lengths, scan.detokenizer)
    return Corpus(documents, scan.n_skipped, scan.digest.hexdigest(), _group_labels(config, scan))


def _group_labels(config, scan) -> GroupLabels | None:
    """The documents' groups (data.group_by), their weights checked against the groups found."""
    if not scan.group_fields:
        return None
    labels = GroupLabels.from_values(scan.group_fields, scan.doc_ids, scan.group_values, scan.n_skipped_group)
    problems = weight_problems(labels, getattr(config, "group_weights", None))
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else "data.group_weights: " + "; ".join(problems))
    return labels


def flat_rows(dataset):
    """``dataset`` with its table in the dataset's row order (a select/shuffle view is written out)."""
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return dataset


def _decoder(dataset, name: str):
    """How ``dataset[name]`` turns the column's stored Python values into its values (e.g. the
    `Json` feature parses its strings), or None when they are the same."""
    from datasets.features.features import require_decoding

    features = dataset.features
    if not features or name not in features or not require_decoding(features[name]):
        return None
    return lambda values: features.decode_column(values, name)


def strip_bom(text: str) -> str:
    """A text without its leading BOM: a file's BOM is an encoding mark, not text."""
    return text[1:] if text.startswith(BOM) else text


class _Scan:
    """The one validating pass over a corpus's rows: which rows are documents, their ids,
    the scored lengths and the fingerprint, accumulated batch by batch.

    A batch that passes every check at once (typed, null-free columns, new unique ids, no BOM,
    no detokenizer) is measured and hashed in Arrow; any other goes row by row in Python, so
    the first faulty row raises exactly its own error."""

    def __init__(self, config, decoders: dict):
        self.config, self.detokenizer, self.decoders = config, getattr(config, "detokenizer", None), decoders
        self.context_field = getattr(config, "context_field", None)
        self.rows: list[np.ndarray] = []  # the kept rows' numbers, a batch at a time
        self.doc_ids: list[str | int] = []
        self.lengths: list[np.ndarray] = []  # the kept texts' lengths, a batch at a time
        self.n_skipped = 0
        self.seen: dict[str | int, int] = {}  # id -> its row
        # data.group_by: each kept document's value at every level, as a string
        self.group_fields = tuple(getattr(config, "group_by", None) or ())
        self.group_values: list[list[str]] = [[] for _ in self.group_fields]
        self.n_skipped_group, self.skip_missing = 0, getattr(config, "group_missing", "error") == "skip"
        self.digest = hashlib.sha256()

    @property
    def n_documents(self) -> int:
        return len(self.doc_ids)

    def add_batch(self, start: int, batch) -> bool:
        """Validate one record batch and keep its documents; False once `max_documents` are kept."""
        config, n = self.config, batch.num_rows
        ids = self._values(batch, config.id_field) if config.id_field else list(range(start, start + n))
        if self._clean(batch, ids):
            self._keep_arrow(start, batch, ids)
            return True
        texts = self._values(batch, config.text_field)
        contexts = self._values(batch, self.context_field) if self.context_field else [None] * n
        groups = list(zip(*(self._values(batch, f) for f in self.group_fields))) or [()] * n
        return self._add_rows(start, ids, texts, contexts, groups)

    def _values(self, batch, name: str) -> list:
        """A column of the batch as the Python values ``dataset[name]`` gives."""
        values, decode = batch.column(name).to_pylist(), self.decoders[name]
        return decode(values) if decode is not None else values

    def _clean(self, batch, ids) -> bool:
        """Whether the whole batch passes every row check and needs no rewrite of its texts."""
        import pyarrow as pa

        config, limit = self.config, self.config.max_documents
        if self.detokenizer is not None or (limit is not None and self.n_documents + batch.num_rows > limit):
            return False
        if any(decode is not None for decode in self.decoders.values()):
            return False
        strings = [batch.column(config.text_field)] + ([batch.column(self.context_field)] if self.context_field else [])
        if any(not _is_string(c.type) or c.null_count for c in strings) or _has_bom(strings[0]):
            return False
        for name in [n for n in (config.id_field, *self.group_fields) if n is not None]:
            column = batch.column(name)
            if column.null_count or not (pa.types.is_integer(column.type) or _is_string(column.type)):
                return False
        if any(_is_string(batch.column(f).type) and not _non_blank(batch.column(f)).all() for f in self.group_fields):
            return False  # a blank group: its row raises (or is skipped) on the row path
        return len(set(ids)) == len(ids) and self.seen.keys().isdisjoint(ids)

    def _keep_arrow(self, start: int, batch, ids: list) -> None:
        """Keep a clean batch's non-blank rows: lengths and fingerprint computed by Arrow."""
        import pyarrow as pa
        import pyarrow.compute as pc

        texts = batch.column(self.config.text_field)
        keep = _non_blank(texts)
        self.seen.update(zip(ids, range(start, start + batch.num_rows)))
        self.n_skipped += int((~keep).sum())
        kept = pa.array(keep)
        self.rows.append(np.flatnonzero(keep) + start)
        self.doc_ids.extend(compress(ids, keep))
        texts = texts.filter(kept)
        self.lengths.append(pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64))
        id_column = batch.column(self.config.id_field) if self.config.id_field else pa.array(ids, pa.int64())
        id_texts = id_column.filter(kept).cast(pa.string())  # as str(id): decimal digits for an integer
        contexts = batch.column(self.context_field).filter(kept) if self.context_field else None
        _arrow_fingerprint_update(self.digest, id_texts, texts, contexts)
        for values, name in zip(self.group_values, self.group_fields):
            values.extend(batch.column(name).filter(kept).cast(pa.string()).to_pylist())  # as str(value)

    def _add_rows(self, start: int, ids, texts, contexts, groups) -> bool:
        """`add_batch` row by row: the first faulty row raises its own error; False at `max_documents`."""
        limit = self.config.max_documents
        kept: list[tuple] = []  # (row, doc_id, text, context)
        for row, doc_id, text, context, group in zip(range(start, start + len(texts)), ids, texts, contexts, groups):
            if limit is not None and self.n_documents + len(kept) >= limit:
                self._keep(kept)
                return False
            text = self._check_row(row, doc_id, text, context)
            if not text.strip():
                self.n_skipped += 1
                continue
            labels = self._check_groups(row, doc_id, group)
            if labels is None:
                self.n_skipped_group += 1
                continue
            for values, label in zip(self.group_values, labels):
                values.append(label)
            kept.append((row, doc_id if isinstance(doc_id, int) else str(doc_id), text, context))
        self._keep(kept)
        return True

    def _keep(self, kept: list[tuple]) -> None:
        """Record the kept rows, and their scored texts' lengths and fingerprint (after the detokenizer)."""
        if not kept:
            return
        rows, ids, texts, contexts = map(list, zip(*kept))
        self.rows.append(np.array(rows, dtype=np.int64))
        self.doc_ids.extend(ids)
        if self.detokenizer is not None:  # per document (no neighbours needed): as `ArrowDocuments.take` reads them
            documents = [Document(i, t, context=c) for i, t, c in zip(ids, texts, contexts)]
            scored = detokenize_documents(documents, self.detokenizer)
            ids, texts, contexts = [d.doc_id for d in scored], [d.text for d in scored], [d.context for d in scored]
        self.lengths.append(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        _fingerprint_update(self.digest, ids, texts, contexts)

    def _check_groups(self, row: int, doc_id, values: tuple) -> tuple[str, ...] | None:
        """A row's group at each level of data.group_by, as strings; None to skip a row that lacks
        one (data.group_missing: skip)."""
        labels = []
        for level, value in zip(self.group_fields, values):
            if value is None or value != value or (isinstance(value, str) and not value.strip()):  # value != value: NaN
                if self.skip_missing:
                    return None
                raise DataError(
                    f"{row_place(self.config, row)} (id {doc_id!r}) has no `{level}` (got {value!r}); data.group_by "
                    "needs a value at every level. Fill it in, or set data.group_missing: skip to leave such "
                    "documents out (they are counted in summary.csv's n_skipped_no_group)."
                )
            if isinstance(value, (list, dict, bytes)):
                raise DataError(
                    f"{row_place(self.config, row)} (id {doc_id!r}) has a {type(value).__name__} `{level}`; a group "
                    "must be a string or a number. Group by another column, or flatten this one."
                )
            labels.append(str(value))
        return tuple(labels)

    def _check_row(self, row: int, doc_id, text, context) -> str:
        """One row's id (not null, unique), text (a string) and context (a string); returns the text BOM-stripped."""
        config = self.config
        if doc_id is None or doc_id != doc_id or isinstance(doc_id, (list, dict, bytes)):  # doc_id != doc_id: NaN
            kind = "null" if doc_id is None or doc_id != doc_id else type(doc_id).__name__
            raise DataError(
                f"{row_place(config, row)} has a {kind} `{config.id_field}` ({doc_id!r}); an id must be a string "
                "or an integer. Fix that row, choose another data.id_field, or drop id_field to use row numbers."
            )
        if text is None or not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            raise DataError(
                f"{row_place(config, row)} (id {doc_id!r}) has a {kind} `{config.text_field}`; it must be text. "
                "Fix or remove that row."
            )
        if doc_id in self.seen:
            raise DataError(
                f"data.id_field: id {doc_id!r} appears twice ({row_place(config, self.seen[doc_id])} and "
                f"{row_place(config, row)}); ids must be unique. Deduplicate the corpus or drop `id_field` to use row numbers."
            )
        self.seen[doc_id] = row
        if self.context_field and not isinstance(context, str):
            raise DataError(
                f"{row_place(config, row)} (id {doc_id!r}) has a {type(context).__name__} `{self.context_field}`; "
                "it must be text (an empty string for no context). Fix or remove that row."
            )
        return strip_bom(text)


def row_place(config, row: int) -> str:
    """Where a table row (0-based) is, for a message, always 1-based and named: ``file: line N``
    in a JSON Lines or CSV file (blank lines and a CSV header or multi-line cell counted, as an
    editor numbers lines), else ``path: row N (counting from 1)``. Read only when a message
    needs it."""
    try:
        files = _local_files(config.path) if not is_saved_dataset(config.path) else None
    except DataError:
        files = None
    if files and all(file_format(f) in (".jsonl", ".csv") for f in files):
        for name in files:
            lines = _record_lines(name)
            if row < len(lines):
                return f"{name}: line {lines[row]}"
            row -= len(lines)
    return f"{config.path}: row {row + 1} (counting from 1)"


def _record_lines(path: str) -> list[int]:
    """The 1-based line on which each record of a JSON Lines or CSV file starts, as `datasets`
    reads them: blank lines are no record, and a CSV's header is none."""
    import csv
    import io

    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        if file_format(path) == ".jsonl":
            return [number for number, line in enumerate(text, 1) if line.strip()]
        reader, starts, previous = csv.reader(text), [], 0
        for record in reader:
            if any(cell.strip() for cell in record):
                starts.append(previous + 1)
            previous = reader.line_num
        return starts[1:]


def _has_bom(column) -> bool:
    """Whether any text of a string column starts with a BOM (most batches: none, so no per-text strip)."""
    import pyarrow.compute as pc

    return bool(pc.any(pc.starts_with(column, BOM)).as_py())


def _non_blank(texts) -> np.ndarray:
    """Which texts hold more than whitespace, as Python's ``str.strip`` decides; a visible ASCII
    character settles most texts in Arrow, only the rest are tested in Python."""
    import pyarrow.compute as pc

    keep = np.array(pc.match_substring_regex(texts, "[!-~]").to_numpy(zero_copy_only=False), dtype=bool)
    unsure = np.flatnonzero(~keep)
    if len(unsure):
        keep[unsure] = [bool(t.strip()) for t in texts.take(unsure).to_pylist()]
    return keep


def _is_string(arrow_type) -> bool:
    """Whether a column holds plain text (its Python values are `str`, or None)."""
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _load_conversations(config, table) -> Corpus:
    """One document per conversation; its text is the messages as JSON (each model renders
    them with its own chat template when it scores them)."""
    rows = table[config.messages_field]
    ids = table[config.id_field] if config.id_field else list(range(len(rows)))
    documents: list[Document] = []
    seen: dict = {}  # id -> its row
    for row, (doc_id, messages) in enumerate(zip(ids, rows)):
        if config.max_documents is not None and len(documents) >= config.max_documents:
            break
        if doc_id in seen:
            raise DataError(
                f"data.id_field: id {doc_id!r} appears twice ({row_place(config, seen[doc_id])} and "
                f"{row_place(config, row)}); ids must be unique."
            )
        seen[doc_id] = row
        messages = check_messages(messages, f"{row_place(config, row)} `{config.messages_field}`")
        doc_id = doc_id if isinstance(doc_id, int) else str(doc_id)
        documents.append(Document(doc_id, json.dumps(messages, ensure_ascii=False)))
    if not documents:
        raise DataError(f"data.path: {config.path} holds no conversations. Nothing to score.")
    return Corpus(documents, 0, fingerprint_documents(documents))


def fingerprint_documents(documents: list[Document]) -> str:
    """sha256 over ids, texts (and contexts, when given), in order: changes whenever what is scored changes."""
    digest = hashlib.sha256()
    for start in range(0, len(documents), BATCH_ROWS):  # a batch's bytes at a time, never the corpus's
        batch = documents[start : start + BATCH_ROWS]
        _fingerprint_update(digest, [d.doc_id for d in batch], [d.text for d in batch], [d.context for d in batch])
    return digest.hexdigest()


def _fingerprint_update(digest, ids, texts, contexts) -> None:
    """Add documents to a fingerprint, in order: each id, text (and context) length-prefixed, so no
    two corpora collide by concatenation; one ``update`` per call (the same digest as one per part)."""
    pieces: list[bytes] = []
    for doc_id, text, context in zip(ids, texts, contexts):
        doc_id, text = str(doc_id).encode("utf-8"), text.encode("utf-8")
        pieces += (_LENGTH(len(doc_id)), doc_id, _LENGTH(len(text)), text)
        if context is not None:
            context = context.encode("utf-8")
            pieces += (_CONTEXT_MARK, _LENGTH(len(context)), context)
    digest.update(b"".join(pieces))


def _arrow_fingerprint_update(digest, ids, texts, contexts) -> None:
    """`_fingerprint_update` on Arrow string arrays: each document's length-prefixed parts joined
    by Arrow, then hashed in one call (the same bytes, so the same digest)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(ids):
        return
    parts = [_length_prefixes(ids), ids, _length_prefixes(texts), texts]
    if contexts is not None:
        parts += [pa.scalar(_CONTEXT_MARK, pa.large_binary()), _length_prefixes(contexts), contexts]
    parts = [p if isinstance(p, pa.Scalar) else p.cast(pa.large_binary()) for p in parts]
    joined = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.large_binary()))
    offsets = np.frombuffer(joined.buffers()[1], np.int64)[joined.offset : joined.offset + len(joined) + 1]
    digest.update(joined.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])))


def _length_prefixes(strings):
    """Each string's UTF-8 byte count as 8 little-endian bytes, an Arrow binary array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = pc.binary_length(strings).to_numpy(zero_copy_only=False).astype("<u8")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(counts), [None, pa.py_buffer(counts.tobytes())])


_LENGTH = struct.Struct("<Q").pack  # the 8-byte little-endian length before each part
_CONTEXT_MARK = _LENGTH(len(b"\x00context")) + b"\x00context"
