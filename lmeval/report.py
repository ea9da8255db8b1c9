"""Tables: per-token arrays to tidy DataFrames, pooled from sums and counts.

Units are in the names: ``nll`` is nats, ``*_bits`` and ``bits_per_*`` are base 2. Every
document and summary number is built the same way: sums and counts first, one division at
the end (``ppl = exp(sum nll / sum tokens)``), never a mean of per-document ratios.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .data import TokenizedDocument, count_bytes, count_words
from .losses import LN2, bits_per, perplexity

TOKEN_COLUMNS = [
    "model", "doc_id", "position", "token_id", "token", "char_start", "char_end", "context_len",
    "nll", "surprisal_bits", "entropy", "max_prob", "is_top1", "rank",
]  # fmt: skip
DOCUMENT_COLUMNS = [
    "model", "doc_id", "n_tokens", "n_bytes", "n_words", "nll_sum", "ppl", "bits_per_token", "bits_per_byte",
]  # fmt: skip


def _flat_offsets(docs: list[TokenizedDocument], doc_index: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(N, 2) character spans of scored tokens, gathered from every document's offsets."""
    if not docs:
        return np.zeros((0, 2), dtype=np.int64)
    lengths = np.array([len(d.token_ids) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    all_offsets = np.concatenate([d.offsets for d in docs]) if lengths.sum() else np.zeros((0, 2), np.int64)
    return all_offsets[starts[doc_index] + position]


def token_strings(tokenizer, token_ids: np.ndarray) -> np.ndarray:
    """The vocabulary piece of each id (e.g. 'Ġthe'), looked up once per distinct id."""
    unique, inverse = np.unique(token_ids, return_inverse=True)
    pieces = np.array(tokenizer.convert_ids_to_tokens(unique.tolist()), dtype=object)
    return pieces[inverse] if len(unique) else np.array([], dtype=object)


def tokens_frame(model_name: str, docs: list[TokenizedDocument], columns: dict[str, np.ndarray], tokenizer) -> pd.DataFrame:
    """One row per scored token, in document then position order."""
    doc_index = columns["doc_index"]
    offsets = _flat_offsets(docs, doc_index, columns["position"])
    doc_ids = np.array([d.doc_id for d in docs], dtype=object)
    frame = pd.DataFrame(
        {
            "model": model_name,
            "doc_id": doc_ids[doc_index] if len(doc_index) else np.array([], dtype=object),
            "position": columns["position"],
            "token_id": columns["token_id"],
            "token": token_strings(tokenizer, columns["token_id"]),
            "char_start": offsets[:, 0],
            "char_end": offsets[:, 1],
            "context_len": columns["context_len"],
            "nll": columns["nll"],
            "surprisal_bits": columns["nll"] / LN2,
            "entropy": columns["entropy"],
            "max_prob": columns["max_prob"],
            "is_top1": columns["is_top1"],
            "rank": columns["rank"],
            # Kept beside DESIGN's columns so calibration can be recomputed from the table.
            "sum_q2": columns["sum_q2"],
            "mean_neg_logq": columns["mean_neg_logq"],
        }
    )
    if columns["topk_ids"].shape[1]:
        frame["topk_token_ids"] = list(columns["topk_ids"])
        frame["topk_probs"] = list(columns["topk_probs"])
    order = np.lexsort((columns["position"], doc_index))
    return frame.iloc[order].reset_index(drop=True)


def documents_frame(model_name: str, docs: list[TokenizedDocument], columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per document: its sums and counts, and ratios pooled within it."""
    n_docs = len(docs)
    doc_index = columns["doc_index"]
    nll_sum = np.bincount(doc_index, weights=columns["nll"].astype(np.float64), minlength=n_docs)
    n_tokens = np.bincount(doc_index, minlength=n_docs).astype(np.int64)
    scored = [d.scored_text() for d in docs]
    n_bytes = np.array([count_bytes(t) for t in scored], dtype=np.int64)
    n_words = np.array([count_words(t) for t in scored], dtype=np.int64)
    rows = pd.DataFrame(
        {
            "model": model_name,
            "doc_id": [d.doc_id for d in docs],
            "n_tokens": n_tokens,
            "n_bytes": n_bytes,
            "n_words": n_words,
            "nll_sum": nll_sum,
        }
    )
    rows["ppl"] = [perplexity(s, n) for s, n in zip(nll_sum, n_tokens)]
    rows["bits_per_token"] = [bits_per(s, n) for s, n in zip(nll_sum, n_tokens)]
    rows["bits_per_byte"] = [bits_per(s, n) for s, n in zip(nll_sum, n_bytes)]
    return rows


def summary_row(model_name: str, documents: pd.DataFrame, n_skipped: int = 0, seconds: float | None = None) -> dict:
    """Pooled corpus metrics for one model, from the per-document sums."""
    nll_sum = float(documents["nll_sum"].sum())
    n_tokens = int(documents["n_tokens"].sum())
    n_bytes = int(documents["n_bytes"].sum())
    n_words = int(documents["n_words"].sum())
    row = {
        "model": model_name,
        "n_documents": len(documents),
        "n_skipped": n_skipped,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_words": n_words,
        "nll_sum": nll_sum,
        "nll_mean": nll_sum / n_tokens if n_tokens else math.nan,
        "ppl": perplexity(nll_sum, n_tokens),
        "bits_per_token": bits_per(nll_sum, n_tokens),
        "bits_per_byte": bits_per(nll_sum, n_bytes),
        "word_ppl": perplexity(nll_sum, n_words),
        "byte_ppl": perplexity(nll_sum, n_bytes),
    }
    if seconds is not None:
        row["tokens_per_second"] = n_tokens / seconds if seconds > 0 else math.nan
    return row
