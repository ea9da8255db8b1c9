"""Nothing lost: interrupted runs resume from their finished parts, to identical tables."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import assert_same_tables, read_tables, write_config, write_jsonl
from lmeval import OutputError
from lmeval.cli import main
from lmeval.engine.parts import plan_groups

run_module = importlib.import_module("lmeval.engine.passes")  # where parts are written

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 5 + 1) % len(CORPUS)]}" for i in range(24)]


@pytest.fixture
def resumable(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    config = write_config(
        tmp_path,
        f"""
models: [{{name: a, path: {saved_gpt2}}}, {{name: b, path: {saved_gpt2}}}]
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 64}}
output: {{dir: out, part_chars: 300}}
""",
    )
    return tmp_path, config


def test_ctrl_c_keeps_parts_and_resume_scores_only_the_rest(resumable, monkeypatch, capsys):
    folder, config = resumable
    reference_dir = folder / "reference"
    lmeval.run(str(config), [f"output.dir={reference_dir}"], show_progress=False)
    calls = []
    real_write = run_module.write_part

    def interrupt_after_three(path, columns, meta):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, columns, meta)

    monkeypatch.setattr(run_module, "write_part", interrupt_after_three)
    assert main(["run", str(config), "-q"]) == 130
    assert "resume" in capsys.readouterr().err
    assert len(list((folder / "out" / "parts").rglob("*.parquet"))) == 3
    assert not (folder / "out" / "run.json").exists()
    calls.clear()
    monkeypatch.setattr(run_module, "write_part", lambda p, c, m: (calls.append(p), real_write(p, c, m)))
    assert main(["run", str(config), "-q"]) == 0
    n_groups = len(plan_groups([len(t) for t in TEXTS], 300))
    assert len(calls) == 2 * n_groups - 3  # the three finished parts were not scored again
    assert_same_tables(read_tables(folder / "out"), read_tables(reference_dir))
    assert not (folder / "out" / "parts").exists()


def test_sigkill_mid_run_then_rerun_gives_identical_tables(resumable):
    folder, config = resumable
    lmeval.run(str(config), [f"output.dir={folder / 'reference'}"], show_progress=False)
    command = [sys.executable, "-m", "lmeval", "run", str(config), "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = folder / "out" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.rglob("*.parquet"))) < 4 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (folder / "out" / "run.json").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_tables(read_tables(folder / "out"), read_tables(folder / "reference"))
    record = json.loads((folder / "out" / "run.json").read_text())
    assert record["data"]["n_documents"] == len(TEXTS)


def test_resume_refuses_a_changed_config_and_fresh_starts_over(resumable, monkeypatch):
    folder, config = resumable

    real_write, written = run_module.write_part, []

    def interrupt(path, columns, meta):  # after one part: a run stopped before its first leaves nothing
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, columns, meta)

    monkeypatch.setattr(run_module, "write_part", interrupt)
    with pytest.raises(KeyboardInterrupt):
        lmeval.run(str(config), show_progress=False)
    monkeypatch.setattr(run_module, "write_part", real_write)
    with pytest.raises(OutputError, match=r"different config.*--fresh"):
        lmeval.run(str(config), ["scoring.max_length=32"], show_progress=False)
    write_jsonl(folder / "docs.jsonl", [{"id": f"d{i}", "text": t + "!"} for i, t in enumerate(TEXTS)])
    with pytest.raises(OutputError, match="data"):
        lmeval.run(str(config), show_progress=False)
    tables = lmeval.run(str(config), fresh=True, show_progress=False)
    assert tables["summary"].n_documents.tolist() == [len(TEXTS)] * 2


def test_document_ids_never_become_paths(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "../../escape", "text": CORPUS[0]}, {"id": "/abs", "text": CORPUS[1]}])
    config = write_config(
        tmp_path,
        f"models: [{{path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\noutput: {{dir: out, part_chars: 1}}\n",
    )
    tables = lmeval.run(str(config), show_progress=False)
    assert set(tables["documents"].doc_id) == {"../../escape", "/abs"}
    outside = [p for p in tmp_path.rglob("*") if "out" not in p.parts and p.suffix == ".parquet"]
    assert outside == []


def test_concatenated_without_ids_runs_and_resumes_after_sigkill(tmp_path, saved_gpt2):
    """Row-number ids (integers) and the stream's `<separator>` share one string doc_id
    column; the pooled nll equals `score_texts` on the joined text; a SIGKILL between the two
    models' parts resumes to identical tables."""
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in TEXTS])
    config = write_config(
        tmp_path,
        f"models: [{{name: a, path: {saved_gpt2}}}, {{name: b, path: {saved_gpt2}}}]\n"
        "data: {path: docs.jsonl}\nscoring: {max_length: 16, batch_tokens: 64, documents: concatenated}\n"
        "output: {dir: out}\n",
    )
    reference = lmeval.run(str(config), [f"output.dir={tmp_path / 'reference'}"], show_progress=False)
    for name in (
        "tokens.parquet",
        "documents.parquet",
        "summary.csv",
        "calibration.csv",
        "temperature.csv",
        "compare.csv",
    ):
        assert (tmp_path / "reference" / name).exists(), name
    documents = pd.read_parquet(tmp_path / "reference" / "documents.parquet")
    assert documents.doc_id.tolist()[: len(TEXTS) + 1] == [str(i) for i in range(len(TEXTS))] + ["<separator>"]
    stream = lmeval.score_texts(["\n\n".join(TEXTS)], str(saved_gpt2), max_length=16)
    summary = reference["summary"].set_index("model")
    assert summary.nll_sum["a"] == pytest.approx(stream.nll.astype("float64").sum(), rel=1e-6)
    assert summary.n_tokens["a"] == len(stream)

    command = [sys.executable, "-m", "lmeval", "run", str(config), "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "out" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.rglob("*.parquet")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_tables(read_tables(tmp_path / "out"), read_tables(tmp_path / "reference"))
