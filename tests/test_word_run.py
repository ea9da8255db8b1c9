"""Word tables in `lmeval run` (``analysis.words``): words.parquet equals
``surprisal_table(words=True)`` on the same texts (itself checked against float64 oracles in
test_words_correction), whole words across part boundaries, covariates, run.json, resume and
config errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import lmeval
import lmeval.engine.passes as passes_module
from conftest import CORPUS
from helpers import interrupted_after, write_config
from lmeval.core.covariates import COVARIATES
from lmeval.engine.config import WORD_COVARIATES, load_config
from lmeval.engine.schemas import COLUMNS, OPTIONAL, WORDS
from lmeval.errors import ConfigError
from lmeval.view.surprisal import surprisal_table

# Newlines inside texts (the two conventions differ there), repeated words for the counts,
# and a long document that part_chars cuts into pieces.
TEXTS = [
    CORPUS[0] + "\nAnd the word was the word.",
    CORPUS[1],
    "  leading spaces, trailing newline\n",
    " ".join(CORPUS[2:5]) + "\n\nThe dog. The model! (the end)",
    CORPUS[5],
]
KEYS = ["model", "doc_id", "word_index"]
VALUES = ["surprisal_bits", "surprisal_bits_token_sum", "boundary_before_bits", "boundary_after_bits", "entropy"]


def write_run(folder, model_path, analysis: str, part_chars: int = 100000, texts=TEXTS, extra: str = ""):
    lines = "".join(json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    (folder / "docs.jsonl").write_text(lines, encoding="utf-8")
    return write_config(
        folder,
        f"models: [{{name: tiny, path: {model_path}}}]\n"
        "data: {path: docs.jsonl, id_field: id}\n"
        "scoring: {batch_tokens: 96, max_length: 24, stride: 16}\n"
        f"output: {{dir: out, part_chars: {part_chars}, per_token: false}}\n"
        f"analysis: {{positions: false, words: true, {analysis}}}\n{extra}",
    )


def reference(model_path, **options) -> pd.DataFrame:
    table = surprisal_table(TEXTS, str(model_path), words=True, max_length=24, stride=16, **options)
    table.insert(0, "model", "tiny")
    table["doc_id"] = [f"d{i}" for i in table["doc_id"]]
    return table


def run_words(config) -> tuple[pd.DataFrame, dict]:
    out = config.parent / "out"
    lmeval.run(str(config), show_progress=False)
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return pd.read_parquet(out / "words.parquet"), record


def assert_same_words(ours: pd.DataFrame, theirs: pd.DataFrame) -> None:
    ours = ours.sort_values(KEYS, ignore_index=True)
    theirs = theirs.sort_values(KEYS, ignore_index=True)
    exact = ["model", "doc_id", "word_index", "word", "char_start", "char_end", "n_tokens", "complete", "crosses_word"]
    pd.testing.assert_frame_equal(ours[exact], theirs[exact], check_dtype=False)
    for column in VALUES:
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-5, atol=2e-5, err_msg=column)


@pytest.mark.parametrize("word_boundary", ["whitespace", "marker"])
def test_the_run_writes_the_word_table_of_surprisal_table(tmp_path, saved_gpt2, word_boundary):
    config = write_run(tmp_path, saved_gpt2, f"word_boundary: {word_boundary}")
    words, record = run_words(config)
    theirs = reference(saved_gpt2, word_boundary=word_boundary)
    assert list(words.columns) == WORDS.names
    assert_same_words(words, theirs)
    assert words.attrs == {"word_correction": "bow", "text_end": "eos", "word_boundary": word_boundary}
    assert record["protocol"]["word_boundary"] == word_boundary
    assert record["protocol"]["text_end"] == "eos"
    assert record["words"]["models"]["tiny"] == {"n_words": len(theirs), "word_correction": "bow"}


def test_words_split_across_parts_come_out_whole(tmp_path, saved_gpt2, monkeypatch):
    """part_chars 20: every document longer than that is scored in pieces, whose boundaries
    fall inside words; each word still has one row, equal to the whole document's."""
    real_write, pieces = passes_module.write_part, []

    def recording(path, columns, meta):
        first = int(columns["char_start"].min()) if len(columns["nll"]) else -1
        pieces.append((meta["doc_ids"], meta["piece"], first, len(columns["nll"])))
        real_write(path, columns, meta)

    monkeypatch.setattr(passes_module, "write_part", recording)
    config = write_run(tmp_path, saved_gpt2, "text_end: word", part_chars=20)
    words, _ = run_words(config)
    assert_same_words(words, reference(saved_gpt2, text_end="word"))
    assert not words.duplicated(KEYS).any()
    # The pieces did cut words: a piece (after a document's first) starts inside a word.
    cut = 0
    for (doc_id,), (piece, _), first_char, n_rows in pieces:
        text = TEXTS[int(doc_id[1:])]
        if piece > 0 and n_rows and first_char > 0 and not text[first_char - 1].isspace():
            cut += 1
    assert max(n for _, (_, n), _, _ in pieces) >= 5 and cut >= 3


def test_covariates_add_columns_and_change_no_surprisal(tmp_path, saved_gpt2):
    plain, _ = run_words(write_run(tmp_path, saved_gpt2, "text_end: eos"))
    folder = tmp_path / "with"
    folder.mkdir()
    config = write_run(folder, saved_gpt2, "covariates: [frequency, length, unigram], language: en", part_chars=30)
    words, record = run_words(config)
    theirs = reference(saved_gpt2, covariates=["frequency", "length", "unigram"])
    assert list(words.columns) == WORDS.names + ["length_chars", "frequency_zipf", "unigram_logfreq"]
    assert_same_words(words, theirs)
    words, theirs = words.sort_values(KEYS, ignore_index=True), theirs.sort_values(KEYS, ignore_index=True)
    np.testing.assert_array_equal(words["length_chars"], theirs["length_chars"])
    np.testing.assert_allclose(words["frequency_zipf"], theirs["frequency_zipf"], rtol=1e-12)
    np.testing.assert_allclose(words["unigram_logfreq"], theirs["unigram_logfreq"], rtol=1e-12)
    pd.testing.assert_frame_equal(words[WORDS.names], plain.sort_values(KEYS, ignore_index=True)[WORDS.names])
    assert words.attrs["covariates"] == ["length", "frequency", "unigram"] and words.attrs["language"] == "en"
    assert record["words"]["covariates"] == ["length", "frequency", "unigram"]


def test_an_interrupted_run_resumes_to_the_same_words(tmp_path, saved_gpt2, monkeypatch):
    config = write_run(tmp_path, saved_gpt2, "covariates: [unigram]", part_chars=40)
    interrupted_after(3, config, monkeypatch)
    words, record = run_words(config)
    assert_same_words(words, reference(saved_gpt2))
    assert record["words"]["models"]["tiny"]["n_words"] == len(words)


def test_run_json_says_null_without_the_analysis(tmp_path, saved_gpt2):
    config = write_run(tmp_path, saved_gpt2, "")
    text = config.read_text(encoding="utf-8").replace("words: true, ", "")
    config.write_text(text, encoding="utf-8")
    lmeval.run(str(config), show_progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert record["protocol"]["word_boundary"] is None and "words" not in record
    assert not (tmp_path / "out" / "words.parquet").exists()


@pytest.mark.parametrize(
    ("analysis", "extra", "named"),
    [
        ("word_boundary: space", "", "analysis.word_boundary"),
        ("covariates: [freq]", "", "analysis.covariates"),
        ("text_end: never", "", "analysis.text_end"),
        ("", "scoring: {documents: concatenated}\n", "analysis.words"),
    ],
)
def test_config_errors_name_the_key(tmp_path, saved_gpt2, analysis, extra, named):
    config = write_run(tmp_path, saved_gpt2, analysis)
    if extra:  # replace the scoring line
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("scoring: {batch_tokens: 96, max_length: 24, stride: 16}\n", extra), "utf-8")
    with pytest.raises(ConfigError, match=named):
        load_config(str(config))


def test_word_options_without_the_table_are_refused(tmp_path, saved_gpt2):
    config = write_run(tmp_path, saved_gpt2, "word_boundary: marker")
    config.write_text(config.read_text(encoding="utf-8").replace("words: true, ", ""), "utf-8")
    with pytest.raises(ConfigError, match=r"analysis\.word_boundary: applies to the word table only"):
        load_config(str(config))


def test_the_glossary_and_the_validation_know_every_word_column():
    assert set(WORD_COVARIATES) == set(COVARIATES)
    for column in WORDS.names + list(OPTIONAL["words.parquet"]):
        assert "words.parquet" in COLUMNS[column].tables, column
