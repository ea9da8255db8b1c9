"""Word surprisal in `lmeval run` (``analysis.words``): words.parquet, one row per model and word.

The rows are those of ``surprisal_table(texts, words=True)`` on the same documents (the same
`lmeval.core.wordrows.document_words`), with ``model`` first and the user's ``doc_id``:
corrected word surprisal (Pimentel & Meister 2024) beside the plain token sum, under the
convention of ``analysis.word_boundary`` and ``analysis.text_end``, and the covariates of
``analysis.covariates``.

What it asks of scoring (`Needs.word_masses`): the log mass of B (word starts), E (EOS) and
not-B at the output that predicts each token (``log_mass``), the same at each document's END
(``log_mass_end``, on its last token: one more target is scored there) and whether each token
is in B (``starts_word``). Each document's text is recorded in its first part
(``word_texts``, a text fact), since a word's rows need the text its tokens came from.

Words across parts. A long document is scored in pieces, one part each, and a word may
straddle two of them; the boundary after a part's last token is only known from the next
part's first token. So a part's payload is formed into words when it is merged after the
parts before it: the words that end before the part's last token are written, and the
tokens of the document's last word (with the document's text) wait in the state for the
next part. The state holds at most one document's text and one word's tokens, never the corpus.

``unigram_logfreq`` needs the counts of every word of the corpus before any row can carry
it. The state keeps those counts (a Counter of the stripped, case-folded words, merged by
adding: memory grows with the distinct words of the corpus, not with its tokens), rows are
written with NaN there, and the engine's second pass over words.parquet fills the column
once every model is finished (`second_pass`): a row group in memory at a time.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd

from ..core.covariates import (
    COVARIATES,
    require_wordfreq,
    strip_punctuation,
    unigram_counts,
    unigram_log_frequencies,
    zipf_frequencies,
)
from ..core.units import LN2
from ..core.wordrows import assign_words, document_words
from .base import Analysis, ModelResult, Needs, Outputs, Part, RunFacts

WORD_FILE = "words.parquet"
TOKEN_INPUTS = frozenset(
    {
        "doc_index",
        "position",
        "char_start",
        "char_end",
        "nll",
        "entropy",
        "rank",
        "log_mass",
        "log_mass_end",
        "starts_word",
    }
)
# Columns of `log_mass` (lmeval.core.words.MASS_*): B, E = {EOS} minus B, not-B.
_B, _E, _NOT_B = 0, 1, 2


@dataclasses.dataclass
class WordState:
    """One model's words: payloads of parts not yet formed into words (what `update` makes),
    the document whose last word may go on in the next part (``carry``), the rows formed and
    not yet taken (``ready``), and the corpus's word counts."""

    payloads: list = dataclasses.field(default_factory=list)
    carry: dict | None = None  # {"doc_id", "text", "tokens": DataFrame} of the document left open
    ready: list = dataclasses.field(default_factory=list)
    counts: Counter = dataclasses.field(default_factory=Counter)
    corrected: set = dataclasses.field(default_factory=set)  # True / False: parts with and without masses
    n_words: int = 0


class WordsAnalysis(Analysis):
    """words.parquet (``analysis.words``); see the module docstring."""

    name = "words"
    token_file = WORD_FILE

    def __init__(self, options):
        self.options = options  # the config's `analysis` section
        self.covariates = tuple(c for c in COVARIATES if c in options.covariates)
        if "frequency" in self.covariates:  # before scoring: a missing package or word list fails at once
            require_wordfreq(options.language)

    def needs(self) -> Needs:
        return Needs(token_columns=TOKEN_INPUTS, word_masses=(self.options.word_boundary, self.options.text_end))

    def identity(self) -> dict:
        # Its parts carry the masses of this B and the END rows; covariates change no part.
        return {"words": [self.options.word_boundary, self.options.text_end]}

    def text_facts(self, texts: list[str]) -> dict:
        return {"word_texts": list(texts)}  # "" in the pieces of a document after its first

    def start(self, model: str) -> WordState:
        return WordState()

    def update(self, state: WordState, part: Part) -> WordState:
        state.payloads.append(part)
        return state

    def merge(self, state: WordState, later: WordState) -> WordState:
        """``later``'s parts formed into words after ``state``'s (``later`` is a state of
        `update`: its parts are not formed yet, and ``state``'s open document continues there)."""
        for part in later.payloads:
            self._form(state, part)
        return state

    def state_rows(self, state: WordState):
        if not state.ready:
            return None
        rows = pd.concat(state.ready, ignore_index=True)
        state.ready.clear()
        return rows

    # -- forming words ------------------------------------------------------------------

    def _form(self, state: WordState, part: Part) -> None:
        c = part.columns
        corrected = "log_mass" in c
        state.corrected.add(corrected)
        order = np.lexsort((c["position"], c["doc_index"]))
        doc_index = c["doc_index"][order]
        bounds = np.searchsorted(doc_index, np.arange(len(part.doc_ids) + 1))
        piece, n_pieces = part.meta.get("piece", [0, 1])
        texts = part.meta["word_texts"]
        for i, doc_id in enumerate(part.doc_ids):
            rows = order[bounds[i] : bounds[i + 1]]
            tokens = pd.DataFrame(
                {k: np.asarray(c[k])[rows] for k in ("position", "char_start", "char_end", "nll", "entropy", "rank")}
            )
            for k in ("log_mass", "log_mass_end"):
                values = c[k][rows] if corrected else np.full((len(rows), 3), np.nan)
                tokens[[f"{k}.{j}" for j in range(3)]] = np.asarray(values, dtype=np.float64)
            tokens["starts_word"] = c["starts_word"][rows] if corrected else False
            if piece == 0:  # a document's first part: its text, counted once
                text = texts[i]
                state.counts.update(unigram_counts([text]))
            else:
                if state.carry is None or state.carry["doc_id"] != doc_id:
                    raise RuntimeError(f"words: piece {piece} of document {doc_id} came without the pieces before it")
                text = state.carry["text"]
                tokens = pd.concat([state.carry["tokens"], tokens], ignore_index=True)
            state.carry = None
            open_end = piece < n_pieces - 1  # the document goes on in the next part
            self._emit(state, part.model, doc_id, text, tokens, corrected, open_end)

    def _emit(self, state, model, doc_id, text, tokens: pd.DataFrame, corrected: bool, open_end: bool) -> None:
        """Word rows of the document's tokens so far; with ``open_end``, its last word waits."""
        if not text.strip() or tokens.empty:
            if open_end:
                state.carry = {"doc_id": doc_id, "text": text, "tokens": tokens}
            return
        tokens = tokens.assign(**self._boundaries(tokens, corrected))
        if open_end:
            word, _ = assign_words(text, tokens["char_start"].to_numpy(np.int64), tokens["char_end"].to_numpy(np.int64))
            waiting = word == word[-1]
            state.carry = {"doc_id": doc_id, "text": text, "tokens": tokens.loc[waiting, _RAW].reset_index(drop=True)}
            tokens = tokens.loc[~waiting]
            if tokens.empty:
                return
        words = document_words(doc_id, text, tokens, corrected)
        state.n_words += len(words)
        state.ready.append(self._rows(model, words))

    def _boundaries(self, tokens: pd.DataFrame, corrected: bool) -> dict:
        """boundary_before_bits / boundary_after_bits of each token (bits), as
        `lmeval.core.words.boundary_terms` defines them; 0 without masses (no correction)."""
        n = len(tokens)
        if not corrected:
            return {"boundary_before_bits": np.zeros(n), "boundary_after_bits": np.zeros(n)}
        mass = tokens[[f"log_mass.{j}" for j in range(3)]].to_numpy()
        end = tokens[[f"log_mass_end.{j}" for j in range(3)]].to_numpy()
        union = self._union(mass)
        before = union.copy()
        if tokens["position"].iloc[0] == 0:  # the text's first token: its class's mass after the BOS
            before[0] = mass[0, _B if bool(tokens["starts_word"].iloc[0]) else _NOT_B]
        after = np.append(union[1:], np.nan)
        after[-1] = self._union(end[-1:])[0]  # NaN unless the END was scored here
        return {"boundary_before_bits": -before / LN2, "boundary_after_bits": -after / LN2}

    def _union(self, mass: np.ndarray) -> np.ndarray:
        """log q(B u E) from (n, 3) log masses (E empty under text_end: word)."""
        if self.options.text_end == "word":
            return mass[:, _B]
        with np.errstate(invalid="ignore"):  # NaN rows: no END scored there
            return np.logaddexp(mass[:, _B], mass[:, _E])

    def _rows(self, model: str, words: pd.DataFrame) -> pd.DataFrame:
        out = words.drop(columns=["crosses_context"], errors="ignore")
        out.insert(0, "model", model)
        out["doc_id"] = out["doc_id"].astype(str)
        stripped = [strip_punctuation(w) for w in out["word"]]
        if "length" in self.covariates:
            out["length_chars"] = np.array([len(w) for w in stripped], dtype=np.int64)
        if "frequency" in self.covariates:
            out["frequency_zipf"] = zipf_frequencies(stripped, self.options.language)
        if "unigram" in self.covariates:
            out["unigram_logfreq"] = np.nan  # filled by the second pass, once the corpus is counted
        out.attrs = self.attrs()
        return out

    def attrs(self) -> dict:
        """The convention, as surprisal_table's attrs name it (words.parquet's metadata)."""
        a = self.options
        attrs: dict = {"word_correction": "bow", "text_end": a.text_end, "word_boundary": a.word_boundary}
        if self.covariates:
            attrs["covariates"] = list(self.covariates)
            if "frequency" in self.covariates:
                attrs["language"] = a.language
        return attrs

    # -- the end --------------------------------------------------------------------------

    def finish(self, model: str, state: WordState, run: RunFacts) -> ModelResult:
        if state.carry is not None or state.payloads:
            raise RuntimeError(f"words: model {model}'s last document never got its last part")
        applied = "bow" if state.corrected == {True} else "none" if state.corrected == {False} else "mixed"
        return ModelResult(extra={"counts": state.counts, "n_words": state.n_words, "word_correction": applied})

    def second_pass(self, results: dict):
        if "unigram" not in self.covariates:
            return None
        counts = {model: result.extra["counts"] for model, result in results.items()}

        def fill(rows: pd.DataFrame) -> pd.DataFrame:
            for model, group in rows.groupby("model", sort=False):
                stripped = [strip_punctuation(w) for w in group["word"]]
                rows.loc[group.index, "unigram_logfreq"] = unigram_log_frequencies(stripped, counts=counts[model])
            return rows

        return fill

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        a = self.options
        record = {
            "file": WORD_FILE,
            "word_boundary": a.word_boundary,
            "text_end": a.text_end,
            "covariates": list(self.covariates),
            "language": a.language if "frequency" in self.covariates else None,
            "unigram": "counted over every word of the scored documents, filled in by a second pass over the file"
            if "unigram" in self.covariates
            else None,
            "models": {
                m: {"n_words": r.extra["n_words"], "word_correction": r.extra["word_correction"]}
                for m, r in results.items()
            },
        }
        return Outputs(record={"words": record})


_RAW = [
    "position",
    "char_start",
    "char_end",
    "nll",
    "entropy",
    "rank",
    *(f"log_mass.{j}" for j in range(3)),
    *(f"log_mass_end.{j}" for j in range(3)),
    "starts_word",
]
