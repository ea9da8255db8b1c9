"""Word covariates beside word surprisal: length and frequency, the predictors every
reading-time or N400 regression puts next to surprisal (Smith & Levy 2013; Wilcox et al. 2020),
so a word table is one row per word with everything the regression needs.

Each covariate is looked up on the word with its surrounding punctuation stripped (``"dog."``
and ``"(dog"`` are both ``dog``: Unicode categories P*, at either end; inner punctuation such
as ``don't`` or ``well-known`` stays). A word that is punctuation alone has length 0 and no
frequency (NaN). A word missing from the frequency list is NaN, never 0: a zero would read
as "attested and very rare" to a regression.

- ``length`` -> ``length_chars``: characters (Unicode code points) of the stripped word.
- ``frequency`` -> ``frequency_zipf``: ``log10(word_frequency(word, language)) + 9`` from
  `wordfreq` (frequency per billion words, on its log10 Zipf scale; `wordfreq.zipf_frequency`
  gives the same number rounded to 2 decimals). wordfreq folds case and normalises the word
  itself. Needs the ``words`` extra: ``pip install 'lmeval[words]'``.
- ``unigram`` -> ``unigram_logfreq``: ``log10(count(word) / n_words)`` over the scored texts
  themselves (every ``\\S+`` word of every text, stripped and case-folded the same way): a
  frequency that needs no library and no language, at the cost of being estimated from the
  corpus in hand.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import numpy as np
import pandas as pd

from ..errors import DataError

COVARIATES = {"length": "length_chars", "frequency": "frequency_zipf", "unigram": "unigram_logfreq"}
_WORD = re.compile(r"\S+")


def check_covariates(covariates, words: bool = True) -> tuple[str, ...]:
    """The requested covariate names, in `COVARIATES` order; () for None."""
    if covariates is None:
        return ()
    if isinstance(covariates, str):
        raise DataError(
            f"covariates: must be a list of names (got the string {covariates!r}). Wrap it: [{covariates!r}], "
            f"or on the command line --covariates {covariates}."
        )
    given = list(covariates)
    unknown = [c for c in given if c not in COVARIATES]
    if unknown:
        raise DataError(
            f"covariates: each must be one of {', '.join(COVARIATES)} (got {', '.join(map(repr, unknown))}). "
            "length adds length_chars, frequency adds frequency_zipf (wordfreq), unigram adds unigram_logfreq."
        )
    if given and not words:
        raise DataError(
            f"covariates: are columns of word tables (got {given} for a token table). "
            "Pass words=True (--words on the command line), or drop covariates."
        )
    return tuple(c for c in COVARIATES if c in given)


def strip_punctuation(word: str) -> str:
    """``word`` without the punctuation characters (Unicode category P*) at either end."""
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(word[end - 1]).startswith("P"):
        end -= 1
    return word[start:end]


def require_wordfreq(language: str):
    """The wordfreq module, once its word list for ``language`` is known to load."""
    if not isinstance(language, str) or not language:
        raise DataError(f"language: must be a language code such as 'en' (got {language!r}).")
    try:
        import wordfreq
    except ImportError:
        raise DataError(
            "covariates: frequency needs the wordfreq package (got an environment without it). "
            "Install it with `pip install 'lmeval[words]'`, or ask for unigram (a frequency from the "
            "scored texts themselves)."
        ) from None
    try:
        wordfreq.get_frequency_dict(language)
    except (LookupError, ValueError) as exc:
        raise DataError(
            f"language: must be a language wordfreq has a word list for (got {language!r}: {exc}). "
            f"Use one of {', '.join(sorted(wordfreq.available_languages()))}."
        ) from None
    return wordfreq


def zipf_frequencies(words: list[str], language: str) -> np.ndarray:
    """wordfreq's Zipf frequency of each (already stripped) word, unrounded; NaN when wordfreq
    does not know the word (or the word is empty)."""
    wordfreq = require_wordfreq(language)
    zipf = {}
    for word in set(words):
        frequency = wordfreq.word_frequency(word, language) if word else 0.0
        zipf[word] = math.log10(frequency) + 9 if frequency > 0 else math.nan
    return np.array([zipf[w] for w in words], dtype=np.float64)


def unigram_counts(texts) -> Counter:
    """How often each stripped, case-folded ``\\S+`` word occurs in ``texts`` (punctuation-only
    words count under the empty string). Counts of two stretches of a corpus add (``+``)."""
    return Counter(strip_punctuation(m.group()).casefold() for text in texts for m in _WORD.finditer(text))


def unigram_log_frequencies(
    words: list[str], texts: list[str] | None = None, counts: Counter | None = None
) -> np.ndarray:
    """log10 relative frequency of each (stripped) word among the case-folded, stripped
    ``\\S+`` words of ``texts`` (or of the texts ``counts`` were made from, `unigram_counts`);
    NaN for an empty word (punctuation alone)."""
    counts = unigram_counts(texts or []) if counts is None else counts
    n_words = sum(counts.values())  # every word of the texts, punctuation-only ones included
    out = np.full(len(words), np.nan)
    for i, word in enumerate(words):
        key = word.casefold()
        if key and counts[key]:
            out[i] = math.log10(counts[key] / n_words)
    return out


def add_covariates(words: pd.DataFrame, texts: list[str], covariates, language: str = "en") -> pd.DataFrame:
    """``words`` (a word table of `aggregate_words`) with the covariate columns asked for
    (see the module docstring) appended; every other column is left as it is. ``texts`` are
    the scored texts (the unigram counts' corpus). The request is recorded in
    ``attrs["covariates"]`` (and ``attrs["language"]`` with frequency)."""
    names = check_covariates(covariates)
    if not names:
        return words
    stripped = [strip_punctuation(w) for w in words["word"]]
    out = words.copy()
    out.attrs = dict(words.attrs)
    if "length" in names:
        out["length_chars"] = np.array([len(w) for w in stripped], dtype=np.int64)
    if "frequency" in names:
        out["frequency_zipf"] = zipf_frequencies(stripped, language)
        out.attrs["language"] = language
    if "unigram" in names:
        out["unigram_logfreq"] = unigram_log_frequencies(stripped, texts)
    out.attrs["covariates"] = list(names)
    return out
