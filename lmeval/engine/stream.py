"""Streamed corpora (``data.streaming: true``): a corpus read once per pass, planned as it is read.

Why: a pretraining mixture on the hub, or local shards larger than the disk cache `datasets`
would build, cannot be loaded before planning. Here the rows come from
``datasets.load_dataset(..., streaming=True)`` (local jsonl/json/csv/parquet/txt files or a hub
id), each kept document is validated as `load_documents` validates it, and the parts are cut
in stream order by `plan_parts`' own rule (documents grouped until ``output.part_chars``, a
longer document in pieces), so the part boundaries, the part files and the tables are those of
the same corpus loaded whole. Parts are scored a block at a time (``BLOCK_CHARS`` of text held
at once); a finished part, by its key and checks, is merged from disk and never rescored.

Each pass (model) reads the stream again: the documents it read are fingerprinted as they go
(the fingerprint of `load_documents`, so equal for the same documents) and every pass must
read the same ones. run.json's ``data.fingerprint`` is that fingerprint of what was read. The
run identity cannot hold it (it is known only at the end), so it holds the source instead: the
config's data keys and, for local files, each file's name, size and modification time; a
changed file refuses the finished parts (rerun with --fresh). A hub dataset is named by its id,
configuration and split only.

``data.max_documents`` keeps the stream's first N documents. ``data.sample: {n, seed}`` keeps n
of them, the n whose ``blake2b(seed, doc_id)`` is smallest (bottom-n hashing): uniform,
deterministic, independent of the stream's order, and chosen in one read of ids that holds n
hashes, not n texts; the sample is then scored in stream order. With both, the sample is drawn
from the first max_documents documents.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analyses import analyses_for, plots
from ..errors import DataError
from .config import Config
from .data import (
    Corpus,
    Document,
    _load_dataset,
    _local_files,
    is_saved_dataset,
    strip_bom,
)
from .detokenize import detokenize_documents
from .files import clean_leftovers, prepare_output_dir
from .lock import RunLock
from .merge import Merger, layout_of
from .parts import PartError, identity_hash, model_dirname, open_parts, verify_part
from .passes import Models, PassJob, plan_passes, score_share
from .plan import PartPlan, plan_key
from .progress import ScoringProgress
from .resume import ReplacedParts, missing_folders

BLOCK_CHARS = 16 * 2**20  # characters of documents held (and planned) at once while scoring a stream


class StreamedDocuments(Sequence):
    """A streamed corpus's document count, for the record: its texts were read once and not kept."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        raise DataError("data.streaming: a streamed corpus keeps no texts after scoring; read the corpus itself.")


@dataclass
class StreamFacts:
    """What one read of the stream found: kept documents, skipped ones, the fingerprint so far."""

    n_documents: int = 0
    n_skipped: int = 0
    digest: Any = field(default_factory=hashlib.sha256)


def open_stream(data) -> Iterator[dict]:
    """The rows of ``data.path`` (local files or a hub id) as `datasets` streams them, in order."""
    return iter(_load_dataset(data, streaming=True))


def source_identity(data) -> str:
    """What the run identity holds of a stream: its local files' names, sizes and times, or its hub id."""
    files = None if is_saved_dataset(data.path) else _local_files(data.path)
    if files is None:
        return f"stream of hub dataset {data.path} {data.name} {data.split}"
    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return "stream of " + hashlib.sha256(repr(stats).encode()).hexdigest()


def read_documents(data, facts: StreamFacts) -> Iterator[Document]:
    """The stream's documents, validated as `load_documents` validates rows (ids unique, texts
    strings, blank texts skipped and counted), detokenized, up to ``max_documents``, and
    narrowed to ``data.sample``'s n when given; ``facts`` is filled as they are read."""
    from .data import _fingerprint_update

    chosen = _sample(data) if data.sample else None
    for ordinal, document in enumerate(_validated(data, facts)):
        if chosen is not None and ordinal not in chosen:
            continue
        facts.n_documents += 1
        _fingerprint_update(facts.digest, [document.doc_id], [document.text], [document.context])
        yield document


def _validated(data, facts: StreamFacts) -> Iterator[Document]:
    """Every non-blank document of the stream (up to ``max_documents``); blank ones counted in ``facts``."""
    seen: dict = {}  # id -> row (an id set grows with the documents: 100 bytes or so each)
    kept = 0
    for row, record in enumerate(open_stream(data)):
        if data.max_documents is not None and kept >= data.max_documents:
            break
        for key in ("text_field", "id_field", "context_field"):
            name = getattr(data, key)
            if name is not None and name not in record:
                raise DataError(
                    f"data.{key}: {name!r} is not a column of {data.path} (row {row + 1} of the stream). "
                    f"Available columns: {', '.join(record)}."
                )
        doc_id = record[data.id_field] if data.id_field else row
        text, context = record[data.text_field], record[data.context_field] if data.context_field else None
        where = f"{data.path}: row {row + 1} of the stream (counting from 1)"
        if doc_id is None or isinstance(doc_id, (list, dict, bytes, float)):
            raise DataError(
                f"{where} has a {type(doc_id).__name__} `{data.id_field}` ({doc_id!r}); an id must be a "
                "string or an integer. Fix that row, or drop id_field to use row numbers."
            )
        if not isinstance(text, str):
            raise DataError(
                f"{where} (id {doc_id!r}) has a {type(text).__name__} `{data.text_field}`; it must be "
                "text. Fix or remove that row."
            )
        if data.context_field and not isinstance(context, str):
            raise DataError(
                f"{where} (id {doc_id!r}) has a {type(context).__name__} `{data.context_field}`; it "
                "must be text (an empty string for no context). Fix or remove that row."
            )
        doc_id = doc_id if isinstance(doc_id, int) else str(doc_id)
        if doc_id in seen:
            raise DataError(
                f"data.id_field: id {doc_id!r} appears twice (rows {seen[doc_id] + 1} and {row + 1} of "
                "the stream); ids must be unique. Deduplicate the corpus or drop `id_field`."
            )
        seen[doc_id] = row
        text = strip_bom(text)
        if not text.strip():
            facts.n_skipped += 1
            continue
        kept += 1
        yield detokenize_documents([Document(doc_id, text, context=context)], data.detokenizer)[0]
    if not kept:
        raise DataError(
            f"data.path: {data.path} holds no non-empty documents ({facts.n_skipped} empty). Nothing to score."
        )


def sample_key(seed: int, doc_id) -> int:
    """The document's place in the sample's order: the smallest n keys are kept."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest(), "little")


def _sample(data) -> set[int]:
    """The ordinals (among the stream's kept documents) of the n with the smallest keys: one read, n keys held."""
    n, seed = int(data.sample["n"]), int(data.sample["seed"])
    heap: list[tuple[int, int]] = []  # (-key, ordinal): the largest kept key on top
    for ordinal, document in enumerate(_validated(data, StreamFacts())):
        item = (-sample_key(seed, document.doc_id), ordinal)
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    return {ordinal for _, ordinal in heap}


@dataclass
class Block:
    """Parts planned from the stream: ``plans`` are (run-wide index, plan over ``corpus``)."""

    corpus: Corpus
    plans: list[tuple[int, PartPlan]]


def blocks(documents: Iterator[Document], part_chars: int, block_chars: int = BLOCK_CHARS) -> Iterator[Block]:
    """`plan_parts`' groups and pieces, cut as the documents arrive, a block of parts at a time."""
    held: list[Document] = []  # the block's documents
    plans: list[PartPlan] = []
    start, total, index = 0, 0, 0  # the open group is held[start:], of `total` characters
    held_chars = 0

    def block() -> Block:
        nonlocal index
        numbered = list(enumerate(plans, index))
        index += len(plans)
        return Block(Corpus(list(held), 0, ""), numbered)

    for document in documents:
        n_chars = len(document.text)
        held.append(document)
        held_chars += n_chars
        i = len(held) - 1
        if n_chars > part_chars:  # a document of its own, in pieces
            if i > start:
                plans.append(PartPlan(tuple(range(start, i)), 0, 1, total))
            k = max(1, -(-n_chars // part_chars))
            plans.extend(PartPlan((i,), j, k, n_chars) for j in range(k))
            start, total = i + 1, 0
        else:
            total += n_chars
            if total >= part_chars:
                plans.append(PartPlan(tuple(range(start, i + 1)), 0, 1, total))
                start, total = i + 1, 0
        if start == len(held) and held_chars >= block_chars:  # no open group: the block ends here
            yield block()
            held, plans, start, held_chars = [], [], 0, 0
    if len(held) > start:
        plans.append(PartPlan(tuple(range(start, len(held))), 0, 1, total))
    if plans:
        yield block()


def _finished(path: Path, idh: str) -> bool:
    if not path.exists():
        return False
    try:
        verify_part(path, idh)
    except PartError:
        return False  # scored again (the merge would refuse it)
    return True


def run_streamed(
    config: Config, overwrite: bool, fresh: bool, show_progress: bool, return_tokens: bool, run_steps: tuple
) -> dict:
    """`lmeval.run` for ``data.streaming: true`` (one process): each pass reads the stream, plans
    its parts as it reads, scores the unfinished ones and merges every part in stream order.
    ``run_steps`` is `run`'s (``_identity``, ``_finish``), handed down so this module never imports
    `run` (which imports it)."""
    _identity, _finish = run_steps
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError(
            "data.streaming: a streamed corpus is read by one process (got WORLD_SIZE > 1). Run it without "
            "torchrun / accelerate launch, or drop data.streaming to share the parts among ranks."
        )
    started = time.time()
    analyses = analyses_for(config)
    source = Corpus((), 0, source_identity(config.data))
    lock = RunLock(Path(config.output.dir))
    made = missing_folders(Path(config.output.dir))
    out = prepare_output_dir(config.output.dir, overwrite)
    lock.acquire()
    replaced = ReplacedParts(out / "parts", made)
    merger = None
    try:
        clean_leftovers(out)
        identity = _identity(config, source, analyses)
        if overwrite or fresh:
            replaced.set_aside(identity, always=fresh)
        parts = open_parts(out, identity, fresh=fresh)
        idh = identity_hash(identity)
        merger = Merger(out, analyses, {m.name: [] for m in config.models}, layout_of(config, None))
        bar = ScoringProgress(show_progress)
        warm = plots.warm_up()
        try:
            facts = _score_stream(config, analyses, parts, idh, merger, bar)
        finally:
            bar.close()
            warm.join()
        corpus = Corpus(StreamedDocuments(facts.n_documents), facts.n_skipped, facts.digest.hexdigest())
        timing = {"started": started, "scored": time.time()}
        return _finish(out, config, corpus, parts, merger, return_tokens, timing, replaced)
    except BaseException:
        if merger is not None:
            merger.abort()
        replaced.restore_if_nothing_scored()
        raise
    finally:
        lock.release()


def _score_stream(config: Config, analyses, parts: Path, idh: str, merger: Merger, bar) -> StreamFacts:
    """Every pass in config order, each reading the stream once; all must read the same documents."""
    models, first = Models(config), None
    for p in plan_passes(config):
        folder, lm, facts = parts / model_dirname(p.model.name), None, StreamFacts()
        for block in blocks(read_documents(config.data, facts), config.output.part_chars):
            keys = [plan_key(block.corpus, plan, config.scoring.documents) for _, plan in block.plans]
            merger.extend(p.model.name, [folder / f"{k}.parquet" for k in keys])
            todo = [item for item, key in zip(block.plans, keys) if not _finished(folder / f"{key}.parquet", idh)]
            if todo:
                lm = lm or models.get(p.model)  # loaded only when a part must be scored
                bar.plan(sum(plan.weight for _, plan in todo))
                score_share(PassJob(config, block.corpus, analyses, idh, folder, merger, bar), lm, None, todo)
            merger.fold_ready()
        if first is not None and facts.digest.hexdigest() != first.digest.hexdigest():
            raise DataError(
                f"data.path: the stream of {config.data.path} read differently for model {p.model.name} than for "
                f"the first model (another fingerprint); every pass must read the same documents. Pin the "
                "dataset (a local copy), then rerun to resume."
            )
        first = first or facts
        del lm
        gc.collect()
    assert first is not None
    return first
