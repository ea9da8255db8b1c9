"""Streamed corpora (`data.streaming: true`, lmeval.engine.stream): the tables of the corpus
loaded whole, resumed after SIGKILL without rescoring a finished part, max_documents and a
deterministic bottom-n sample on the stream, and the config's refusals."""

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
from helpers import assert_same_tables, child_env, read_tables, write_config, write_jsonl
from lmeval.engine import passes as passes_module
from lmeval.engine import stream as stream_module
from lmeval.engine.config import load_config
from lmeval.engine.data import load_documents
from lmeval.engine.parts import model_dirname
from lmeval.errors import ConfigError

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 7 + 2) % len(CORPUS)]}" for i in range(30)]


def workspace(folder, model, rows=None, part_chars=300):
    rows = rows or [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    rows = [*rows[:3], {"id": "blank", "text": "   "}, *rows[3:]]  # skipped and counted, as when loaded whole
    write_jsonl(folder / "docs.jsonl", rows)
    return write_config(
        folder,
        f"""
models: [{{name: a, path: {model}}}]
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 64}}
output: {{dir: out, part_chars: {part_chars}}}
""",
    )


def test_a_streamed_corpus_gives_the_tables_of_the_corpus_loaded_whole(tmp_path, saved_gpt2, monkeypatch):
    config = workspace(tmp_path, saved_gpt2)
    lmeval.run(str(config), [f"output.dir={tmp_path / 'whole'}"], show_progress=False, return_tokens=False)
    monkeypatch.setattr(stream_module, "BLOCK_CHARS", 700)  # several blocks of parts
    written = []
    real = passes_module.write_part
    monkeypatch.setattr(passes_module, "write_part", lambda path, *a: (written.append(path.name), real(path, *a)))
    lmeval.run(str(config), ["data.streaming=true"], show_progress=False, return_tokens=False)
    out = tmp_path / "out"
    assert_same_tables(read_tables(out), read_tables(tmp_path / "whole"))
    record = json.loads((out / "run.json").read_text())
    whole = json.loads((tmp_path / "whole" / "run.json").read_text())
    # the stream's fingerprint of what was read is the whole corpus's; the counts are the same
    for key in ("fingerprint", "n_documents", "n_skipped"):
        assert record["data"][key] == whole["data"][key], key
    assert record["data"]["n_skipped"] == 1 and record["config"]["data"]["streaming"] is True
    assert len(written) == len(set(written)) > 4  # every part once


# `lmeval run CONFIG data.streaming=true` in a child that pauses after each part it writes, so
# that the kill lands mid-run, between parts or inside one, whatever the machine's speed.
SLOW_CHILD = """
import sys, time
from lmeval.cli import main
from lmeval.engine import passes
real = passes.write_part
def slow(*args):
    real(*args)
    time.sleep(0.3)
passes.write_part = slow
sys.exit(main(["run", sys.argv[1], "-q", "data.streaming=true"]))
"""


@pytest.mark.slow  # a child interpreter importing torch, killed, then a resume: about 20 s on 2 cores
def test_a_streamed_run_resumes_after_sigkill_without_rescoring(tmp_path, saved_gpt2, monkeypatch):
    rows = [{"id": f"d{i}", "text": TEXTS[i % len(TEXTS)] + f" copy {i}"} for i in range(150)]
    config = workspace(tmp_path, saved_gpt2, rows, part_chars=200)
    lmeval.run(str(config), [f"output.dir={tmp_path / 'whole'}"], show_progress=False, return_tokens=False)
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, str(config)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    parts = tmp_path / "out" / "parts" / model_dirname("a")
    deadline = time.time() + 120
    while len(list(parts.glob("*.parquet"))) < 3 and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # now and then inside the next part
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    finished = {p.name for p in parts.glob("*.parquet")}
    assert child.returncode == -signal.SIGKILL and len(finished) >= 3, child.stderr.read()[-2000:]
    assert not (tmp_path / "out" / "run.json").exists()
    written = []
    real = passes_module.write_part
    monkeypatch.setattr(passes_module, "write_part", lambda path, *a: (written.append(path.name), real(path, *a)))
    lmeval.run(str(config), ["data.streaming=true"], show_progress=False, return_tokens=False)
    assert written and not finished & set(written)  # no finished part scored again
    assert_same_tables(read_tables(tmp_path / "out"), read_tables(tmp_path / "whole"))


def test_max_documents_and_the_sample_on_a_stream(tmp_path, saved_gpt2):
    config = workspace(tmp_path, saved_gpt2)
    first = lmeval.run(
        str(config),
        ["data.streaming=true", "data.max_documents=5", f"output.dir={tmp_path / 'first'}"],
        show_progress=False,
        return_tokens=False,
    )
    assert list(first["documents"].doc_id) == ["d0", "d1", "d2", "d3", "d4"]  # the blank row is not a document
    sample = ["data.streaming=true", "data.sample={n: 6, seed: 3}", "output.per_token=false"]
    drawn = lmeval.run(str(config), [*sample, f"output.dir={tmp_path / 's1'}"], show_progress=False)
    ids = [f"d{i}" for i in range(len(TEXTS))]
    expected = sorted(ids, key=lambda i: stream_module.sample_key(3, i))[:6]
    assert set(drawn["documents"].doc_id) == set(expected)
    assert list(drawn["documents"].doc_id) == sorted(expected, key=ids.index)  # scored in stream order
    # the same sample from the stream in another order: the sample does not depend on it
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)][::-1]
    (tmp_path / "reversed").mkdir()
    other = workspace(tmp_path / "reversed", saved_gpt2, rows)
    again = lmeval.run(str(other), [*sample, f"output.dir={tmp_path / 's2'}"], show_progress=False)
    assert set(again["documents"].doc_id) == set(expected)
    pd.testing.assert_series_equal(
        again["documents"].set_index("doc_id").nll_sum.sort_index(),
        drawn["documents"].set_index("doc_id").nll_sum.sort_index(),
        check_exact=True,
    )


def test_the_stream_is_fingerprinted_as_the_corpus_loaded_whole(tmp_path, saved_gpt2):
    config = load_config(workspace(tmp_path, saved_gpt2))
    facts = stream_module.StreamFacts()
    documents = list(stream_module.read_documents(config.data, facts))
    corpus = load_documents(config.data)
    assert facts.digest.hexdigest() == corpus.fingerprint
    assert [d.doc_id for d in documents] == list(corpus.doc_ids) and facts.n_skipped == corpus.n_skipped == 1


def test_streaming_keys_are_checked_all_at_once(tmp_path, saved_gpt2):
    config = workspace(tmp_path, saved_gpt2)
    bad = ["data.sample={n: 0}", "data.group_by=id", "compare.divergence=true"]
    with pytest.raises(ConfigError) as caught:
        load_config(
            config,
            [
                "data.streaming=true",
                *bad,
                f"models=[{{name: a, path: {saved_gpt2}}}, {{name: b, path: {saved_gpt2}}}]",
            ],
        )
    message = str(caught.value)
    assert "data.sample: must be {n: N, seed: S}" in message
    assert "data.streaming: cannot be combined with data.group_by" in message
    assert "data.streaming: cannot be combined with compare.divergence" in message
    with pytest.raises(ConfigError, match=r"data\.sample: needs data\.streaming: true"):
        load_config(config, ["data.sample={n: 3, seed: 0}"])
