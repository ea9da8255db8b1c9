"""Words from token rows: each token's word, and one row per word. Pure numpy and pandas.

Words are the maximal runs of non-whitespace characters of a text (``\\S+``), found from
character offsets, never from token strings (see `lmeval.view.surprisal.aggregate_words` for
the rule, and why). `lmeval.surprisal_table(words=True)` and the word table of `lmeval run`
(`lmeval.analyses.words`) both build their rows with `document_words`, so the two agree.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .units import LN2

_WORD = re.compile(r"\S+")


def word_spans(text: str) -> np.ndarray:
    """(W, 2) spans of the ``\\S+`` runs; the whole text as one span when it has none."""
    spans = [m.span() for m in _WORD.finditer(text)]
    return np.array(spans or [(0, len(text))], dtype=np.int64).reshape(-1, 2)


def _next_nonspace(text: str) -> np.ndarray:
    """(len+1,) index of the first non-space character at or after each index (len if none)."""
    is_space = np.array([c.isspace() for c in text] + [False], dtype=bool)
    index = np.where(is_space, len(text), np.arange(len(text) + 1))
    return np.minimum.accumulate(index[::-1])[::-1]


def _prev_nonspace(text: str) -> np.ndarray:
    """(len,) index of the last non-space character at or before each index (-1 if none)."""
    is_space = np.array([c.isspace() for c in text], dtype=bool)
    index = np.where(is_space, -1, np.arange(len(text)))
    return np.maximum.accumulate(index) if len(text) else index


def assign_words(text: str, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's word index (the anchor rule of `aggregate_words`), and whether the
    token also covers characters of another word."""
    spans = word_spans(text)
    n_words = len(spans)
    first = _next_nonspace(text)[start]
    has_char = first < end
    anchor = np.where(has_char, first, start)
    # Word w owns [end of word w-1, end of word w): leading whitespace joins the next word.
    word = np.minimum(np.searchsorted(spans[:, 1], anchor, side="right"), n_words - 1)
    prev = _prev_nonspace(text)
    last = np.where(has_char, prev[np.maximum(end - 1, 0)] if len(text) else 0, anchor)
    last_word = np.minimum(np.searchsorted(spans[:, 1], last, side="right"), n_words - 1)
    return word, has_char & (last_word != word)


def document_words(doc_id, text: str, rows: pd.DataFrame, correct: bool) -> pd.DataFrame:
    """The word rows of one document from its token rows (in position order)."""
    rows = rows.sort_values("position", kind="stable")
    spans = word_spans(text)
    word, crosses = assign_words(text, rows["char_start"].to_numpy(np.int64), rows["char_end"].to_numpy(np.int64))
    n = len(rows)
    # Float64 sums, so the word total matches the token total to rounding.
    grouped = pd.DataFrame(
        {
            "word": word,
            "nll": rows["nll"].to_numpy(np.float64),
            "entropy": rows["entropy"].to_numpy(np.float64),
            "rank": rows["rank"].to_numpy(np.int64),
            "crosses_word": crosses,
            "crosses_context": rows["crosses_context"].to_numpy(bool)
            if "crosses_context" in rows
            else np.zeros(n, bool),
            "before": rows["boundary_before_bits"].to_numpy(np.float64) if correct else np.zeros(n),
            "after": rows["boundary_after_bits"].to_numpy(np.float64) if correct else np.zeros(n),
        }
    ).groupby("word", sort=True)
    sums = grouped.agg(
        n_tokens=("nll", "size"),
        nll=("nll", "sum"),
        entropy=("entropy", "sum"),
        rank=("rank", "max"),
        crosses_word=("crosses_word", "any"),
        crosses_context=("crosses_context", "any"),
        before=("before", "first"),
        after=("after", "last"),
    )
    if "topk" in rows:  # the alternatives where the word's first token stands
        sums["topk"] = pd.Series(list(rows["topk"]), index=word).groupby(level=0, sort=True).first()
    index = sums.index.to_numpy()
    # Token 0 always anchors in word 0 (it starts the text), so a missing position 0 means
    # word 0 lacks a token: its first token was never predicted, so no boundary before it.
    missing_first = int(rows["position"].min()) > 0
    complete = ~((index == 0) & missing_first)
    before = np.where(complete, sums["before"].to_numpy(), 0.0)
    nll = sums["nll"].to_numpy() + (sums["after"].to_numpy() - before) * LN2  # exactly the sum without correction
    bits = nll / LN2
    return pd.DataFrame(
        {
            "doc_id": doc_id,
            "word_index": index,
            "word": [text[s:e] for s, e in spans[index]],
            "char_start": spans[index, 0],
            "char_end": spans[index, 1],
            "n_tokens": sums["n_tokens"].to_numpy(),
            "surprisal_bits": bits,
            "surprisal_bits_token_sum": sums["nll"].to_numpy() / LN2,
            "boundary_before_bits": before,
            "boundary_after_bits": sums["after"].to_numpy(),
            "nll": nll,
            "prob": np.exp(-nll),
            "rank": sums["rank"].to_numpy(),
            "entropy": sums["entropy"].to_numpy(),
            "entropy_bits": sums["entropy"].to_numpy() / LN2,
            "complete": complete,
            "crosses_word": sums["crosses_word"].to_numpy(),
            "crosses_context": sums["crosses_context"].to_numpy(),
            **({"topk": list(sums["topk"])} if "topk" in sums else {}),
        }
    )
