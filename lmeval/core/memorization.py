"""Has the model seen this document? Membership and memorization scores from per-token
results. Pure numpy (and zlib); every score is per document, from one part's tokens.

Why: a model assigns its training documents unusually high likelihood, above all on their
hardest tokens, and reproduces memorized ones token by token. Each score below turns the
per-token log-probabilities ``log q_y = -nll`` [nats] into one number per document:

- Min-K% Prob (Shi et al. 2023, "Detecting Pretraining Data from Large Language Models"):
  the mean of the lowest k% of a document's token log-probabilities. Higher = more likely seen.
- Min-K%++ (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training Data
  from Large Language Models"): per token ``(log q_y - E_q[log q]) / SD_q[log q]``, then the
  mean of the lowest k% of those. Higher = more likely seen.
- zlib ratio (Carlini et al. 2021, "Extracting Training Data from Large Language Models"):
  the mean NLL per token over the zlib-compressed size of the text. Lower = more likely seen.
- reference ratio (Carlini et al. 2021): the model's NLL over a reference model's, per byte
  of the same text. Lower = the model finds the text easier than the reference does.
- extractable suffix (teacher-forced k-extractability, Carlini et al. 2023, "Quantifying
  Memorization Across Neural Language Models"): the longest run of the document's last
  tokens that are each the model's argmax. A suffix of k tokens is reproduced by greedy
  decoding from the rest of the document.

A document's "k%" is ``floor(n * k / 100)`` of its n scored tokens, at least 1, as the
papers' code takes ``int(n * ratio)`` (which would give 0 tokens, and NaN, on short texts).
"""

from __future__ import annotations

import zlib

import numpy as np


def lowest_share_mean(doc_index: np.ndarray, values: np.ndarray, n_docs: int, percent: float) -> np.ndarray:
    """Per document, the mean of its lowest ``percent``% ``values`` (at least one value),
    float64; NaN for a document without values. Ties do not matter: it is a mean."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    n = np.bincount(doc_index, minlength=n_docs)
    take = np.maximum(1, np.floor(n * percent / 100.0 + 1e-9)).astype(np.int64)  # +1e-9: 30 * 10 / 100 is 3
    order = np.lexsort((values, doc_index))  # by document, then value ascending
    doc_sorted = doc_index[order]
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    rank = np.arange(len(order)) - start[doc_sorted]  # 0 = the document's lowest value
    keep = rank < take[doc_sorted]
    total = np.bincount(doc_sorted[keep], weights=values[order][keep], minlength=n_docs)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, total / take, np.nan)


def mink_prob(doc_index: np.ndarray, nll: np.ndarray, n_docs: int, percent: float) -> np.ndarray:
    """Min-K% Prob [nats]: the mean of the lowest ``percent``% token log-probabilities
    ``log q_y = -nll`` of each document (Shi et al. 2023). <= 0; higher = more likely seen."""
    return lowest_share_mean(doc_index, -np.asarray(nll, dtype=np.float64), n_docs, percent)


def standardized_log_prob(nll: np.ndarray, entropy: np.ndarray, var_logq: np.ndarray) -> np.ndarray:
    """Min-K%++'s per-token score ``(log q_y - E_q[log q]) / SD_q[log q]`` (unitless),
    float64, with ``log q_y = -nll``, ``E_q[log q] = -entropy`` and ``Var_q[log q] = var_logq``.

    How far the target's log-probability stands above the model's expected log-probability
    of its own next token, in standard deviations of that log-probability. A distribution
    with no spread (Var = 0: one token holds all the mass, to float32 precision) scores 0:
    its target is neither above nor below what the model expected.
    """
    centred = np.asarray(entropy, dtype=np.float64) - np.asarray(nll, dtype=np.float64)
    sd = np.sqrt(np.asarray(var_logq, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 0, centred / sd, 0.0)


def mink_pp(doc_index, nll, entropy, var_logq, n_docs: int, percent: float) -> np.ndarray:
    """Min-K%++: the mean of the lowest ``percent``% `standardized_log_prob` of each document
    (Zhang et al. 2024). Unitless; higher = more likely seen."""
    return lowest_share_mean(doc_index, standardized_log_prob(nll, entropy, var_logq), n_docs, percent)


def compressed_bytes(text: str) -> int:
    """Bytes of the UTF-8 text after ``zlib.compress`` at its default level (6), as Carlini
    et al.'s code measures "zlib entropy"."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_ratio(nll_sum: np.ndarray, n_tokens: np.ndarray, zlib_bytes: np.ndarray) -> np.ndarray:
    """``(nll_sum / n_tokens) / zlib_bytes``: the model's mean NLL [nats per token] over the
    text's zlib-compressed size [bytes] (Carlini et al. 2021's ratio of log-perplexity to
    zlib entropy). A text that is easy for the model but not for zlib (memorized, not merely
    repetitive) scores low. NaN for a document without scored tokens."""
    nll_sum, n_tokens, zlib_bytes = (np.asarray(a, dtype=np.float64) for a in (nll_sum, n_tokens, zlib_bytes))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_tokens > 0, nll_sum / n_tokens / zlib_bytes, np.nan)


def reference_ratio(nll_sum, n_bytes, ref_nll_sum, ref_n_bytes) -> np.ndarray:
    """``(nll_sum / n_bytes) / (ref_nll_sum / ref_n_bytes)``: the model's NLL per byte over the
    reference model's on the same document (unitless). On the same scored text this is the
    ratio of the two log-likelihoods, and, with one tokenizer, of the log-perplexities
    (Carlini et al. 2021); per byte it holds across tokenizers too. NaN when either
    model scored nothing."""
    s, b, rs, rb = (np.asarray(a, dtype=np.float64) for a in (nll_sum, n_bytes, ref_nll_sum, ref_n_bytes))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((b > 0) & (rb > 0) & (rs > 0), (s / b) / (rs / rb), np.nan)


def extractable_suffix(doc_index: np.ndarray, position: np.ndarray, is_top1: np.ndarray, n_docs: int) -> np.ndarray:
    """Per document, the length [tokens] of the longest suffix whose every token is the
    model's argmax under teacher forcing (ties count as the argmax, as ``is_top1`` does):
    0 when the last token is not, the whole document when every token is. int64."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    order = np.lexsort((np.asarray(position), doc_index))  # each document in position order
    doc_sorted = doc_index[order]
    hit = np.asarray(is_top1, dtype=bool)[order]
    n = np.bincount(doc_index, minlength=n_docs)
    rank = np.arange(len(order)) - np.concatenate([[0], np.cumsum(n)[:-1]])[doc_sorted]
    last_miss = np.full(n_docs, -1, dtype=np.int64)
    np.maximum.at(last_miss, doc_sorted[~hit], rank[~hit])
    return (n - 1 - last_miss).astype(np.int64)
