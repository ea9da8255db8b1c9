"""Per-token and per-word surprisal: where a model is surprised, as a pandas table.

Surprisal is ``-log2 q(token | context)`` in bits: how many yes/no questions the model would
need to be told the token it did not expect. A token at 0 bits was certain; each extra bit
halves the probability the model gave it. Word surprisal is the SUM over the word's tokens
(the chain rule: the log-probability of a word is the sum of its tokens' log-probabilities),
so a word table and a token table always add up to the same document total.

Words are maximal runs of non-whitespace characters of the original text (``\\S+``), found
from character offsets, never from token strings, so the same rule holds for byte-level BPE
('Ġthe') and SentencePiece ('▁the') vocabularies. Punctuation belongs to its word ("dog." is
one word), exactly as lm-evaluation-harness splits words for word perplexity
(``re.split(r"\\s+", text)``); the only difference is that ``re.split`` also counts an empty
string at each end of a text that starts or ends with whitespace, and no row is made for
those.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..core.units import LN2
from ..errors import DataError
from ..pipeline.data import check_texts
from ..pipeline.demo import demo_model_path
from ..pipeline.score import as_loaded_model, score_texts

_WORD = re.compile(r"\S+")
WORD_TABLE_COLUMNS = [
    "doc_id", "word_index", "word", "char_start", "char_end", "n_tokens", "surprisal_bits", "nll",
    "prob", "rank", "entropy", "entropy_bits", "complete", "crosses_word",
]  # fmt: skip


def surprisal_table(
    texts,
    model=None,
    *,
    words: bool = False,
    top_k: int = 0,
    bos="auto",
    max_length: int | None = None,
    stride: int | None = None,
) -> pd.DataFrame:
    """Surprisal of every token (or word, with ``words=True``) of each text.

    ``model`` is a path, a hub id, a ``(model, tokenizer)`` pair or a `LoadedModel`; None
    means the bundled demo model. ``bos``, ``max_length`` and ``stride`` are the protocol of
    `score_texts`: with ``bos="none"`` the first token of each text only conditions and has
    no row (it is never reported as a zero).

    Token columns: doc_id (index into ``texts``), position (index into the text's tokens),
    token_id, token (vocabulary piece, e.g. 'Ġthe'), token_text (``text[char_start:char_end]``;
    empty for a bare-space token, and repeated when a multi-byte character is split over
    several byte tokens, which then share one span), char_start, char_end, surprisal_bits
    (bits), nll (nats), prob (``exp(-nll)``, the probability the model gave the token), rank
    (1 = the model's top choice), entropy (nats) and entropy_bits: the model's own
    uncertainty before seeing the token, i.e. its expected surprisal. With ``top_k`` > 0 also
    topk: the k likeliest next tokens as ``[{"token": decoded text, "prob": p}, ...]``, most
    likely first. Word columns: see `aggregate_words`.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise DataError(f"top_k: must be an integer >= 0 (got {top_k!r}). Use 0 for no alternatives, or e.g. 5.")
    texts = check_texts(texts)
    lm = as_loaded_model(demo_model_path() if model is None else model)
    frame = score_texts(texts, lm, max_length=max_length, stride=stride, bos=bos, top_k=top_k)
    table = token_table(frame, texts, lm.tokenizer)
    return aggregate_words(table, texts) if words else table


def token_table(frame: pd.DataFrame, texts: list[str], tokenizer=None) -> pd.DataFrame:
    """`score_texts` rows reduced to the surprisal view (columns in `surprisal_table`)."""
    check_spans(frame, texts)
    table = pd.DataFrame(
        {
            "doc_id": frame["doc_id"].astype(np.int64),
            "position": frame["position"].astype(np.int64),
            "token_id": frame["token_id"].astype(np.int64),
            "token": frame["token"],
            "token_text": [texts[d][s:e] for d, s, e in zip(frame["doc_id"], frame["char_start"], frame["char_end"])],
            "char_start": frame["char_start"].astype(np.int64),
            "char_end": frame["char_end"].astype(np.int64),
            "surprisal_bits": frame["surprisal_bits"],
            "nll": frame["nll"],
            "prob": np.exp(-frame["nll"].to_numpy(dtype=np.float64)),
            "rank": frame["rank"].astype(np.int64),
            "entropy": frame["entropy"],
            "entropy_bits": frame["entropy"] / LN2,
        }
    )
    if "topk_token_ids" in frame.columns and tokenizer is not None:
        table["topk"] = topk_records(frame["topk_token_ids"], frame["topk_probs"], tokenizer)
    return table


def topk_records(ids_column, probs_column, tokenizer) -> list[list[dict]]:
    """Each row's alternatives as ``[{"token": text, "prob": p}]``, decoding each id once."""
    ids = [np.asarray(row, dtype=np.int64) for row in ids_column]
    distinct = np.unique(np.concatenate(ids)) if ids else np.array([], dtype=np.int64)
    text = {int(i): decode_token(tokenizer, int(i)) for i in distinct}
    return [
        [{"token": text[int(i)], "prob": float(p)} for i, p in zip(row_ids, row_probs)]
        for row_ids, row_probs in zip(ids, probs_column)
    ]


def decode_token(tokenizer, token_id: int) -> str:
    """The text one id decodes to; ids past the tokenizer (padded embedding rows) are named."""
    if token_id >= len(tokenizer):
        return f"<id {token_id}>"
    return tokenizer.decode([token_id])


def check_spans(frame: pd.DataFrame, texts: list[str]) -> None:
    """Every row's doc_id indexes ``texts`` and its span lies inside that text."""
    if frame.empty:
        return
    doc_id = frame["doc_id"].to_numpy(dtype=np.int64)
    if doc_id.min() < 0 or doc_id.max() >= len(texts):
        raise DataError(
            f"tokens: doc_id must index texts (0..{len(texts) - 1}) (got {doc_id.min()}..{doc_id.max()}). "
            "Pass the same texts that were scored, in the same order."
        )
    lengths = np.array([len(t) for t in texts], dtype=np.int64)[doc_id]
    start, end = frame["char_start"].to_numpy(), frame["char_end"].to_numpy()
    bad = np.flatnonzero((start < 0) | (end < start) | (end > lengths))
    if len(bad):
        row = frame.iloc[bad[0]]
        raise DataError(
            f"tokens: char_start/char_end must lie inside text {row['doc_id']} "
            f"(got {row['char_start']}..{row['char_end']} for a text of {lengths[bad[0]]} characters). "
            "Pass the same texts that were scored, in the same order."
        )


# --------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------


def aggregate_words(tokens_df: pd.DataFrame, texts) -> pd.DataFrame:
    """Sum token surprisal into words; each document's word total equals its token total.

    ``tokens_df`` is a token table of `surprisal_table` or `score_texts` (it needs doc_id,
    position, char_start, char_end, nll, entropy and rank), and ``texts`` the scored texts,
    indexed by doc_id.

    Words are the ``\\S+`` runs of each text (punctuation stays with its word, as in
    lm-eval's ``re.split(r"\\s+", text)`` word count). Each token goes to exactly ONE word,
    chosen by its anchor character:

    - a token with a non-space character goes to the word of its FIRST non-space character
      (so 'Ġthe', '▁the' and a Metaspace '▁' whose span covers the next letter all join
      the word they start); a token spanning two words (a merge across whitespace, e.g.
      '▁of▁the') is not split: all of its surprisal goes to the first word, which is then
      flagged ``crosses_word``, and a word with no token of its own gets no row;
    - a token with no non-space character (a bare 'Ġ' with an empty span, a '▁' or
      newline token) goes to the word that FOLLOWS it, or to the last word when none does;
    - tokens sharing one span (the byte tokens of a split multi-byte character) each
      count once, in the word of that character.

    Columns: doc_id, word_index (index of the word among the text's ``\\S+`` runs),
    word, char_start, char_end (the run's span), n_tokens, surprisal_bits (bits) and nll
    (nats), summed over the word's tokens; prob (``exp(-nll)``, the probability of the
    whole word given its context); rank (the largest, i.e. worst, rank among its tokens;
    1 when the model's top choice was right at every step); entropy (nats) and
    entropy_bits: the sum of the tokens' entropies, the word's expected surprisal under the
    model given the true prefix (a baseline for surprisal_bits, not an entropy over
    words); complete (False when one of the word's tokens has no row, which happens to the
    first word under ``bos="none"``: its first token only conditions); crosses_word (a
    token of this word also covers characters of another word).

    A text with tokens but no non-space character yields one row, whose word is the text
    itself, so that no surprisal is dropped. Words without scored tokens have no row.
    """
    texts = list(texts)
    check_spans(tokens_df, texts)
    parts = [
        _document_words(doc_id, texts[int(doc_id)], rows)
        for doc_id, rows in tokens_df.groupby("doc_id", sort=True)
    ]
    if not parts:
        return pd.DataFrame({c: [] for c in WORD_TABLE_COLUMNS})
    return pd.concat(parts, ignore_index=True)[WORD_TABLE_COLUMNS]


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


def _document_words(doc_id, text: str, rows: pd.DataFrame) -> pd.DataFrame:
    """The word rows of one document from its token rows."""
    spans = word_spans(text)
    word, crosses = assign_words(text, rows["char_start"].to_numpy(np.int64), rows["char_end"].to_numpy(np.int64))
    # Float64 sums, so the word total matches the token total to rounding.
    grouped = pd.DataFrame(
        {
            "word": word,
            "nll": rows["nll"].to_numpy(np.float64),
            "entropy": rows["entropy"].to_numpy(np.float64),
            "rank": rows["rank"].to_numpy(np.int64),
            "crosses_word": crosses,
        }
    ).groupby("word", sort=True)
    sums = grouped.agg(
        n_tokens=("nll", "size"), nll=("nll", "sum"), entropy=("entropy", "sum"),
        rank=("rank", "max"), crosses_word=("crosses_word", "any"),
    )  # fmt: skip
    index = sums.index.to_numpy()
    out = pd.DataFrame(
        {
            "doc_id": doc_id,
            "word_index": index,
            "word": [text[s:e] for s, e in spans[index]],
            "char_start": spans[index, 0],
            "char_end": spans[index, 1],
            "n_tokens": sums["n_tokens"].to_numpy(),
            "surprisal_bits": sums["nll"].to_numpy() / LN2,
            "nll": sums["nll"].to_numpy(),
            "prob": np.exp(-sums["nll"].to_numpy()),
            "rank": sums["rank"].to_numpy(),
            "entropy": sums["entropy"].to_numpy(),
            "entropy_bits": sums["entropy"].to_numpy() / LN2,
            "crosses_word": sums["crosses_word"].to_numpy(),
        }
    )
    # Token 0 always anchors in word 0 (it starts the text), so a missing position 0 means
    # word 0 lacks a token.
    missing_first = int(rows["position"].min()) > 0
    out["complete"] = ~((out["word_index"] == 0) & missing_first)
    return out
