"""What a model's per-token results say about the corpus, streamed over its result parts.

Two questions (the ``analysis`` config section):

- Does the model use its context? ``positions.csv``: mean NLL [nats] in bins of the token's
  position in its document and, separately, of its context length (the tokens the
  prediction conditioned on, BOS included), each with a 95% document-bootstrap interval;
  ``positions.png``; and ``icl_score`` in the summary.
- Has the model seen this document? With ``membership: true``, per-document scores in
  documents.parquet (see `lmeval.core.memorization`); with ``reference``, ``ref_ratio``.

Every number comes from sums that `ModelAnalysis.add` takes from one part at a time, so the
corpus's tokens are never in memory together.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pandas as pd

from ..core import memorization as mem
from ..core.positions import (
    BinnedSums,
    Bins,
    SpilledSums,
    bin_intervals,
    binned_sums,
    icl_score,
    icl_window,
    pooled_bins,
    window_sums,
)
from .base import Analysis, ModelResult, Needs, Outputs, Part, RunFacts, accumulate
from .plots import plot_positions

log = logging.getLogger(__name__)

POSITION_COLUMNS = [
    "model",
    "axis",
    "bin",
    "lo",
    "hi",
    "n_tokens",
    "n_documents",
    "value_mean",
    "nll_mean",
    "ci_low",
    "ci_high",
]
AXES = ("position", "context_len")  # the two columns of the token table the curve bins


def percent_name(k: float) -> str:
    """The column suffix of a percentage: 10 -> "10", 12.5 -> "12.5"."""
    return f"{k:g}"


def membership_columns(options) -> list[str]:
    """The per-document columns ``membership: true`` adds, in table order."""
    ks = [percent_name(k) for k in options.mink_k]
    return (
        [f"mink_prob_{k}" for k in ks]
        + [f"mink_pp_{k}" for k in ks]
        + ["zlib_bytes", "zlib_ratio", "extractable_suffix"]
    )


class ModelAnalysis:
    """One model's analysis sums, fed a part at a time (`add`), in corpus order."""

    def __init__(self, name: str, options):
        self.name, self.options = name, options
        self.bins = Bins(options.position_bins, options.bins_per_octave, options.bin_width)
        self.windows = [icl_window(c) for c in options.icl_context]
        self.index: dict[str, int] = {}  # doc_id -> corpus-wide index (the pieces of a document share one)
        self.doc_ids: list[str] = []
        self.longest_context = 0  # for the note when icl_score cannot be computed
        self.sums: dict[str, list[BinnedSums]] = {axis: [] for axis in AXES}  # a part's (see `add`)
        self.spilled: dict[str, SpilledSums] = {}  # the run's, merged in (see `merge`)
        self.icl: list[np.ndarray] = [np.zeros(0)] * 4  # per document: early n, early sum, late n, late sum
        self.scores: dict[str, list[np.ndarray]] = {c: [] for c in membership_columns(options)}

    def add(self, columns: dict[str, np.ndarray], meta: dict) -> None:
        """Take one part's per-token ``columns`` (``doc_index`` into ``meta["doc_ids"]``). A
        document scored as several pieces (parts) is one document here."""
        n_docs = len(meta["doc_ids"])
        corpus_index = self._indices(meta["doc_ids"])
        doc, nll = corpus_index[columns["doc_index"]], columns["nll"]
        if self.options.positions:
            for axis in AXES:
                self.sums[axis].append(binned_sums(doc, columns[axis], nll, self.bins))
            self.longest_context = max(self.longest_context, int(columns["context_len"].max(initial=0)))
            for i, window in enumerate(self.windows):
                for j, values in enumerate(window_sums(doc, columns["context_len"], nll, window, self.n_docs)):
                    self.icl[2 * i + j] = accumulate(self.icl[2 * i + j], values)
        if self.options.membership:
            if meta.get("piece", [0, 1])[1] > 1:
                raise RuntimeError("membership scores need whole documents: the run should have refused pieces")
            for key, values in self._membership(columns, meta, n_docs).items():
                self.scores[key].append(values)

    def merge(self, later: ModelAnalysis) -> ModelAnalysis:
        """These sums followed by ``later``'s (parts after this state's, in corpus order); a
        document in both (pieces of one document) is one document."""
        remap = self._indices(later.doc_ids)  # later's corpus index -> this state's
        for axis in AXES:
            for s in later._axis_sums(axis):  # a part's, or another running state's (two ranks' stretches)
                if axis not in self.spilled:  # the running state keeps them on disk (none without positions)
                    self.spilled[axis] = SpilledSums()
                self.spilled[axis].append(dataclasses.replace(s, doc=remap[s.doc].astype(np.int32)))
        self.longest_context = max(self.longest_context, later.longest_context)
        for i, values in enumerate(later.icl):
            if len(self.icl[i]) < self.n_docs:  # grown by doubling: not a new corpus-long array every part
                self.icl[i] = accumulate(self.icl[i], np.zeros(max(self.n_docs, 2 * len(self.icl[i]))))
            np.add.at(self.icl[i], remap[: len(values)], values)
        for key, parts in later.scores.items():
            self.scores[key] += parts  # membership refuses pieces: each document appears once
        return self

    def _indices(self, doc_ids) -> np.ndarray:
        """Corpus-wide indices of ``doc_ids``, new documents appended in order."""
        for doc_id in map(str, doc_ids):
            if doc_id not in self.index:
                self.index[doc_id] = len(self.doc_ids)
                self.doc_ids.append(doc_id)
        return np.array([self.index[str(d)] for d in doc_ids], dtype=np.int64)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def _membership(self, columns: dict[str, np.ndarray], meta: dict, n_docs: int) -> dict[str, np.ndarray]:
        doc, nll = columns["doc_index"], columns["nll"]
        if "var_logq" not in columns or "zlib_bytes" not in meta:
            raise RuntimeError("a result part lacks var_logq or zlib_bytes: the run identity should have refused it")
        out = {}
        for k in self.options.mink_k:
            out[f"mink_prob_{percent_name(k)}"] = mem.mink_prob(doc, nll, n_docs, k)
            out[f"mink_pp_{percent_name(k)}"] = mem.mink_pp(
                doc, nll, columns["entropy"], columns["var_logq"], n_docs, k
            )
        zlib_bytes = np.asarray(meta["zlib_bytes"], dtype=np.int64)
        out["zlib_bytes"] = zlib_bytes
        out["zlib_ratio"] = mem.zlib_ratio(meta["nll_sum"], meta["n_tokens"], zlib_bytes)
        out["extractable_suffix"] = mem.extractable_suffix(doc, columns["position"], columns["is_top1"], n_docs)
        return out

    def document_columns(self) -> dict[str, np.ndarray]:
        """The membership columns of this model's documents, in corpus order (none without membership)."""
        if not self.options.membership:
            return {}
        return {key: np.concatenate(parts) for key, parts in self.scores.items()}

    def positions(self) -> pd.DataFrame:
        """positions.csv rows of this model: columns `POSITION_COLUMNS`, ``lo``/``hi`` the bin's
        ``[lo, hi)`` on its axis, ``value_mean`` the mean position (or context length) in it."""
        groups = [BinnedSums.concat(self._axis_sums(axis)) for axis in AXES]
        rank = np.argsort(self._canonical())  # corpus index -> its place in doc_id order
        resampled = [dataclasses.replace(g, doc=rank[g.doc]) for g in groups]
        intervals = bin_intervals(resampled, self.n_docs, self.options.bootstrap, self.options.seed)
        frames = []
        for axis, sums, (low, high) in zip(AXES, groups, intervals):
            pooled = pooled_bins(sums)
            lo, hi = self.bins.bounds(pooled["bin"])
            frames.append(
                pd.DataFrame(
                    {
                        "model": self.name,
                        "axis": axis,
                        "bin": pooled["bin"],
                        "lo": lo,
                        "hi": hi,
                        "n_tokens": pooled["n_tokens"],
                        "n_documents": pooled["n_documents"],
                        "value_mean": pooled["value_mean"],
                        "nll_mean": pooled["nll_mean"],
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)[POSITION_COLUMNS]

    def _axis_sums(self, axis: str) -> list[BinnedSums]:
        """Every entry of ``axis``: those kept in memory, then those spilled (read back once and
        the file closed: `positions` and a merge into another state are the last uses)."""
        spilled = self.spilled.pop(axis, None)
        if spilled is None:
            return self.sums[axis]
        try:
            return [*self.sums[axis], spilled.load()]
        finally:
            spilled.close()

    def _canonical(self) -> np.ndarray:
        """Corpus indices in doc_id order: the bootstrap resamples documents in this order,
        so its intervals do not depend on the order of the corpus file."""
        return np.argsort(np.array(self.doc_ids, dtype=object), kind="stable")

    def summary(self) -> dict:
        """``icl_score`` (late minus early window, nats), its interval, the documents it
        pools, and ``icl_note`` saying why it is NaN ('' otherwise)."""
        if not self.options.positions:
            return {}
        order = self._canonical()
        icl = [accumulate(values[: self.n_docs], np.zeros(self.n_docs)) for values in self.icl]
        early, late = ((icl[i][order], icl[i + 1][order]) for i in (0, 2))
        result = icl_score(early, late, self.options.bootstrap, self.options.seed)
        (e_lo, e_hi), (l_lo, l_hi) = self.windows
        result["icl_note"] = ""
        if not result["icl_documents"]:
            result["icl_note"] = (
                f"no document has tokens scored with both {e_lo}-{e_hi} and {l_lo}-{l_hi} tokens of context "
                f"(the longest context was {self.longest_context}): documents must be longer than {l_hi - 1} tokens "
                f"and scoring.max_length at least {l_hi}"
            )
            log.info("model %s: icl_score is NaN: %s", self.name, result["icl_note"])  # short documents are common
        return result


class PerDocumentAnalysis(Analysis):
    """An analysis whose state is a `ModelAnalysis`: sums kept per document and per bin."""

    options: Any  # the config's `analysis` section: each subclass sets it in __init__

    def start(self, model: str) -> ModelAnalysis:
        return ModelAnalysis(model, self.options)

    def update(self, state: ModelAnalysis, part: Part) -> ModelAnalysis:
        state.add(part.columns, part.meta)
        return state

    def merge(self, state: ModelAnalysis, later: ModelAnalysis) -> ModelAnalysis:
        return state.merge(later)


class PositionsAnalysis(PerDocumentAnalysis):
    """positions.csv, positions.png and ``icl_score`` in the summary (``analysis.positions``)."""

    name = "positions"

    def __init__(self, options):
        self.options = dataclasses.replace(options, membership=False)  # the config's `analysis` section

    def needs(self) -> Needs:
        return Needs(token_columns=frozenset({"doc_index", "nll", *AXES}))

    def finish(self, model: str, state: ModelAnalysis, run: RunFacts) -> ModelResult:
        return ModelResult(summary=state.summary(), tables={"positions": state.positions()})

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        table = pd.concat([r.tables["positions"] for r in results.values()], ignore_index=True)
        files = {"positions.csv": table}
        if len(table):
            files["positions.png"] = plot_positions(table, log_x=self.options.position_bins == "log")
        return Outputs(files=files, tables={"positions": table})
