"""A run folder nothing can silently corrupt: one run at a time, parts that prove themselves,
a safe --overwrite, huge documents in resumable pieces, and no leftovers."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lmeval
from conftest import CORPUS
from helpers import ENV, assert_same_tables, interrupted_after, read_tables, snapshot, write_config, write_jsonl
from helpers import FOLDER_TEXTS as TEXTS
from helpers import passes_module as run_module
from lmeval import OutputError
from lmeval.cli import main


@pytest.fixture
def folder_config(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    config = write_config(
        tmp_path,
        f"models: [{{name: a, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        "scoring: {max_length: 16, batch_tokens: 64}\noutput: {dir: out, part_chars: 300}\n",
    )
    return tmp_path, config


def wait_for(condition, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition() and proc.poll() is None:
        time.sleep(0.01)


# --------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------


def test_a_second_run_on_the_folder_is_refused_at_once_naming_the_first(folder_config, capsys):
    folder, config = folder_config
    lmeval.run(str(config), [f"output.dir={folder / 'alone'}"], show_progress=False)
    first = subprocess.Popen(
        [sys.executable, "-m", "lmeval", "run", str(config), "-q"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = folder / "out" / ".lmeval.lock"
    wait_for(lambda: lock.exists() and str(first.pid) in lock.read_text(), first)
    started = time.time()
    code = main(["run", str(config), "-q", "scoring.stride=8"])  # another protocol, same folder
    err = capsys.readouterr().err
    assert code == 2 and time.time() - started < 30
    assert f"in use by another lmeval run (pid {first.pid}" in err and "Traceback" not in err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert_same_tables(read_tables(folder / "out"), read_tables(folder / "alone"))
    record = json.loads((folder / "out" / "run.json").read_text())
    assert record["protocol"]["models"]["a"]["stride"] == 16


def test_a_lock_left_by_a_killed_run_is_taken_over(folder_config):
    folder, config = folder_config
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmeval", "run", str(config), "-q"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = folder / "out" / ".lmeval.lock"
    wait_for(lambda: lock.exists() and str(proc.pid) in lock.read_text(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert str(proc.pid) in lock.read_text()  # the record of the dead holder is still there
    tables = lmeval.run(str(config), show_progress=False)
    assert tables["summary"].n_documents.tolist() == [len(TEXTS)]


# --------------------------------------------------------------------------------------
# Parts that prove themselves
# --------------------------------------------------------------------------------------


def _random_bytes_inside(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "zero_bytes", "another_protocol"])
def test_a_damaged_or_foreign_part_is_named_and_scored_again(folder_config, monkeypatch, caplog, damage):
    folder, config = folder_config
    lmeval.run(str(config), [f"output.dir={folder / 'clean'}"], show_progress=False)
    written = interrupted_after(3, config, monkeypatch)
    victim = written[1]
    if damage == "another_protocol":  # the same part of a run with another stride, put in its place
        other = interrupted_after(3, config, monkeypatch, [f"output.dir={folder / 'other'}", "scoring.stride=8"])
        victim.write_bytes(other[1].read_bytes())
    else:
        {"random_bytes": _random_bytes_inside, "truncated": _truncate, "zero_bytes": _empty}[damage](victim)
    with caplog.at_level("WARNING"):
        lmeval.run(str(config), show_progress=False)
    assert str(victim) in caplog.text and "scored again" in caplog.text
    assert_same_tables(read_tables(folder / "out"), read_tables(folder / "clean"))


def test_parts_without_their_manifest_are_an_error_not_a_fresh_start(folder_config, monkeypatch, capsys):
    folder, config = folder_config
    interrupted_after(2, config, monkeypatch)
    (folder / "out" / "parts" / "manifest.json").unlink()
    assert main(["run", str(config), "-q"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["run", str(config), "-q", "--fresh"]) == 0


# --------------------------------------------------------------------------------------
# A safe --overwrite
# --------------------------------------------------------------------------------------


def test_overwrite_with_a_model_that_fails_to_load_changes_nothing(folder_config, tmp_path, capsys):
    folder, config = folder_config
    assert main(["run", str(config), "-q"]) == 0
    before = snapshot(folder / "out")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert main(["run", str(config), "-q", "--overwrite", f"models.0.path={broken}"]) == 2
    assert "no model weights" in capsys.readouterr().err
    assert snapshot(folder / "out") == before  # byte-identical: no parts/, lock or temporary file left behind


def test_overwrite_resumes_the_same_run_and_replaces_a_finished_one(folder_config, monkeypatch):
    folder, config = folder_config
    finished = interrupted_after(2, config, monkeypatch)
    real_write, rewritten = run_module.write_part, []
    monkeypatch.setattr(run_module, "write_part", lambda p, c, m: (rewritten.append(p), real_write(p, c, m)))
    lmeval.run(str(config), overwrite=True, show_progress=False)  # same identity: a resume
    assert rewritten and not set(rewritten) & set(finished)
    (folder / "out" / "compare.csv").write_text("stale\n")  # a file the new run will not write
    tables = lmeval.run(str(config), ["scoring.stride=8"], overwrite=True, show_progress=False)
    record = json.loads((folder / "out" / "run.json").read_text())
    assert record["protocol"]["models"]["a"]["stride"] == 8 == tables["run"]["protocol"]["models"]["a"]["stride"]
    assert not (folder / "out" / "compare.csv").exists() and not (folder / "out" / "parts").exists()
    with pytest.raises(OutputError, match="--overwrite"):
        lmeval.run(str(config), show_progress=False)


# --------------------------------------------------------------------------------------
# Huge documents in resumable pieces
# --------------------------------------------------------------------------------------


@pytest.fixture
def huge_document(tmp_path, saved_gpt2):
    text = " ".join(CORPUS * 8)  # ~3.5k characters
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "short", "text": CORPUS[0]}, {"id": "huge", "text": text}])
    part_chars = len(text) // 10
    config = write_config(
        tmp_path,
        f"models: [{{name: a, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        f"scoring: {{max_length: 16, stride: 8, batch_tokens: 64}}\noutput: {{dir: out, part_chars: {part_chars}}}\n",
    )
    return tmp_path, config, text


def test_a_huge_document_in_pieces_equals_scoring_it_whole(huge_document, saved_gpt2):
    _folder, config, text = huge_document
    tables = lmeval.run(str(config), show_progress=False)
    whole = lmeval.score_texts([text], str(saved_gpt2), max_length=16, stride=8)
    ours = tables["tokens"][tables["tokens"].doc_id == "huge"].reset_index(drop=True)
    assert ours.position.tolist() == whole.position.tolist()
    np.testing.assert_allclose(ours.nll, whole.nll, rtol=1e-6, atol=1e-6)
    doc = tables["documents"].set_index("doc_id").loc["huge"]
    assert doc.n_tokens == len(whole) and doc.n_bytes == len(text.encode())
    assert doc.nll_sum == pytest.approx(whole.nll.astype(np.float64).sum(), rel=1e-6)


def test_a_huge_document_killed_half_way_resumes_without_rescoring_its_finished_pieces(huge_document):
    folder, config, text = huge_document
    lmeval.run(str(config), [f"output.dir={folder / 'reference'}"], show_progress=False)
    command = [sys.executable, "-m", "lmeval", "run", str(config), "-q"]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = folder / "out" / "parts"
    wait_for(lambda: len(list(parts.glob("*/*.parquet"))) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = {p: p.stat().st_ino for p in parts.glob("*/*.parquet")}
    n_parts = 1 + math.ceil(len(text) / (len(text) // 10))  # the short document's part, and the huge one's pieces
    assert 5 <= len(finished) < n_parts
    real_write, rewritten = run_module.write_part, []
    run_module.write_part = lambda p, c, m: (rewritten.append(p), real_write(p, c, m))
    try:
        lmeval.run(str(config), show_progress=False)
    finally:
        run_module.write_part = real_write
    assert not set(rewritten) & set(finished) and len(rewritten) == n_parts - len(finished)
    assert_same_tables(read_tables(folder / "out"), read_tables(folder / "reference"))


def test_concatenated_scoring_is_cut_into_pieces_too(huge_document, saved_gpt2):
    _folder, config, text = huge_document
    tables = lmeval.run(str(config), ["scoring.documents=concatenated"], show_progress=False)
    joined = "\n\n".join([CORPUS[0], text])
    stream = lmeval.score_texts([joined], str(saved_gpt2), max_length=16, stride=8)
    assert tables["summary"].n_tokens.iloc[0] == len(stream)
    assert tables["summary"].nll_sum.iloc[0] == pytest.approx(stream.nll.astype(np.float64).sum(), rel=1e-6)
    assert tables["summary"].n_bytes.iloc[0] == len(joined.encode())


# --------------------------------------------------------------------------------------
# Leftovers
# --------------------------------------------------------------------------------------


def test_temporary_files_of_a_killed_run_are_cleaned_at_the_next_run(folder_config, monkeypatch):
    folder, config = folder_config
    interrupted_after(2, config, monkeypatch)
    out = folder / "out"
    model_folder = next(p for p in (out / "parts").iterdir() if p.is_dir())
    leftovers = [
        out / ".tokens.parquet.tmp-99999",
        out / "parts" / ".manifest.json.tmp-1",
        model_folder / ".abc.parquet.tmp-424242",
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    lmeval.run(str(config), show_progress=False)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
