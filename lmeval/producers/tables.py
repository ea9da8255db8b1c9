"""Tables: per-token arrays to tidy DataFrames, pooled from sums and counts.

Units are in the names: ``nll`` is nats, ``*_bits`` and ``bits_per_*`` are base 2. Every
document and summary number is built the same way: sums and counts first, one division at
the end (``ppl = exp(sum nll / sum tokens)``), never a mean of per-document ratios.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..core.units import LN2, bits_per, perplexity
from .text import TokenizedDocument, count_bytes, count_words

TOKEN_COLUMNS = [
    "model", "doc_id", "position", "token_id", "token", "char_start", "char_end", "context_len",
    "nll", "surprisal_bits", "entropy", "max_prob", "is_top1", "rank",
]  # fmt: skip
DOCUMENT_COLUMNS = [
    "model", "doc_id", "n_tokens", "n_bytes", "n_words", "nll_sum", "ppl", "bits_per_token", "bits_per_byte",
]  # fmt: skip


def char_spans(docs: list[TokenizedDocument], doc_index: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(N, 2) character spans of scored tokens, gathered from every document's offsets."""
    if not docs or len(doc_index) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lengths = np.array([len(d.token_ids) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.concatenate([d.offsets for d in docs])[starts[doc_index] + position]


def token_strings(tokenizer, token_ids: np.ndarray) -> np.ndarray:
    """The vocabulary piece of each id (e.g. 'Ġthe'), looked up once per distinct id."""
    unique, inverse = np.unique(token_ids, return_inverse=True)
    pieces = np.array(tokenizer.convert_ids_to_tokens(unique.tolist()), dtype=object)
    return pieces[inverse] if len(unique) else np.array([], dtype=object)


def tokens_frame(model_name: str, doc_ids: list, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per scored token, in document then position order. ``columns`` holds the
    scorer's arrays plus ``token``, ``char_start``, ``char_end``; ``doc_index`` indexes ``doc_ids``."""
    doc_index = columns["doc_index"]
    frame = pd.DataFrame(
        {
            "model": model_name,
            "doc_id": np.array(doc_ids, dtype=object)[doc_index] if len(doc_index) else np.array([], dtype=object),
            "position": columns["position"],
            "token_id": columns["token_id"],
            "token": columns["token"],
            "char_start": columns["char_start"],
            "char_end": columns["char_end"],
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
    if "topk_ids" in columns and columns["topk_ids"].shape[1]:
        frame["topk_token_ids"] = list(columns["topk_ids"])
        frame["topk_probs"] = list(columns["topk_probs"])
    order = np.lexsort((columns["position"], doc_index))
    return frame.iloc[order].reset_index(drop=True)


def document_sums(doc_index: np.ndarray, nll: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (n_tokens, nll_sum), the sum in float64."""
    n_tokens = np.bincount(doc_index, minlength=n_docs).astype(np.int64)
    nll_sum = np.bincount(doc_index, weights=nll.astype(np.float64), minlength=n_docs)
    return n_tokens, nll_sum


def normalisers(texts: list[str]) -> tuple[list[int], list[int]]:
    """UTF-8 bytes and lm-eval words of each scored text (a blank text has no words)."""
    return [count_bytes(t) for t in texts], [count_words(t) if t.strip() else 0 for t in texts]


def documents_frame(model_name: str, doc_ids: list, n_tokens, n_bytes, n_words, nll_sum) -> pd.DataFrame:
    """One row per document: its sums and counts, and ratios pooled within it."""
    rows = pd.DataFrame(
        {
            "model": model_name,
            "doc_id": pd.Series(doc_ids, dtype=object),
            "n_tokens": np.asarray(n_tokens, dtype=np.int64),
            "n_bytes": np.asarray(n_bytes, dtype=np.int64),
            "n_words": np.asarray(n_words, dtype=np.int64),
            "nll_sum": np.asarray(nll_sum, dtype=np.float64),
        }
    )
    rows["ppl"] = [perplexity(s, n) for s, n in zip(rows.nll_sum, rows.n_tokens)]
    rows["bits_per_token"] = [bits_per(s, n) for s, n in zip(rows.nll_sum, rows.n_tokens)]
    rows["bits_per_byte"] = [bits_per(s, n) for s, n in zip(rows.nll_sum, rows.n_bytes)]
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
        "ppl_doc_mean": ppl_doc_mean(documents),
    }
    if seconds is not None:
        row["tokens_per_second"] = n_tokens / seconds if seconds > 0 else math.nan
    return row


def ppl_doc_mean(documents: pd.DataFrame) -> float:
    """The mean over documents of each document's own perplexity (HF evaluate's
    ``mean_perplexity``). Not lmeval's ``ppl``: a mean of ratios weighs a ten-token document
    like a ten-thousand-token one, so it is shown only under this name, beside the pooled
    value. Documents with no scored token have no perplexity and are left out (NaN if none)."""
    scored = documents[documents["n_tokens"] > 0]
    if not len(scored):
        return math.nan
    per_document = np.exp(scored["nll_sum"].to_numpy(np.float64) / scored["n_tokens"].to_numpy(np.float64))
    return float(per_document.mean())
