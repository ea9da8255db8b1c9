"""Honest small samples: a comparison over fewer than compare.min_documents documents
reports no interval and no p-value (NaN, with a note saying why), and n_documents stands
beside every comparison, in the frame and in the printed table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lmeval.analyses import compare as cmp
from lmeval.cli.common import format_compare
from lmeval.core.bootstrap import MIN_DOCUMENTS, bootstrap_interval, resampled_sums
from lmeval.engine.config import CompareConfig, load_config
from lmeval.errors import ConfigError

INTERVALS = ["ci_low", "ci_high", "p_value", "ratio_ci_low", "ratio_ci_high"]


def documents(n_docs: int, seed: int = 0) -> pd.DataFrame:
    """Per-document sums of a baseline and a model that is better by about 0.1 nats/token."""
    rng = np.random.default_rng(seed)
    n_tokens = rng.integers(20, 200, size=n_docs)
    n_bytes = n_tokens * 4
    base = n_tokens * rng.normal(2.0, 0.2, size=n_docs)
    model = base - n_tokens * rng.normal(0.1, 0.05, size=n_docs)
    rows = []
    for name, nll in (("base", base), ("model", model)):
        rows.append(
            pd.DataFrame(
                {
                    "model": name,
                    "doc_id": [f"d{i}" for i in range(n_docs)],
                    "n_tokens": n_tokens,
                    "n_bytes": n_bytes,
                    "n_words": n_tokens // 2,
                    "nll_sum": nll,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def record() -> dict:
    protocol = {
        "max_length": 32,
        "stride": 32,
        "bos": "auto",
        "documents": "independent",
        "separator": None,
        "tokenizer_sha256": "same",
    }
    return {"protocol": {"models": {"base": protocol, "model": protocol}}}


def test_the_minimum_is_a_named_default():
    assert MIN_DOCUMENTS == 10 and CompareConfig().min_documents == MIN_DOCUMENTS


@pytest.mark.parametrize("n_docs", [1, 2, 9])
def test_too_few_documents_get_no_interval_and_a_note(n_docs):
    frame = cmp.compare_tables({"documents": documents(n_docs)}, record(), CompareConfig(baseline="base"))["compare"]
    assert len(frame) == 4 and (frame.n_documents == n_docs).all()
    assert frame[INTERVALS].isna().all().all()
    assert frame.delta.notna().all() and (frame.delta < 0).all()  # the point estimate stays
    assert frame.note.str.contains(
        f"only {n_docs} document(s), fewer than compare.min_documents = 10", regex=False
    ).all()
    printed = format_compare(frame)
    assert "n_documents" in printed.splitlines()[0] and "NaN" in printed
    assert f"note (model vs base): only {n_docs} document(s)" in printed


@pytest.mark.parametrize("n_docs", [10, 11, 40])
def test_enough_documents_get_the_bootstrap_interval(n_docs):
    docs = documents(n_docs)
    frame = cmp.compare_tables({"documents": docs}, record(), CompareConfig(baseline="base", bootstrap=500, seed=3))[
        "compare"
    ]
    assert (frame.note == "").all() and (frame.n_documents == n_docs).all()
    assert frame[INTERVALS].notna().all().all()
    # The bits-per-token interval is the documented resample of pooled sums (numpy oracle).
    cols = ["nll_sum", "n_tokens"]
    mine, theirs = (docs[docs.model == m][cols].to_numpy(np.float64) for m in ("model", "base"))
    sums = resampled_sums(np.hstack([mine, theirs]), 500, 3)
    deltas = sums[:, 0] / sums[:, 1] / math.log(2) - sums[:, 2] / sums[:, 3] / math.log(2)
    row = frame.set_index("metric").loc["bits_per_token"]
    low, high, p = bootstrap_interval(deltas)
    assert (row.ci_low, row.ci_high, row.p_value) == pytest.approx((low, high, p), rel=1e-12)
    assert n_docs < 20 or row.ci_high < 0  # 40 documents resolve a 0.14 bits/token gain


def test_min_documents_is_a_config_key_and_a_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("models: [{path: gpt2}]\ndata: {path: d.jsonl}\ncompare: {min_documents: 3}\n", encoding="utf-8")
    assert load_config(config).compare.min_documents == 3
    frame = cmp.compare_tables({"documents": documents(3)}, record(), load_config(config).compare.__dict__)["compare"]
    assert frame[INTERVALS].notna().all().all() and (frame.note == "").all()
    with pytest.raises(ConfigError, match=r"compare\.min_documents: must be >= 1 \(got 0\)"):
        load_config(config, ["compare.min_documents=0"])
    from lmeval.cli import build_parser

    args = build_parser().parse_args(["compare", "a", "b", "--min-documents", "2"])
    assert args.min_documents == 2


def test_one_document_no_longer_claims_significance():
    """The issue's case: with one document every resample redraws it, so the old answer was
    a zero-width interval and p = 2 / (B + 1) = 0.002."""
    frame = cmp.compare_tables({"documents": documents(1)}, record(), CompareConfig(baseline="base", min_documents=1))
    row = frame["compare"].set_index("metric").loc["bits_per_token"]
    assert row.ci_low == row.ci_high and row.p_value == pytest.approx(2 / 1001)  # what min_documents=1 still gives
    frame = cmp.compare_tables({"documents": documents(1)}, record(), CompareConfig(baseline="base"))
    assert math.isnan(frame["compare"].set_index("metric").loc["bits_per_token"].p_value)
