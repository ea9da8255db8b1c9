"""Issue 25: nothing silently wrong, third round. An empty tokenizer, unchecked part metadata,
a failed start that blocked its own fix, the last tracebacks, and messages that misled.
Each test fails on the code before the fix."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import CORPUS
from test_resume import assert_same_tables, read_tables
from test_run import write_config, write_jsonl
from test_run_folder import ENV, TEXTS, interrupted_after, snapshot

import lmeval
from lmeval import DataError, ModelError, OutputError
from lmeval.cli import main


def _run_config(folder: Path, model: Path, extra: str = "", data: str = "docs.jsonl") -> Path:
    if not (folder / "docs.jsonl").exists():
        write_jsonl(folder / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS[:12])])
    return write_config(folder, f"models: [{{name: a, path: {model}}}]\ndata: {{path: {data}, id_field: id}}\n"
                                "scoring: {max_length: 16, batch_tokens: 64}\noutput: {dir: out, part_chars: 300}\n" + extra)  # fmt: skip


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lmeval: error: " in err, err
    return err


@pytest.fixture
def no_tokenizer(tmp_path, saved_gpt2) -> Path:
    """The tiny model's folder without its tokenizer files: transformers 5 builds an empty tokenizer."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(saved_gpt2, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


# --------------------------------------------------------------------------------------
# 1. An empty tokenizer, a text with no token, and nothing scored
# --------------------------------------------------------------------------------------


def test_run_refuses_a_model_folder_without_tokenizer_files_and_leaves_no_folder(no_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in CORPUS])
    assert main(["run", "--model", str(no_tokenizer), "--data", "docs.jsonl", "--out", "runs/x", "-q"]) == 2
    err = _error(capsys)
    assert "tokenizer" in err and str(no_tokenizer) in err and "empty" in err and "save_pretrained" in err
    assert not (tmp_path / "runs").exists()  # item 3: the failed start created nothing


def test_score_texts_and_surprisal_refuse_an_empty_tokenizer(no_tokenizer, capsys):
    with pytest.raises(ModelError, match="tokenizer of .*no-tokenizer must have a vocabulary"):
        lmeval.score_texts(["Some text."], str(no_tokenizer))
    assert main(["surprisal", "--model", str(no_tokenizer), "Some text."]) == 2
    assert "must have a vocabulary" in _error(capsys)


def test_a_non_empty_text_that_tokenizes_to_no_token_is_named():
    from toy_lm import build_tokenizer

    from lmeval.producers.text import Document, tokenize_documents

    tokenizer = build_tokenizer()  # knows only a, b, space and newline; no unknown token
    assert len(tokenize_documents([Document("fine", "a b")], tokenizer)[0].token_ids) == 2
    with pytest.raises(DataError, match=r"document 'xyz-doc': a non-empty text must tokenize to at least one token.*'xyz'"):
        tokenize_documents([Document("fine", "a b"), Document("xyz-doc", "xyz")], tokenizer)


def test_nothing_scored_gives_nan_never_a_perfect_score():
    from lmeval.analyses.documents import documents_frame, summary_row

    # bos: none and one-token documents: bytes and words counted, no token scored.
    documents = documents_frame("m", ["a", "b"], [0, 0], [5, 7], [1, 1], [0.0, 0.0])
    assert documents["bits_per_byte"].isna().all()
    row = summary_row("m", documents)
    for key in ("bits_per_byte", "word_ppl", "byte_ppl", "ppl", "bits_per_token"):
        assert np.isnan(row[key]), key


def test_a_model_with_no_scored_token_never_enters_a_comparison(caplog):
    from lmeval.analyses.compare import compare_tables

    documents = pd.DataFrame({
        "model": ["real"] * 3 + ["empty"] * 3, "doc_id": ["a", "b", "c"] * 2, "n_tokens": [10, 12, 9, 0, 0, 0],
        "n_bytes": [40, 50, 30] * 2, "n_words": [8, 9, 6] * 2, "nll_sum": [30.0, 33.0, 25.0, 0.0, 0.0, 0.0],
    })  # fmt: skip
    record = {"protocol": {"models": {"real": {"tokenizer_sha256": "x"}, "empty": {"tokenizer_sha256": "y"}}}}
    with caplog.at_level(logging.WARNING):
        for baseline in ("real", "empty"):
            frames = compare_tables({"documents": documents}, record, {"baseline": baseline, "bootstrap": 10})
            assert frames["compare"].empty, baseline
    assert "empty" in caplog.text and "scored no token" in caplog.text


# --------------------------------------------------------------------------------------
# 2. The part checksum covers the metadata the merge reads
# --------------------------------------------------------------------------------------


def _tamper_meta(path: Path, change) -> None:
    """Rewrite a part with its metadata changed and its recorded checksum kept: a flipped bit."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"lmeval"])
    change(meta)
    pq.write_table(table.replace_schema_metadata({b"lmeval": json.dumps(meta).encode("utf-8")}), path)


def test_a_flipped_metadata_field_is_named_and_rescored(tmp_path, saved_gpt2, monkeypatch, caplog):
    config = _run_config(tmp_path, saved_gpt2)
    lmeval.run(str(config), [f"output.dir={tmp_path / 'reference'}"], show_progress=False)
    written = interrupted_after(3, config, monkeypatch)
    for path, field in zip(written, ("nll_sum", "n_bytes", "doc_ids")):  # each read by the merge, none a column
        _tamper_meta(path, lambda meta: meta[field].__setitem__(0, meta[field][0] * 2 + 1 if field != "doc_ids" else "d99"))
    with caplog.at_level(logging.WARNING):
        lmeval.run(str(config), show_progress=False)
    for path in written:
        assert f"result part {path} is not reused" in caplog.text
    assert "checksum" in caplog.text and "scored again" in caplog.text
    assert_same_tables(read_tables(tmp_path / "out"), read_tables(tmp_path / "reference"))


# --------------------------------------------------------------------------------------
# 3. A run that fails before its first part leaves the folder as it found it
# --------------------------------------------------------------------------------------


def test_a_failed_start_leaves_the_folder_byte_identical_and_the_fix_runs(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    assert main(["run", str(config), "-q", "scoring.bos=99999"]) == 2  # refused once the model is loaded
    assert "scoring.bos" in _error(capsys)
    assert snapshot(out) == before and not (out / "parts").exists()
    assert main(["run", str(config), "-q"]) == 0  # the corrected rerun: no "partial run of another config"
    capsys.readouterr()
    shutil.rmtree(out)
    (tmp_path / "docs.jsonl").write_text('{"id": null, "text": "x"}\n')  # refused while loading the data
    assert main(["run", str(config), "-q"]) == 2
    assert not out.exists()


def test_a_failed_fresh_start_puts_the_finished_parts_back(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    interrupted_after(2, config, monkeypatch)
    before = snapshot(tmp_path / "out")
    assert main(["run", str(config), "-q", "--fresh", "scoring.bos=99999"]) == 2
    assert snapshot(tmp_path / "out") == before


# --------------------------------------------------------------------------------------
# 4. Named errors instead of tracebacks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_safetensors_weights_are_a_named_error(damage, saved_gpt2, capsys):
    weights = saved_gpt2 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[10] = ord("#")  # inside the JSON header
    weights.write_bytes(bytes(data))
    assert main(["surprisal", "--model", str(saved_gpt2), "Some text."]) == 2
    err = _error(capsys)
    assert "safetensors" in err and str(saved_gpt2) in err and "again" in err


def test_a_manifest_cut_in_half_is_a_named_error(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    interrupted_after(1, config, monkeypatch)
    manifest = tmp_path / "out" / "parts" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    assert main(["run", str(config), "-q"]) == 2
    err = _error(capsys)
    assert "manifest.json" in err and "--fresh" in err and "fresh=True" not in err
    with pytest.raises(OutputError, match=r"fresh=True"):  # a Python caller is told its own keyword
        lmeval.run(str(config), show_progress=False)
    assert main(["run", str(config), "-q", "--fresh"]) == 0


def test_a_closed_stdout_ends_quietly(saved_gpt2, tmp_path):
    """`lmeval surprisal ... | head -c 1`: the reader goes away; no traceback, SIGPIPE's status."""
    command = [sys.executable, "-m", "lmeval", "surprisal", "--model", str(saved_gpt2), "--format", "csv",
               " ".join(CORPUS * 20)]  # fmt: skip
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody reads: the first write meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_a_broken_pipe_in_process_returns_141(saved_gpt2, monkeypatch, capsys):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["surprisal", "--model", str(saved_gpt2), "Some text."]) == 141
