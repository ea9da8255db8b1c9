"""Tables: per-token arrays to tidy DataFrames, pooled from sums and counts.

Units are in the names: ``nll`` is nats, ``*_bits`` and ``bits_per_*`` are base 2. Every
document and summary number is built the same way: sums and counts first, one division at
the end (``ppl = exp(sum nll / sum tokens)``), never a mean of per-document ratios.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.units import LN2
from .text import TokenizedDocument, count_bytes, count_words

TOKEN_COLUMNS = [
    "model",
    "doc_id",
    "position",
    "token_id",
    "token",
    "char_start",
    "char_end",
    "context_len",
    "nll",
    "surprisal_bits",
    "entropy",
    "max_prob",
    "is_top1",
    "rank",
]


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
    order = np.lexsort((columns["position"], columns["doc_index"]))
    if not np.array_equal(order, np.arange(len(order))):  # scoring usually emits this order already
        columns = {k: v[order] if np.ndim(v) and len(v) == len(order) else v for k, v in columns.items()}
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
    return frame


def document_sums(doc_index: np.ndarray, nll: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (n_tokens, nll_sum), the sum in float64."""
    n_tokens = np.bincount(doc_index, minlength=n_docs).astype(np.int64)
    nll_sum = np.bincount(doc_index, weights=nll.astype(np.float64), minlength=n_docs)
    return n_tokens, nll_sum


def normalisers(texts: list[str]) -> tuple[list[int], list[int]]:
    """UTF-8 bytes and lm-eval words of each scored text (a blank text has no words)."""
    return [count_bytes(t) for t in texts], [count_words(t) if t.strip() else 0 for t in texts]
