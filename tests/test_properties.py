"""Property tests (hypothesis) on windows, pooling and invariance."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmeval
from conftest import CORPUS
from lmeval.analyses.documents import documents_frame, summary_row
from lmeval.core.losses import bits_per, perplexity
from lmeval.core.windows import make_windows
from lmeval.producers.tables import document_sums


@st.composite
def protocols(draw):
    max_length = draw(st.integers(1, 40))
    stride = draw(st.integers(1, max_length))
    n = draw(st.integers(0, 200))
    prefix = draw(st.sampled_from([[], [0]]))
    return n, max_length, stride, prefix


@given(protocols())
@settings(max_examples=300, deadline=None)
def test_every_token_scored_once_for_any_protocol(protocol):
    n, max_length, stride, prefix = protocol
    tokens = list(range(1, n + 1))
    windows = make_windows(0, tokens, prefix, max_length, stride)
    positions = [p for w in windows for p in w.positions]
    assert positions == list(range(1 - len(prefix), n)) or (n == 0 and positions == [])
    for w in windows:
        assert len(w.input_ids) <= max_length and w.n_scored <= stride
        assert all(ctx <= max_length for ctx in w.context_len)


@given(
    st.lists(st.lists(st.floats(0, 30, allow_nan=False, width=32), min_size=0, max_size=30), min_size=1, max_size=12),
    st.lists(st.integers(0, 400), min_size=12, max_size=12),
)
@settings(max_examples=200, deadline=None)
def test_pooled_metrics_equal_row_wise_sums(docs, byte_counts):
    nll = np.array([x for d in docs for x in d], dtype=np.float32)
    doc_index = np.array([i for i, d in enumerate(docs) for _ in d], dtype=np.int64)
    n_tokens, nll_sum = document_sums(doc_index, nll, len(docs))
    n_bytes = [max(b, 1) for b in byte_counts[: len(docs)]]
    frame = documents_frame("m", list(range(len(docs))), n_tokens, n_bytes, [1] * len(docs), nll_sum)
    row = summary_row("m", frame)
    total = math.fsum(float(x) for x in nll)
    assert row["n_tokens"] == len(nll)
    assert row["nll_sum"] == pytest.approx(total, rel=1e-12, abs=1e-9)
    assert row["ppl"] == pytest.approx(perplexity(total, len(nll)), rel=1e-9, nan_ok=True)
    # nothing scored: NaN, never a perfect 0 bits per byte (the bytes of an unscored corpus do not count)
    assert row["bits_per_byte"] == pytest.approx(
        bits_per(total, sum(n_bytes) if len(nll) else 0), rel=1e-9, nan_ok=True
    )


@given(st.permutations(list(range(6))), st.sampled_from([1, 40, 100, 5000]))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_invariant_to_document_order_and_batch_size(gpt2_pair, order, batch_tokens):
    texts = [CORPUS[i] for i in order]
    table = lmeval.score_texts(texts, gpt2_pair, max_length=16, batch_tokens=batch_tokens)
    sums = table.groupby("doc_id").nll.apply(lambda s: s.astype(np.float64).sum())
    reference = _reference(gpt2_pair)
    for doc_id, corpus_index in enumerate(order):
        assert sums[doc_id] == pytest.approx(reference[corpus_index], rel=1e-6)


_REFERENCE = {}


def _reference(pair):
    if "sums" not in _REFERENCE:
        table = lmeval.score_texts(CORPUS, pair, max_length=16, batch_tokens=16)
        _REFERENCE["sums"] = table.groupby("doc_id").nll.apply(lambda s: s.astype(np.float64).sum()).to_dict()
    return _REFERENCE["sums"]
