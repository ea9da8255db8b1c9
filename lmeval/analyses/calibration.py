"""Calibration: are the model's probabilities honest? ECE, MCE, Brier, reliability bins,
temperature curves and label-smoothed cross-entropy, pooled from per-part sums.

Every figure comes from `lmeval.core.calibration` sums (float64), merged part by part, and
divided once at the end. Owns ``calibration.csv``, ``temperature.csv`` and ``reliability.png``,
and adds ``ece, mce, brier, top1_accuracy, entropy_mean, ce_eps*, kl_eps*`` to the summary,
with document-bootstrap intervals of the first four (``ece_ci_low``, ...): each document's
per-bin sums wait on disk until the end (`DocumentRows`), 384 bytes a document at 15 bins.

``calibration.binning: mass`` (equal-mass bins) needs the quantiles of every token's
confidence, so in that mode the state keeps each token's (max_prob, is_top1) and its document
(float32, bool, int32: 9 bytes a token): the one analysis state that grows with the corpus,
and only on request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core import calibration as cal
from ..core.bootstrap import DocumentRows, bootstrap_interval, resampled_sums
from ..engine.config import CompareConfig
from .base import Analysis, ModelResult, Needs, Outputs, Part, RunFacts
from .plots import plot_reliability

CALIBRATION_INPUTS = ("nll", "max_prob", "is_top1", "sum_q2", "mean_neg_logq", "entropy", "nll_t", "max_prob_t")
# A part's tokens are summed this many at a time: float64 copies of a slice, not of the whole
# part (a 106k-token part's update held 17 MB; it runs on the writer thread beside scoring).
# The slices depend on the part alone, so the sums do not change with batch size or executor.
UPDATE_ROWS = 16384


class CalibrationAnalysis(Analysis):
    name = "calibration"

    def __init__(self, options, compare=None):
        self.options = options  # the config's `calibration` section
        self.compare = compare or CompareConfig()  # the intervals' resamples, seed and min_documents
        self.width = 2 + 3 * options.bins  # `cal.document_rows`' columns

    def needs(self) -> Needs:
        return Needs(
            token_columns=frozenset({"doc_index", *CALIBRATION_INPUTS}), temperatures=tuple(self.options.temperatures)
        )

    def start(self, model: str):
        return {"sums": None, "confidences": [], "vocab_size": None, "documents": DocumentRows(self.width)}

    def update(self, state, part: Part):
        c, columns = self.options, part.columns
        n = len(columns["nll"])
        per_document = np.zeros((len(part.doc_ids), self.width))  # `cal.document_rows`, summed over slices
        for start in range(0, max(n, 1), UPDATE_ROWS):  # an empty part still gives its (zero) sums
            rows = slice(start, start + UPDATE_ROWS)
            brier = cal.brier_terms(columns["nll"][rows], columns["sum_q2"][rows])
            per_document += cal.document_rows(
                columns["doc_index"][rows], len(part.doc_ids), columns["max_prob"][rows], columns["is_top1"][rows],
                brier, self.edges,
            )  # fmt: skip
            sums = cal.calibration_sums(
                *(columns[k][rows] for k in CALIBRATION_INPUTS[:6]),
                eps_grid=c.label_smoothing,
                nll_t=columns["nll_t"][rows] if "nll_t" in columns else None,
                max_prob_t=columns["max_prob_t"][rows] if "max_prob_t" in columns else None,
                temperatures=c.temperatures,
                n_bins=c.bins,
            )
            state["sums"] = sums if state["sums"] is None else cal.merge_sums(state["sums"], sums)
        if c.binning == "mass":  # the bins come from every token's confidence: documents binned at the end
            doc_index = columns["doc_index"].astype(np.int32)  # a part's documents, far below 2^31
            state["confidences"].append((part.doc_ids, doc_index, columns["max_prob"], columns["is_top1"]))
        state["documents"].add(part.doc_ids, per_document)
        state["vocab_size"] = part.meta["protocol"]["vocab_size"]
        return state

    def merge(self, state, later):
        if state["sums"] is None or later["sums"] is None:
            sums = later["sums"] if state["sums"] is None else state["sums"]
        else:
            sums = cal.merge_sums(state["sums"], later["sums"])
        return {
            "sums": sums,
            "confidences": state["confidences"] + later["confidences"],
            "vocab_size": later["vocab_size"] or state["vocab_size"],
            "documents": state["documents"].absorb(later["documents"]),
        }

    @property
    def edges(self) -> np.ndarray:
        return cal.width_edges(self.options.bins)

    def finish(self, model: str, state, run: RunFacts) -> ModelResult:
        c, sums = self.options, state["sums"]
        metrics = cal.summarize(sums, vocab_size=state["vocab_size"])
        bins = sums.bins
        _, rows = state["documents"].canonical()  # (D, 2 + 3K) in doc_id order
        if c.binning == "mass":
            conf, top1 = (np.concatenate(x) for x in list(zip(*state["confidences"]))[2:])
            bins = cal.reliability_bins(conf, top1, c.bins, scheme="mass")
            metrics.update(ece=cal.expected_calibration_error(bins), mce=cal.max_calibration_error(bins))
            edges = np.append(bins.lo, bins.hi[-1:])
            rows = np.column_stack([rows[:, :2], _mass_rows(state["confidences"], edges)])
        metrics.update(self._intervals(rows, len(bins.lo)))
        calibration, temperature = bins.to_frame(), cal.temperature_table(sums, c.temperatures)
        calibration.insert(0, "model", model)
        temperature.insert(0, "model", model)
        return ModelResult(
            summary=metrics, tables={"calibration": calibration, "temperature": temperature}, extra={"bins": bins}
        )

    def _intervals(self, rows: np.ndarray, n_bins: int) -> dict:
        """``{figure}_ci_low``, ``{figure}_ci_high`` of ECE, MCE, Brier and top-1 accuracy: the
        95% percentile interval over `compare.bootstrap` resamples of documents (the draw of
        the summary's other intervals; ``rows`` in doc_id order), each resample's sums binned
        as the point estimate (equal-mass bins keep the point estimate's edges)."""
        c = self.compare
        enough = len(rows) >= max(c.min_documents, 1) and c.bootstrap > 0
        figures = cal.resampled_figures(resampled_sums(rows, c.bootstrap if enough else 0, c.seed), n_bins)
        out = {}
        for name in cal.INTERVAL_FIGURES:
            draws = figures[name][np.isfinite(figures[name])]
            low, high, _ = bootstrap_interval(draws)  # NaN from no resamples
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        return out

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        tables = {
            name: pd.concat([r.tables[name] for r in results.values()], ignore_index=True)
            for name in ("calibration", "temperature")
        }
        figure = plot_reliability({model: r.extra["bins"] for model, r in results.items()})
        files = {
            "calibration.csv": tables["calibration"],
            "temperature.csv": tables["temperature"],
            "reliability.png": figure,
        }
        return Outputs(files=files, tables=tables)


def _mass_rows(confidences: list, edges: np.ndarray) -> np.ndarray:
    """`cal.binned_rows` in the equal-mass bins (which exist once every token is in), in doc_id order."""
    documents = DocumentRows(3 * (len(edges) - 1))
    for doc_ids, doc_index, conf, top1 in confidences:
        documents.add(doc_ids, cal.binned_rows(doc_index, len(doc_ids), conf, top1, edges))
    return documents.canonical()[1]
