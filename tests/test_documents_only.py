"""`lmeval run --documents-only` (output.documents_only): per-document nll sums for data
filtering, the same float64 sums as a full run, fewer files, no temperature grid scored."""

import json

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import two_model_config
from lmeval.cli import main
from lmeval.engine import passes as passes_module
from lmeval.engine.config import load_config
from lmeval.errors import ConfigError

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 3 + 1) % len(CORPUS)]}" for i in range(12)]


def test_documents_only_gives_the_full_runs_document_sums_and_fewer_files(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    full = lmeval.run(str(config), [f"output.dir={tmp_path / 'full'}"], show_progress=False, return_tokens=False)
    grids = []
    real = passes_module.score_parts

    def recorded(jobs, lm, plans, **kwargs):
        grids.append(passes_module._options(next(iter(jobs.values())), lm, 1.0).temperatures)
        return real(jobs, lm, plans, **kwargs)

    monkeypatch.setattr(passes_module, "score_parts", recorded)
    out = tmp_path / "only"
    assert main(["run", str(config), "-q", "--documents-only", "--out", str(out)]) == 0
    assert "ppl" in capsys.readouterr().out
    assert grids and all(g == () for g in grids)  # no temperature grid reduced per token
    files = sorted(p.name for p in out.iterdir())
    assert files == ["documents.parquet", "run.json", "summary.csv"], files
    assert len(files) < len(list((tmp_path / "full").iterdir()))
    documents = pd.read_parquet(out / "documents.parquet")
    reference = pd.read_parquet(tmp_path / "full" / "documents.parquet")[documents.columns]
    counts = ["model", "doc_id", "n_tokens", "n_bytes", "n_words"]
    pd.testing.assert_frame_equal(documents[counts], reference[counts])
    np.testing.assert_allclose(documents.nll_sum, reference.nll_sum, rtol=1e-9, atol=0)
    np.testing.assert_allclose(documents.bits_per_byte, reference.bits_per_byte, rtol=1e-9, atol=0)
    summary = pd.read_csv(out / "summary.csv")
    assert "ece" not in summary and "icl_score" not in summary
    np.testing.assert_allclose(summary.ppl, full["summary"].ppl, rtol=1e-9)
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["output"]["documents_only"] is True


def test_documents_only_refuses_the_analyses_that_need_token_columns(tmp_path, saved_gpt2):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    overrides = ["output.documents_only=true", "compare.divergence=true", "analysis.words=true"]
    with pytest.raises(ConfigError) as caught:
        load_config(config, overrides)
    message = str(caught.value)
    assert "compare.divergence: must be false with output.documents_only" in message
    assert "analysis.words: must be false with output.documents_only" in message  # every problem at once


def test_a_documents_only_run_does_not_resume_a_full_runs_parts(tmp_path, saved_gpt2):
    """Its parts keep no token columns, so it has its own identity: a full run never merges them."""
    from lmeval.analyses import analyses_for
    from lmeval.engine.data import load_documents
    from lmeval.engine.run import _identity

    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    full, only = load_config(config), load_config(config, ["output.documents_only=true"])
    corpus = load_documents(full.data)
    assert _identity(full, corpus, analyses_for(full)) != _identity(only, corpus, analyses_for(only))
    assert "documents_only" not in _identity(full, corpus, analyses_for(full))["config"]
