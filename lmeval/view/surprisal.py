"""Per-token and per-word surprisal: where a model is surprised, as a pandas table.

Surprisal is ``-log2 q(token | context)`` in bits: how many yes/no questions the model would
need to be told the token it did not expect. A token at 0 bits was certain; each extra bit
halves the probability the model gave it.

Word surprisal is CORRECTED by default (``word_correction="bow"``, Pimentel & Meister 2024):
with tokens that carry their leading space ('Ġthe', '▁the'), a word's probability is the
product of its tokens' times the probability that a word boundary follows it, divided by the
probability of the boundary before it (see `lmeval.core.words`). ``surprisal_bits`` is that
corrected value, ``surprisal_bits_token_sum`` the plain sum of the word's token surprisals
(which a word table and a token table share, document by document), and
``surprisal_bits = surprisal_bits_token_sum + boundary_after_bits - boundary_before_bits``.
``text_end`` says whether a text may end after any word (``"eos"``: the boundary after a
word includes EOS) or another word always follows (``"word"``).

Words are maximal runs of non-whitespace characters of the original text (``\\S+``), found
from character offsets, never from token strings, so the same rule holds for byte-level BPE
('Ġthe') and SentencePiece ('▁the') vocabularies. Punctuation belongs to its word ("dog." is
one word), exactly as lm-evaluation-harness splits words for word perplexity
(``re.split(r"\\s+", text)``); the only difference is that ``re.split`` also counts an empty
string at each end of a text that starts or ends with whitespace, and no row is made for
those.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd

from ..core.covariates import add_covariates, check_covariates, require_wordfreq
from ..core.units import LN2
from ..core.wordrows import assign_words, document_words, word_spans  # noqa: F401  (re-exported)
from ..engine.data import check_texts
from ..engine.demo import demo_model_path
from ..errors import DataError
from ..model.scorer import ScoreOptions
from ..producers.continuation import check_contexts, score_continuations
from ..producers.score import as_loaded_model
from ..producers.tables import tokens_frame
from ..producers.words import (
    boundary_columns,
    check_word_options,
    end_target,
    options_with_masses,
    word_starts,
)

WORD_TABLE_COLUMNS = [
    "doc_id",
    "word_index",
    "word",
    "char_start",
    "char_end",
    "n_tokens",
    "surprisal_bits",
    "surprisal_bits_token_sum",
    "boundary_before_bits",
    "boundary_after_bits",
    "nll",
    "prob",
    "rank",
    "entropy",
    "entropy_bits",
    "complete",
    "crosses_word",
]
BOUNDARY_COLUMNS = ["boundary_before_bits", "boundary_after_bits"]


def surprisal_table(
    texts,
    model=None,
    *,
    words: bool = False,
    top_k: int = 0,
    bos="auto",
    max_length: int | None = None,
    stride: int | None = None,
    contexts=None,
    word_correction: str = "bow",
    text_end: str = "eos",
    word_boundary: str = "whitespace",
    covariates=None,
    language: str = "en",
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

    ``contexts`` (one string per text) scores each text given its context, which conditions
    but has no rows (see `score_texts`); the extra column crosses_context flags a token that
    straddles the boundary. With ``word_correction="bow"`` (the default) token tables also
    carry boundary_before_bits and boundary_after_bits, the surprisal of a word boundary
    before and after each token (``text_end`` decides whether EOS counts as one), from which
    `aggregate_words` corrects word surprisal; ``"none"`` leaves them out. A tokenizer
    whose pieces never begin with whitespace (end-of-word markers) needs no correction:
    then word surprisal is the token sum, and ``attrs["word_correction_note"]`` says why.

    ``word_boundary`` says which tokens make up the word-start set B of the correction:
    ``"whitespace"`` (the default) every token whose text starts with whitespace, newline and
    tab tokens included, so that B matches the ``\\S+`` words exactly; ``"marker"`` only the
    tokens that start with the word-start marker ('Ġ', '▁'), the convention of Pimentel &
    Meister's ``wordsprobability`` and minicons' ``bow_correction``. They differ where the
    model expects a newline (or a tab) after a word: see docs/psycholinguistics.md.

    ``covariates`` (word tables only): any of ``"length"`` (length_chars), ``"frequency"``
    (frequency_zipf, from wordfreq's list for ``language``) and ``"unigram"``
    (unigram_logfreq, from ``texts`` themselves); see `lmeval.core.covariates`. They add
    columns and change no other value.

    ``attrs`` record word_correction (as applied), text_end, word_boundary and
    word_start_marker (and covariates, language when asked for).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise DataError(f"top_k: must be an integer >= 0 (got {top_k!r}). Use 0 for no alternatives, or e.g. 5.")
    check_word_options(word_correction, text_end, word_boundary)
    names = check_covariates(covariates, words)
    if "frequency" in names:  # before scoring: a missing package or word list fails at once
        require_wordfreq(language)
    texts = check_texts(texts)
    contexts = None if contexts is None else check_contexts(contexts, len(texts))
    lm = as_loaded_model(demo_model_path() if model is None else model)
    starts = word_starts(lm, word_boundary) if word_correction == "bow" else None
    marked = starts if starts is not None and starts.marker is not None else None  # the word starts to correct at
    correct = marked is not None
    options = ScoreOptions(top_k=top_k)
    if marked is not None:
        options = options_with_masses(options, marked)
    end_id = end_target(marked, text_end, lm.name) if marked is not None else None
    scored = score_continuations(
        lm, texts, contexts, bos=bos, max_length=max_length, stride=stride, options=options, end_id=end_id
    )
    columns = scored.columns
    frame = tokens_frame(lm.name, list(range(len(texts))), columns)
    order = np.lexsort((columns["position"], columns["doc_index"]))
    extra = {"crosses_context": columns["crosses_context"]} if contexts is not None else {}
    if marked is not None:
        before, after = boundary_columns(scored, marked, text_end)
        extra.update(boundary_before_bits=-before / LN2, boundary_after_bits=-after / LN2)
    table = token_table(frame, texts, lm.tokenizer)
    for key, values in extra.items():
        table[key] = values[order]
    table.attrs.update(_protocol_attrs(word_correction if correct else "none", text_end, word_boundary, starts))
    if not words:
        return table
    return add_covariates(aggregate_words(table, texts), texts, names, language)


def _protocol_attrs(applied: str, text_end: str, word_boundary: str, starts) -> dict:
    attrs = {
        "word_correction": applied,
        "text_end": text_end,
        "word_boundary": word_boundary,
        "word_start_marker": None if starts is None else starts.marker,
    }
    if starts is not None and starts.marker is None:
        attrs["word_correction_note"] = (
            "the tokenizer has no word-start marker (no piece begins with whitespace, e.g. end-of-word "
            "markers or a vocabulary without spaces): a word's tokens already end it, so word surprisal "
            "is the token sum"
        )
    return attrs


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


def aggregate_words(tokens_df: pd.DataFrame, texts, word_correction: str | None = None) -> pd.DataFrame:
    """Words from token rows: corrected word surprisal, and the plain sum beside it.

    ``tokens_df`` is a token table of `surprisal_table` or `score_texts` (it needs doc_id,
    position, char_start, char_end, nll, entropy and rank), and ``texts`` the scored texts,
    indexed by doc_id. ``word_correction`` is ``"bow"`` (needs the boundary_before_bits and
    boundary_after_bits columns of a `surprisal_table` token table), ``"none"`` (the token
    sum), or None: ``"bow"`` when those columns are there, else ``"none"``.

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
    word, char_start, char_end (the run's span), n_tokens; surprisal_bits (bits), the
    word's surprisal ``-log2 p(word | text before it)``: corrected, it is
    ``surprisal_bits_token_sum + boundary_after_bits - boundary_before_bits``, where
    surprisal_bits_token_sum is the sum over the word's tokens, boundary_after_bits the
    surprisal of a word boundary (or, under ``text_end="eos"``, the end of the text) right
    after the word's last token, and boundary_before_bits that of the boundary before its
    first token, already paid by the previous word (for a text's first word: the surprisal
    of the text starting the way it does, with or without a space, after the BOS); both are
    0 without correction; nll (nats) and prob (``exp(-nll)``): the same surprisal as a
    natural log and as a probability; rank (the largest, i.e. worst, rank among its tokens;
    1 when the model's top choice was right at every step); entropy (nats) and
    entropy_bits: the sum of the tokens' entropies, the word's expected surprisal under the
    model given the true prefix (a baseline for surprisal_bits_token_sum, not an entropy
    over words); complete (False when one of the word's tokens has no row, which happens to
    the first word under ``bos="none"``: its first token only conditions, so it has no
    boundary_before_bits either, and 0 stands there); crosses_word (a token of this word
    also covers characters of another word); and, for texts scored given contexts,
    crosses_context (a token of this word starts inside the context).

    Summed over a text, corrected word log-probabilities telescope: they equal the token
    sum plus the first word's boundary_before and the last word's boundary_after terms.
    A text of whitespace alone holds no word and has no row, as `lmeval run` skips such a
    document. Words without scored tokens have no row. A token table with ``topk`` (made with
    ``top_k`` > 0) gives each word the alternatives at its first token: the k likeliest
    tokens where the word's first token stands.
    """
    texts = list(texts)
    check_spans(tokens_df, texts)
    has_bounds = all(c in tokens_df.columns for c in BOUNDARY_COLUMNS)
    if word_correction is None:
        word_correction = "bow" if has_bounds else "none"
    check_word_options(word_correction, "eos")
    if word_correction == "bow" and not has_bounds:
        raise DataError(
            "aggregate_words: word_correction 'bow' needs the columns boundary_before_bits and boundary_after_bits "
            "(got a token table without them). Make the token table with surprisal_table(..., word_correction='bow'), "
            "or pass word_correction='none' for the token sum."
        )
    parts = []
    for doc_id, rows in tokens_df.groupby("doc_id", sort=True):
        text = texts[int(cast(int, doc_id))]  # doc_id: the text's index (pandas-stubs: any Scalar)
        if text.strip():
            parts.append(document_words(doc_id, text, rows, word_correction == "bow"))
    columns = WORD_TABLE_COLUMNS + [c for c in ("crosses_context", "topk") if c in tokens_df.columns]
    out = pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame({c: [] for c in columns})
    out.attrs.update(
        {k: v for k, v in tokens_df.attrs.items() if k in ("text_end", "word_boundary", "word_start_marker")}
    )
    out.attrs["word_correction"] = word_correction
    if "word_correction_note" in tokens_df.attrs:
        out.attrs["word_correction_note"] = tokens_df.attrs["word_correction_note"]
    return out
