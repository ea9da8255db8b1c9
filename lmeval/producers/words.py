"""Per-token word-boundary probabilities for corrected word surprisal (see `lmeval.core.words`).

For every scored token this adds, in nats, ``log_boundary_before`` (the log-probability of a
word boundary at the output that predicts the token; for a text's very first token, of the
class of its start, with or without a space) and ``log_boundary_after`` (the same at the
output after it; for the last token that is the EOS position, scored as one more target).
A word's corrected log-probability is its tokens' sum plus its last token's
``log_boundary_after`` minus its first token's ``log_boundary_before``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..core.words import (
    MASS_EOS,
    MASS_WORD_START,
    TEXT_ENDS,
    WORD_BOUNDARIES,
    WORD_CORRECTIONS,
    boundary_terms,
    mass_masks,
    word_start_mask,
)
from ..errors import DataError, ModelError


@dataclasses.dataclass(frozen=True)
class WordStarts:
    """The word-start set B of a tokenizer, found from its vocabulary."""

    mask: np.ndarray  # (V,) bool, V = the logits' width
    marker: str | None  # 'Ġ', '▁', ' ' or None (no piece starts a word: no correction needed)
    eos_id: int | None
    word_boundary: str = "whitespace"  # which pieces make up B (`WORD_BOUNDARIES`)

    @property
    def n_ids(self) -> int:
        return int(self.mask.sum())


def word_starts(lm, word_boundary: str = "whitespace") -> WordStarts:
    """B for a loaded model: the ids whose piece begins with whitespace, or with the word-start
    marker alone under ``word_boundary="marker"`` (see `word_start_mask`)."""
    tokenizer = lm.tokenizer
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    mask, marker = word_start_mask(pieces, tokenizer.all_special_ids, lm.vocab_size, word_boundary)
    eos = getattr(tokenizer, "eos_token_id", None)
    return WordStarts(mask, marker if mask.any() else None, None if eos is None else int(eos), word_boundary)


def check_word_options(word_correction, text_end, word_boundary="whitespace") -> None:
    if word_correction not in WORD_CORRECTIONS:
        raise DataError(
            f"word_correction: must be one of {', '.join(WORD_CORRECTIONS)} (got {word_correction!r}). "
            "'bow' corrects for tokens that carry their leading space; 'none' sums token surprisal."
        )
    if text_end not in TEXT_ENDS:
        raise DataError(
            f"text_end: must be one of {', '.join(TEXT_ENDS)} (got {text_end!r}). 'eos': the text may end "
            "after any word (Pimentel & Meister); 'word': another word follows (Oh & Schuler, minicons)."
        )
    if word_boundary not in WORD_BOUNDARIES:
        raise DataError(
            f"word_boundary: must be one of {', '.join(WORD_BOUNDARIES)} (got {word_boundary!r}). 'whitespace': "
            "every token whose text starts with whitespace (newlines too) starts a word; 'marker': only tokens "
            "that start with the word-start marker ('Ġ', '▁'), as wordsprobability and minicons count them."
        )


def end_target(starts: WordStarts, text_end: str, lm_name: str) -> int:
    """The id scored at the END position. Its own probability is not used (only the masses
    there), but under ``text_end="eos"`` it must be the tokenizer's EOS."""
    if starts.eos_id is not None:
        return starts.eos_id
    if text_end == "eos":
        raise ModelError(
            f"model {lm_name}: text_end 'eos' needs a tokenizer with an EOS token, and this one has none. "
            "Use text_end='word' (another word follows each text)."
        )
    return int(np.flatnonzero(starts.mask)[0])


def options_with_masses(options, starts: WordStarts):
    return dataclasses.replace(options, mass_masks=mass_masks(starts.mask, starts.eos_id))


def boundary_columns(scored, starts: WordStarts, text_end: str) -> tuple[np.ndarray, np.ndarray]:
    """``(log_boundary_before, log_boundary_after)`` (N,) for the scored rows of
    ``scored`` (a `ScoredContinuations` scored with `options_with_masses` and an end target)."""
    columns, end = scored.columns, scored.end
    n_docs = len(scored.docs)
    before = np.full(len(columns["nll"]), np.nan)
    after = np.full(len(columns["nll"]), np.nan)
    end_rows = np.full(n_docs, -1, dtype=np.int64)
    end_rows[end["doc_index"]] = np.arange(len(end["doc_index"]))
    counts = np.bincount(columns["doc_index"], minlength=n_docs)
    bounds = np.concatenate([[0], np.cumsum(counts)])  # rows are grouped by document, in position order
    for i in np.flatnonzero(counts):
        rows = slice(bounds[i], bounds[i + 1])
        opens_text = columns["joint_position"][bounds[i]] == 0  # nothing but the BOS before it
        first_class = bool(starts.mask[columns["token_id"][bounds[i]]]) if opens_text else None
        before[rows], after[rows] = boundary_terms(
            columns["log_mass"][rows], end["log_mass"][end_rows[i]], text_end, first_class
        )
    return before, after


# --------------------------------------------------------------------------------------
# `lmeval run` (analysis.words): the END position of each document, and the columns it leaves
# --------------------------------------------------------------------------------------


def run_end_id(options) -> int | None:
    """The id a run scores at each document's END position when ``options`` carry the word
    masses (None otherwise): EOS when E holds it, else any id of B. Its own probability is never
    read, only the masses at that output (`end_target` checked the tokenizer before scoring)."""
    masks = getattr(options, "mass_masks", None)
    if masks is None:
        return None
    eos = np.flatnonzero(masks[MASS_EOS])
    return int(eos[0]) if len(eos) else int(np.flatnonzero(masks[MASS_WORD_START])[0])


def split_end_rows(columns: dict, n_tokens: np.ndarray, masks: np.ndarray) -> dict:
    """A run's columns scored with END targets (`run_end_id`), the END rows taken out.

    What the END rows said stays on each document's last token: ``log_mass_end`` (N, 3), the
    `log_mass` columns at the output after it (NaN on every other row); and ``starts_word`` (N,)
    says whether each token is in B (a text's first token picks its class's mass from it).
    ``n_tokens[i]``: the tokens of document ``doc_index`` i, so an END row has position n."""
    doc, position = columns["doc_index"], columns["position"]
    is_end = position == n_tokens[doc]
    end_docs, end_mass = doc[is_end], columns["log_mass"][is_end]
    out = {k: v[~is_end] for k, v in columns.items()}
    log_mass_end = np.full(out["log_mass"].shape, np.nan, dtype=np.float32)
    last = np.flatnonzero(out["position"] == n_tokens[out["doc_index"]] - 1)
    at = np.full(len(n_tokens), -1, dtype=np.int64)
    at[end_docs] = np.arange(len(end_docs))
    has_end = at[out["doc_index"][last]] >= 0
    log_mass_end[last[has_end]] = end_mass[at[out["doc_index"][last[has_end]]]]
    out["log_mass_end"] = log_mass_end
    out["starts_word"] = masks[MASS_WORD_START][out["token_id"]]
    return out


def with_word_masses(options, lm, word_boundary: str, text_end: str):
    """``options`` with the mass masks of ``lm``'s B under ``word_boundary`` (a run's
    ``analysis.words``); unchanged for a vocabulary without word-start pieces, whose words
    need no correction. A tokenizer without EOS under ``text_end="eos"`` is refused here,
    before any scoring."""
    starts = word_starts(lm, word_boundary)
    if starts.marker is None:
        return options
    end_target(starts, text_end, lm.name)
    return options_with_masses(options, starts)
