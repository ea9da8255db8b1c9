"""The corpus reads its texts from the Arrow table on demand: the same documents, skips, ids and
fingerprint as the eager list it replaced (re-implemented here as the oracle), one validating pass
with the same errors, planning linear in the documents, and iterating that never holds every text."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import lmeval
from lmeval.engine import data as data_module
from lmeval.engine.config import DataConfig
from lmeval.engine.data import Corpus, Document, load_documents
from lmeval.engine.detokenize import wikitext_detokenizer
from lmeval.engine.plan import PartPlan, part_doc_ids, plan_key, plan_parts

BOM = "\ufeff"
# Blank and nearly blank texts on purpose: "\x1c" and "\u3000" are whitespace to Python's strip.
TEXTS = [
    "Hello world.",
    "   ",
    f"{BOM}A BOM-led text.",
    "Naïve café — 猫 😀",
    "\t\n",
    "\x1c\u3000",
    "x",
    f"{BOM}  ",
    "\u00a0nbsp-led",
    "Line one\nLine two",
    "?",
    "last one",
]
PAGES = [
    (
        " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a "
        "guest @-@ starring role on the television series The Bill in 2000 . \n"
    ),
    (
        " = = Career = = \n In 2006 , Boulter starred alongside Whishaw in the play Citizenship ( written by "
        'Mark Ravenhill ) . It was 4 @,@ 000 feet , or 1 @.@ 2 km ; it \'s " hot " : 30 ° C ! \n'
    ),
    "  \n",
    ' The 2 @.@ 5 km road ; it \'s " closed " . \n',
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Each test's `datasets` cache in its tmp_path: the 1M-row corpora never pile up in ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def eager_load(config) -> tuple[list[Document], int]:
    """The oracle: the pre-streaming `load_documents`, every row a Python object, for valid corpora."""
    table = data_module._load_dataset(config)
    texts = table[config.text_field]
    ids = table[config.id_field] if config.id_field else list(range(len(texts)))
    contexts = table[config.context_field] if config.context_field else [None] * len(texts)
    documents, n_skipped = [], 0
    for doc_id, text, context in zip(ids, texts, contexts):
        if config.max_documents is not None and len(documents) >= config.max_documents:
            break
        text = text[1:] if text.startswith(BOM) else text
        if not text.strip():
            n_skipped += 1
            continue
        documents.append(Document(doc_id if isinstance(doc_id, int) else str(doc_id), text, context=context))
    if config.detokenizer == "wikitext":  # as detokenize_documents rewrote them: source kept
        documents = [Document(d.doc_id, wikitext_detokenizer(d.text), source=d.text) for d in documents]
    return documents, n_skipped


def reference_fingerprint(documents) -> str:
    """sha256 over each document's id, text (and context) as 8-byte little-endian length + UTF-8 bytes."""
    digest = hashlib.sha256()
    for doc in documents:
        parts = [str(doc.doc_id), doc.text] + ([] if doc.context is None else ["\x00context", doc.context])
        for part in parts:
            raw = part.encode("utf-8")
            digest.update(struct.pack("<Q", len(raw)))
            digest.update(raw)
    return digest.hexdigest()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_corpus(kind: str, folder) -> DataConfig:
    """One fixture per format: str ids (jsonl), int ids (csv), contexts (parquet), row numbers (txt)."""
    if kind == "jsonl":
        rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
        return DataConfig(path=write_jsonl(folder / "docs.jsonl", rows), id_field="id")
    if kind == "csv":
        texts = [t for t in TEXTS if t.strip(" ")]  # a CSV reader turns an empty field into a null
        pd.DataFrame({"id": [10 * i for i in range(len(texts))], "text": texts}).to_csv(
            folder / "docs.csv", index=False
        )
        return DataConfig(path=str(folder / "docs.csv"), id_field="id")
    if kind == "parquet":
        contexts = [f"Q{i}: " for i in range(len(TEXTS))]
        table = pa.table({"id": np.arange(len(TEXTS)) + 100, "text": TEXTS, "ctx": contexts})
        pq.write_table(table, folder / "docs.parquet", row_group_size=5)
        return DataConfig(path=str(folder / "docs.parquet"), id_field="id", context_field="ctx")
    (folder / "docs.txt").write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n", encoding="utf-8")
    return DataConfig(path=str(folder / "docs.txt"), sample_by="line")


def assert_same_as_eager(corpus: Corpus, config) -> None:
    expected, n_skipped = eager_load(config)
    assert list(corpus.documents) == expected and corpus.n_skipped == n_skipped
    assert corpus.fingerprint == reference_fingerprint(expected)
    assert corpus.lengths.dtype == np.int64 and corpus.lengths.tolist() == [len(d.text) for d in expected]
    assert list(corpus.doc_ids) == [d.doc_id for d in expected]
    assert [type(i) for i in corpus.doc_ids] == [type(d.doc_id) for d in expected]
    n = len(expected)
    assert len(corpus.documents) == n and corpus.documents[0] == expected[0] and corpus.documents[-1] == expected[-1]
    assert corpus.documents[1:n:2] == expected[1:n:2] and corpus.documents[::-1] == expected[::-1]
    picks = random.Random(0).choices(range(n), k=3 * n)
    assert corpus.take(picks) == [expected[i] for i in picks] == [corpus.documents[i] for i in picks]
    with pytest.raises(IndexError):
        corpus.documents[n]


@pytest.mark.parametrize("batch_rows", [10_000, 3])
@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "txt"])
def test_the_lazy_corpus_is_the_eager_one(kind, batch_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "BATCH_ROWS", batch_rows)  # 3: every check crosses batch edges
    config = write_corpus(kind, tmp_path)
    corpus = load_documents(config)
    assert isinstance(corpus.documents, Sequence) and not isinstance(corpus.documents, list)
    assert corpus.n_skipped > 0 and BOM not in "".join(d.text[:1] for d in corpus.documents)
    assert_same_as_eager(corpus, config)


@pytest.mark.parametrize("batch_rows", [10_000, 2])
def test_the_detokenizer_rewrites_lengths_fingerprint_and_each_read(batch_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "BATCH_ROWS", batch_rows)
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"page": p} for p in PAGES])
    config = DataConfig(path=path, text_field="page", detokenizer="wikitext")
    corpus = load_documents(config)
    assert corpus.documents[0].source == PAGES[0] and corpus.documents[0].text == wikitext_detokenizer(PAGES[0])
    assert corpus.lengths[0] < len(PAGES[0]) and corpus.n_skipped == 1
    assert_same_as_eager(corpus, config)


@pytest.mark.parametrize("batch_rows", [10_000, 2])
def test_max_documents_counts_kept_documents_and_stops_checking_there(batch_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "BATCH_ROWS", batch_rows)
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)] + [{"id": None, "text": None}]
    config = DataConfig(path=write_jsonl(tmp_path / "docs.jsonl", rows), id_field="id", max_documents=4)
    corpus = load_documents(config)  # the faulty last row lies past the limit, as before
    assert len(corpus.documents) == 4
    assert_same_as_eager(corpus, config)


def _error_rows(fault: str) -> list[dict]:
    rows = [{"id": f"d{i}", "text": f"text {i}", "ctx": "c"} for i in range(9)]
    if fault == "duplicate":
        rows[7]["id"] = "d2"
    elif fault == "null id":
        rows[5]["id"] = None
    elif fault == "int text":  # an Arrow column has one type: a text column of numbers fails at row 0
        rows = [dict(r, text=i) for i, r in enumerate(rows)]
    else:
        rows[4]["ctx"] = None
    rows[8]["id"] = "d0"  # a later fault never hides the first one
    return rows


ERRORS = {
    "duplicate": "data.id_field: id 'd2' appears twice ({path}: line 3 and {path}: line 8); ids must be unique. "
    "Deduplicate the corpus or drop `id_field` to use row numbers.",
    "null id": "{path}: line 6 has a null `id` (None); an id must be a string or an integer. Fix that row, "
    "choose another data.id_field, or drop id_field to use row numbers.",
    "int text": "{path}: line 1 (id 'd0') has a int `text`; it must be text. Fix or remove that row.",
    "null context": "{path}: line 5 (id 'd4') has a NoneType `ctx`; it must be text (an empty string for no "
    "context). Fix or remove that row.",
}


@pytest.mark.parametrize("batch_rows", [10_000, 3])
@pytest.mark.parametrize("fault", list(ERRORS))
def test_each_fault_raises_its_unchanged_message_at_its_row(fault, batch_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "BATCH_ROWS", batch_rows)
    path = write_jsonl(tmp_path / "docs.jsonl", _error_rows(fault))
    config = DataConfig(path=path, id_field="id", context_field="ctx")
    expected = ERRORS[fault].format(path=path)
    with pytest.raises(lmeval.DataError) as raised:
        load_documents(config)
    assert str(raised.value) == expected


def test_a_nan_id_is_named_as_null(tmp_path):
    pq.write_table(pa.table({"id": [1.0, float("nan")], "text": ["a", "b"]}), tmp_path / "docs.parquet")
    with pytest.raises(lmeval.DataError, match=r"docs\.parquet: row 2 \(counting from 1\) has a null `id` \(nan\)"):
        load_documents(DataConfig(path=str(tmp_path / "docs.parquet"), id_field="id"))


def test_a_float_id_column_keeps_string_ids(tmp_path):
    pq.write_table(pa.table({"id": [1.5, 2.0], "text": ["a", "b"]}), tmp_path / "docs.parquet")
    config = DataConfig(path=str(tmp_path / "docs.parquet"), id_field="id")
    corpus = load_documents(config)
    assert list(corpus.doc_ids) == ["1.5", "2.0"]
    assert_same_as_eager(corpus, config)


def test_a_json_feature_column_is_read_decoded_as_dataset_indexing_reads_it(tmp_path):
    # Mixed JSON values make `datasets` store a column as its `Json` feature (JSON strings in Arrow).
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "text": "x"}, {"id": {"k": 1}, "text": "y"}])
    with pytest.raises(lmeval.DataError, match=r"ids\.jsonl: line 2 has a dict `id` \(\{'k': 1\}\)"):
        load_documents(DataConfig(path=path, id_field="id"))
    path = write_jsonl(tmp_path / "texts.jsonl", [{"id": "a", "text": "x y"}, {"id": "b", "text": {"k": 1}}])
    config = DataConfig(path=path, id_field="id", max_documents=1)  # the dict text lies past the limit
    corpus = load_documents(config)
    assert list(corpus.documents) == [Document("a", "x y")] == corpus.take([0])
    assert_same_as_eager(corpus, config)


def test_a_batch_of_only_blank_texts_is_skipped_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "BATCH_ROWS", 2)
    table = pa.table({"id": [1, 2, 3, 4, 5], "text": ["a", "b", " ", "\n", "c"], "ctx": ["x", "", "y", "z", "w"]})
    pq.write_table(table, tmp_path / "docs.parquet")
    config = DataConfig(path=str(tmp_path / "docs.parquet"), id_field="id", context_field="ctx")
    corpus = load_documents(config)
    assert corpus.doc_ids == [1, 2, 5] and corpus.n_skipped == 2
    assert_same_as_eager(corpus, config)


def test_a_corpus_built_from_a_list_keeps_working():
    documents = [Document(0, "ab"), Document("x", "cde", context="q"), Document(7, "")]
    corpus = Corpus(documents, 1, "fp")
    assert corpus.documents is documents and corpus.lengths.tolist() == [2, 3, 0] and corpus.lengths.dtype == np.int64
    assert list(corpus.doc_ids) == [0, "x", 7] and corpus.take([2, 0]) == [documents[2], documents[0]]
    assert data_module.fingerprint_documents(documents) == reference_fingerprint(documents)


# --------------------------------------------------------------------------------------
# Planning: linear, the same plans, and ids without texts
# --------------------------------------------------------------------------------------


def reference_plans(lengths: list[int], documents_mode: str, separator: str, part_chars: int) -> list[PartPlan]:
    """The plan as first written: re-sum each group for every document (quadratic, obviously right)."""

    def pieces(docs, n_chars):
        k = max(1, -(-n_chars // part_chars))
        return [PartPlan(docs, j, k, n_chars) for j in range(k)]

    if documents_mode == "concatenated":
        return pieces(tuple(range(len(lengths))), sum(lengths) + len(separator) * (len(lengths) - 1))
    plans, group = [], []
    for i, n in enumerate(lengths):
        if n > part_chars:
            plans += [PartPlan(tuple(group), 0, 1, sum(lengths[j] for j in group))] if group else []
            plans += pieces((i,), n)
            group = []
            continue
        group.append(i)
        if sum(lengths[j] for j in group) >= part_chars:
            plans.append(PartPlan(tuple(group), 0, 1, sum(lengths[j] for j in group)))
            group = []
    return plans + ([PartPlan(tuple(group), 0, 1, sum(lengths[j] for j in group))] if group else [])


class NoTexts(Sequence):
    """Documents whose texts must not be read: planning and naming parts use lengths and ids alone."""

    def __init__(self, lengths):
        self.lengths, self.doc_ids = np.asarray(lengths, dtype=np.int64), [f"d{i}" for i in range(len(lengths))]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        raise AssertionError("a text was read")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("documents_mode", ["independent", "concatenated"])
def test_plans_match_the_quadratic_reference(seed, documents_mode):
    rng = random.Random(seed)
    part_chars = rng.choice([1, 7, 100, 1000])
    choices = lambda: [0, 1, rng.randrange(part_chars + 1), rng.randrange(4 * part_chars + 2)]  # noqa: E731
    lengths = [rng.choice(choices()) for _ in range(rng.randrange(1, 400))]
    assert any(n > part_chars for n in lengths) or part_chars == 1000
    corpus = Corpus(NoTexts(lengths), 0, "fp")
    plans = plan_parts(corpus, documents_mode, "\n\n", part_chars)
    assert plans == reference_plans(lengths, documents_mode, "\n\n", part_chars)
    assert all(type(p.n_chars) is int for p in plans)
    listed = Corpus([Document(f"d{i}", "x" * n) for i, n in enumerate(lengths)], 0, "fp")
    assert plan_parts(listed, documents_mode, "\n\n", part_chars) == plans
    for plan in plans[:20]:
        assert part_doc_ids(corpus, plan, documents_mode) == part_doc_ids(listed, plan, documents_mode)
        assert plan_key(corpus, plan, documents_mode) == plan_key(listed, plan, documents_mode)


def write_short_rows(path, n: int) -> DataConfig:
    """``n`` documents of about 50 characters in one parquet file, written by pyarrow in one call."""
    ids = pa.array(np.arange(n, dtype=np.int64))
    texts = pc.binary_join_element_wise("document ", ids.cast(pa.string()), " " + "x" * 33, "")
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return DataConfig(path=str(path), id_field="id")


@pytest.mark.parametrize("n, limit_s", [(100_000, 1.0), (1_000_000, 5.0)])
def test_planning_many_short_documents_is_fast(n, limit_s, tmp_path):
    corpus = load_documents(write_short_rows(tmp_path / "short.parquet", n))
    assert len(corpus.documents) == n and 45 <= corpus.lengths.mean() <= 55
    start = time.perf_counter()
    plans = plan_parts(corpus, "independent", "\n\n", 262_144)
    seconds = time.perf_counter() - start
    assert seconds < limit_s, f"planning {n} documents took {seconds:.2f} s"
    assert [i for p in plans for i in p.docs] == list(range(n))
    assert corpus.documents[n - 1] == Document(n - 1, f"document {n - 1} " + "x" * 33)


def test_iterating_a_20mb_corpus_never_holds_every_text(tmp_path):
    n, size = 20_000, 1_000
    texts = [f"{i:08d}" + "é" * (size - 8) for i in range(n)]  # 20 M characters, 40 MB of UTF-8
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=2_000)
    del texts
    config = DataConfig(path=str(tmp_path / "big.parquet"))
    load_documents(config)  # `datasets` converts the file to its Arrow cache once: not ours to measure
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        corpus = load_documents(config)
        load_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        seen = sum(len(d.text) for d in corpus.documents)
        iter_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert seen == n * size == int(corpus.lengths.sum())
    corpus_bytes = n * (size + 49)  # each text as a Python str: at least its characters
    assert load_peak < corpus_bytes / 4, f"loading peaked at {load_peak / 1e6:.1f} MB"
    assert iter_peak < corpus_bytes / 4, f"iterating peaked at {iter_peak / 1e6:.1f} MB"


def _resident_bytes_of(folder) -> int:
    """Resident bytes of every mapping of a file under ``folder`` in this process (/proc/self/smaps)."""
    resident, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(str(folder))
            elif inside and fields[0] == "Rss:":
                resident += int(fields[1]) * 1024
    return resident


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_reading_the_whole_corpus_leaves_none_of_its_cache_resident(tmp_path):
    """Validating and reading every text maps the cache a record batch at a time: nothing of it
    stays in the process (datasets' own map of it kept every page read, 40 MB here)."""
    from lmeval.engine.columns import MappedColumn

    n, size = 10_000, 2_000
    texts = [f"{i:08d}" + "é" * (size - 8) for i in range(n)]  # 40 MB of UTF-8
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=1_000)
    del texts
    corpus = load_documents(DataConfig(path=str(tmp_path / "big.parquet")))
    assert sum(len(d.text) for d in corpus.documents) == n * size
    assert corpus.take([5, n - 1, 7])[1].text.startswith(f"{n - 1:08d}")
    assert _resident_bytes_of(tmp_path / "hf_cache") < 2e6  # at most the schema and batch headers
    assert isinstance(corpus.documents.texts, MappedColumn)


def test_a_renamed_or_in_memory_table_is_read_through_its_own_chunks(tmp_path):
    """Only cache files stored as the dataset reads them are mapped by lmeval; a column that
    `datasets` renames on load, or a table in memory, is read from the table as it was."""
    import datasets

    from lmeval.engine.columns import MappedSource, TableSource, open_source

    pq.write_table(pa.table({"body": ["a", "b", "c"]}), tmp_path / "x.parquet", row_group_size=1)
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "x.parquet"), split="train")
    assert isinstance(open_source(loaded, loaded.data.table, ["body"]), MappedSource)
    renamed = loaded.rename_column("body", "text")
    for dataset in (renamed, datasets.Dataset.from_dict({"text": ["a", "b", "c"]})):
        source = open_source(dataset, dataset.data.table, ["text"])
        assert isinstance(source, TableSource)
        assert source.column("text").fetch(np.array([2, 0])) == ["c", "a"]
    mapped = open_source(loaded, loaded.data.table, ["body"])
    assert mapped.column("body").fetch(np.array([2, 0, 1])) == ["c", "a", "b"]
    batches = list(mapped.batches(["body"], 2))
    assert all(b.num_rows <= 2 for _, b in batches)
    assert [s for s, _ in batches] == np.cumsum([0] + [b.num_rows for _, b in batches[:-1]]).tolist()
    assert [v for _, b in batches for v in b.column("body").to_pylist()] == ["a", "b", "c"]
