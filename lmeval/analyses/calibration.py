"""Calibration: are the model's probabilities honest? ECE, MCE, Brier, reliability bins,
temperature curves and label-smoothed cross-entropy, pooled from per-part sums.

Every figure comes from `lmeval.core.calibration` sums (float64), merged part by part, and
divided once at the end. Owns ``calibration.csv``, ``temperature.csv`` and ``reliability.png``,
and adds ``ece, mce, brier, top1_accuracy, entropy_mean, ce_eps*, kl_eps*`` to the summary.

``calibration.binning: mass`` (equal-mass bins) needs the quantiles of every token's
confidence, so in that mode the state keeps each token's (max_prob, is_top1), 9 bytes a
token: the one analysis state that grows with the corpus, and only on request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core import calibration as cal
from .base import Analysis, ModelResult, Needs, Outputs, Part, RunFacts
from .plots import plot_reliability

CALIBRATION_INPUTS = ("nll", "max_prob", "is_top1", "sum_q2", "mean_neg_logq", "entropy", "nll_t", "max_prob_t")
# A part's tokens are summed this many at a time: float64 copies of a slice, not of the whole
# part (a 106k-token part's update held 17 MB; it runs on the writer thread beside scoring).
# The slices depend on the part alone, so the sums do not change with batch size or executor.
UPDATE_ROWS = 16384


class CalibrationAnalysis(Analysis):
    name = "calibration"

    def __init__(self, options):
        self.options = options  # the config's `calibration` section

    def needs(self) -> Needs:
        return Needs(token_columns=frozenset(CALIBRATION_INPUTS), temperatures=tuple(self.options.temperatures))

    def start(self, model: str):
        return {"sums": None, "confidences": [], "vocab_size": None}

    def update(self, state, part: Part):
        c, columns = self.options, part.columns
        n = len(columns["nll"])
        for start in range(0, max(n, 1), UPDATE_ROWS):  # an empty part still gives its (zero) sums
            rows = slice(start, start + UPDATE_ROWS)
            sums = cal.calibration_sums(
                *(columns[k][rows] for k in CALIBRATION_INPUTS[:6]),
                eps_grid=c.label_smoothing,
                nll_t=columns["nll_t"][rows] if "nll_t" in columns else None,
                max_prob_t=columns["max_prob_t"][rows] if "max_prob_t" in columns else None,
                temperatures=c.temperatures,
                n_bins=c.bins,
            )
            state["sums"] = sums if state["sums"] is None else cal.merge_sums(state["sums"], sums)
        if c.binning == "mass":
            state["confidences"].append((columns["max_prob"], columns["is_top1"]))
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
        }

    def finish(self, model: str, state, run: RunFacts) -> ModelResult:
        c, sums = self.options, state["sums"]
        metrics = cal.summarize(sums, vocab_size=state["vocab_size"])
        bins = sums.bins
        if c.binning == "mass":
            conf, top1 = (np.concatenate(x) for x in zip(*state["confidences"]))
            bins = cal.reliability_bins(conf, top1, c.bins, scheme="mass")
            metrics.update(ece=cal.expected_calibration_error(bins), mce=cal.max_calibration_error(bins))
        calibration, temperature = bins.to_frame(), cal.temperature_table(sums, c.temperatures)
        calibration.insert(0, "model", model)
        temperature.insert(0, "model", model)
        return ModelResult(
            summary=metrics, tables={"calibration": calibration, "temperature": temperature}, extra={"bins": bins}
        )

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
