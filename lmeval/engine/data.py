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
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError
from ..producers.text import (  # noqa: F401  (re-exported: the engine's view of a text)
    ROLES_SCORED, SEPARATOR_ID, Document, Stream, TokenizedDocument, check_messages, check_texts, count_bytes,
    count_words, join_documents, resolve_prefix, split_stream, tokenize_documents,
)
from .detokenize import detokenize_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """The documents to score, how many were skipped as empty, and a content fingerprint."""

    documents: list[Document]
    n_skipped: int
    fingerprint: str


BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Compressed text files (`x.jsonl.gz`): `datasets` decompresses them by their last suffix.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
BOM = "\ufeff"


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
        raise DataError(f"data.path: {path} does not exist. Check the path (relative paths start at the config's folder).")
    return None


def _load_saved(config):
    """A ``save_to_disk`` folder; a DatasetDict gives ``data.split``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(config.path)
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"data.path: cannot read the saved dataset {config.path} ({type(exc).__name__}: {exc}). "
                        "Save it again with `save_to_disk`.") from exc  # fmt: skip
    if isinstance(loaded, datasets.DatasetDict):
        if config.split not in loaded:
            raise DataError(f"data.split: must be one of the saved splits {', '.join(loaded)} of {config.path} "
                            f"(got {config.split!r}). Set data.split.")  # fmt: skip
        loaded = loaded[config.split]
    return loaded


def _with_documents(files: list[str], path: str) -> list[str]:
    """The files that hold anything; empty ones are named in a warning, and all empty is an error."""
    empty = []
    for name in files:
        has_text = os.path.getsize(name) > 0
        if has_text and file_format(name) != ".parquet":
            has_text = check_utf8(name)
        if not has_text:
            empty.append(name)
    if len(empty) == 1 == len(files):
        raise DataError(f"data.path: {empty[0]} must hold documents (got an empty file: {os.path.getsize(empty[0])} "
                        "bytes, no text). Point data.path at the corpus.")  # fmt: skip
    if len(empty) == len(files):
        raise DataError(f"data.path: {path} must hold documents (got {len(empty)} empty files, e.g. {empty[0]}). "
                        "Point data.path at the corpus.")  # fmt: skip
    if empty:
        log.warning("data.path: skipping %d empty file(s): %s", len(empty), ", ".join(empty))
    return [f for f in files if f not in empty]


def _load_dataset(config):
    """Open the corpus with Hugging Face `datasets` (local files, a glob, a ``save_to_disk``
    folder, or a hub id)."""
    import datasets

    datasets.disable_progress_bars()
    # A parse failure is re-raised below as one DataError; datasets' own log of it is noise.
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    if is_saved_dataset(config.path):
        return _load_saved(config)
    files = _local_files(config.path)
    try:
        if files is None:
            return datasets.load_dataset(config.path, config.name, split=config.split)
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
        return datasets.load_dataset(builder, data_files=files, split="train", **extra)
    except DataError:
        raise
    except Exception as exc:  # datasets wraps parser errors in several types
        cause = exc.__cause__ or exc
        raise DataError(f"data.path: cannot read {config.path}: {type(cause).__name__}: {cause}. "
                        "Check that the file is valid UTF-8 in the format its extension says.") from exc


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
    skipped and counted, never scored as zero."""
    table = _load_dataset(config)
    columns = list(table.column_names)
    for key in ("context_field", "messages_field"):
        name = getattr(config, key, None)
        if name is not None and name not in columns:
            raise DataError(f"data.{key}: {name!r} is not a column of {config.path}. Available columns: {', '.join(columns)}.")
    if getattr(config, "messages_field", None) is not None:
        return _load_conversations(config, table)
    if config.text_field not in columns:
        raise DataError(
            f"data.text_field: {config.text_field!r} is not a column of {config.path}. "
            f"Available columns: {', '.join(columns)}."
        )
    if config.id_field is not None and config.id_field not in columns:
        raise DataError(
            f"data.id_field: {config.id_field!r} is not a column of {config.path}. Available columns: {', '.join(columns)}."
        )
    texts = table[config.text_field]
    ids = table[config.id_field] if config.id_field else list(range(len(texts)))
    context_field = getattr(config, "context_field", None)
    contexts = table[context_field] if context_field else [None] * len(texts)
    documents, n_skipped, seen = [], 0, {}
    for row, (doc_id, text, context) in enumerate(zip(ids, texts, contexts)):
        if config.max_documents is not None and len(documents) >= config.max_documents:
            break
        if doc_id is None or doc_id != doc_id or isinstance(doc_id, (list, dict, bytes)):  # doc_id != doc_id: NaN
            kind = "null" if doc_id is None or doc_id != doc_id else type(doc_id).__name__
            raise DataError(
                f"{config.path}: row {row} has a {kind} `{config.id_field}` ({doc_id!r}); an id must be a string "
                "or an integer. Fix that row, choose another data.id_field, or drop id_field to use row numbers."
            )
        if text is None or not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            raise DataError(
                f"{config.path}: row {row} (id {doc_id!r}) has a {kind} `{config.text_field}`; it must be text. "
                "Fix or remove that row."
            )
        text = text[1:] if text.startswith(BOM) else text  # a file's BOM is an encoding mark, not text
        if doc_id in seen:
            raise DataError(
                f"data.id_field: id {doc_id!r} appears in rows {seen[doc_id]} and {row}; ids must be unique. "
                "Deduplicate the corpus or drop `id_field` to use row numbers."
            )
        seen[doc_id] = row
        if context_field and not isinstance(context, str):
            raise DataError(
                f"{config.path}: row {row} (id {doc_id!r}) has a {type(context).__name__} `{context_field}`; "
                "it must be text (an empty string for no context). Fix or remove that row."
            )
        if not text.strip():
            n_skipped += 1
            continue
        documents.append(Document(doc_id if isinstance(doc_id, int) else str(doc_id), text, context=context))
    if not documents:
        raise DataError(f"data.path: {config.path} holds no non-empty documents ({n_skipped} empty). Nothing to score.")
    documents = detokenize_documents(documents, getattr(config, "detokenizer", None))
    return Corpus(documents, n_skipped, fingerprint_documents(documents))


def _load_conversations(config, table) -> Corpus:
    """One document per conversation; its text is the messages as JSON (each model renders
    them with its own chat template when it scores them)."""
    rows = table[config.messages_field]
    ids = table[config.id_field] if config.id_field else list(range(len(rows)))
    documents, seen = [], {}
    for row, (doc_id, messages) in enumerate(zip(ids, rows)):
        if config.max_documents is not None and len(documents) >= config.max_documents:
            break
        if doc_id in seen:
            raise DataError(f"data.id_field: id {doc_id!r} appears in rows {seen[doc_id]} and {row}; ids must be unique.")
        seen[doc_id] = row
        messages = check_messages(messages, f"{config.path}: row {row} `{config.messages_field}`")
        doc_id = doc_id if isinstance(doc_id, int) else str(doc_id)
        documents.append(Document(doc_id, json.dumps(messages, ensure_ascii=False)))
    if not documents:
        raise DataError(f"data.path: {config.path} holds no conversations. Nothing to score.")
    return Corpus(documents, 0, fingerprint_documents(documents))


def fingerprint_documents(documents: list[Document]) -> str:
    """sha256 over ids, texts (and contexts, when given), in order: changes whenever what is scored changes."""
    digest = hashlib.sha256()
    for doc in documents:
        for part in (str(doc.doc_id), doc.text) + (() if doc.context is None else ("\x00context", doc.context)):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


