"""Divergence from a baseline as an analysis: KL both ways, delta p and top-1 agreement, pooled
per model with paired document-bootstrap intervals.

The pass of a model with its baseline (`lmeval.model.scorer.score_windows` with a baseline)
adds ``kl, kl_reverse, delta_p, same_top1, nll_baseline, acceptance, topk_overlap, kl_topk`` to the model's own columns; this
analysis folds them a part at a time. The summary pools tokens as the rest of lmeval does:
means are sums over all tokens divided once (never a mean of per-document means), and every
mean gets a paired document-bootstrap 95% interval: documents, not tokens, are resampled
(tokens of one document share its topic and style), and both models' numbers of a resampled
document travel together, since they are computed on the same tokens. Owns
``divergence.parquet`` (``per_token``), ``divergence.csv``, ``divergence_tokens.csv`` and
``divergence.png``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.bootstrap import bootstrap_interval, resampled_sums
from ..core.divergence import PAIR_FIELDS
from ..core.sketch import QuantileSketch
from .base import TOKEN_PLACE, Analysis, ModelResult, Needs, Outputs, Part, RunFacts
from .plots import plot_divergence, plot_divergence_bpw

DIVERGENCE_COLUMNS = [
    "model",
    "baseline",
    "doc_id",
    "position",
    *PAIR_FIELDS,
    "token_id",
    "token",
    "char_start",
    "char_end",
    "context_len",
]
# Per-document sums the bootstrap resamples; column 0 counts the tokens.
SUMS = (
    "n_tokens",
    "kl",
    "kl_reverse",
    "delta_p",
    "delta_p_sq",
    "same_top1",
    "nll",
    "nll_baseline",
    "acceptance",
    "topk_overlap",
    "kl_topk",
)
KL_PERCENTILES = {"kl_median": 50.0, "kl_p90": 90.0, "kl_p99": 99.0, "kl_p999": 99.9}
DELTA_P_PERCENTILES = {
    "delta_p_p001": 0.1,
    "delta_p_p01": 1.0,
    "delta_p_p05": 5.0,
    "delta_p_p10": 10.0,
    "delta_p_p25": 25.0,
    "delta_p_median": 50.0,
    "delta_p_p75": 75.0,
    "delta_p_p90": 90.0,
    "delta_p_p95": 95.0,
    "delta_p_p99": 99.0,
    "delta_p_p999": 99.9,
}
TOP_TOKEN_COLUMNS = [
    "model",
    "baseline",
    "doc_id",
    "position",
    "token",
    "token_text",
    "context",
    "kl",
    "kl_reverse",
    "delta_p",
    "same_top1",
    "nll",
    "nll_baseline",
    "char_start",
    "char_end",
]
CONTEXT_CHARS = 40  # characters of text before a top token, in divergence_tokens.csv


def pair_frame(model: str, baseline: str, doc_ids: list, columns: dict) -> pd.DataFrame:
    """One row per scored token (`DIVERGENCE_COLUMNS`), in document then position order."""
    doc_index = columns["doc_index"]
    frame = pd.DataFrame(
        {
            "model": model,
            "baseline": baseline,
            "doc_id": np.array(doc_ids, dtype=object)[doc_index] if len(doc_index) else np.array([], dtype=object),
            **{key: columns[key] for key in DIVERGENCE_COLUMNS[3:]},
        }
    )
    order = np.lexsort((columns["position"], doc_index))
    return frame.iloc[order].reset_index(drop=True)


def document_sums(doc_index: np.ndarray, columns: dict, n_docs: int) -> np.ndarray:
    """(n_docs, len(SUMS)) float64 per-document sums of the per-token columns (see `SUMS`)."""

    def total(values):
        return np.bincount(doc_index, weights=np.asarray(values, dtype=np.float64), minlength=n_docs)

    delta_p = columns["delta_p"].astype(np.float64)
    return np.column_stack(
        [
            np.bincount(doc_index, minlength=n_docs).astype(np.float64),
            total(columns["kl"]),
            total(columns["kl_reverse"]),
            total(delta_p),
            total(delta_p * delta_p),
            total(columns["same_top1"]),
            total(columns["nll"]),
            total(columns["nll_baseline"]),
            total(columns["acceptance"]),
            total(columns["topk_overlap"]),
            total(columns["kl_topk"]),
        ]
    ).reshape(n_docs, len(SUMS))


# Each pooled mean from a vector (or (B, k) matrix) of `SUMS`; ratios divide once at the end.
MEANS = {
    "kl_mean": lambda s: s[..., 1] / s[..., 0],
    "kl_reverse_mean": lambda s: s[..., 2] / s[..., 0],
    "same_top1": lambda s: s[..., 5] / s[..., 0],
    "delta_p_mean": lambda s: s[..., 3] / s[..., 0],
    "delta_p_rms": lambda s: np.sqrt(s[..., 4] / s[..., 0]),
    "ln_ppl_ratio": lambda s: (s[..., 6] - s[..., 7]) / s[..., 0],
    "acceptance_mean": lambda s: s[..., 8] / s[..., 0],
    "topk_overlap_mean": lambda s: s[..., 9] / s[..., 0],
    "kl_topk_mean": lambda s: s[..., 10] / s[..., 0],
}
WITH_P_VALUE = ("delta_p_mean", "ln_ppl_ratio")  # the means whose sign is a question


def summarize(sums: np.ndarray, kl, delta_p, n_resamples: int = 1000, seed: int = 0) -> dict:
    """The pooled figures of one model against its baseline.

    ``sums`` holds one row of `SUMS` per document (documents without scored tokens are
    dropped: they carry nothing and would only change how many documents a resample
    draws); ``kl`` and ``delta_p`` are every token's values, or `QuantileSketch` es of them,
    for the percentiles (numpy's linear interpolation; exact up to the sketch's
    ``exact_limit`` tokens, then within its relative accuracy, see `lmeval.core.sketch`).
    Each of `MEANS` comes with ``_ci_low``/``_ci_high``, the 95%
    percentile interval over ``n_resamples`` document resamples (`resampled_sums`, so the
    draw is ``default_rng(seed).integers(0, D, (B, D))``), and `WITH_P_VALUE` with a
    two-sided ``_p_value`` (`bootstrap_interval`). ``ppl_ratio`` = exp(ln_ppl_ratio).
    """
    sums = np.asarray(sums, dtype=np.float64)
    sums = sums[sums[:, 0] > 0]
    total = sums.sum(axis=0)
    row: dict = {"n_documents": len(sums), "n_tokens": int(total[0]) if len(sums) else 0}
    boot = resampled_sums(sums, n_resamples, seed) if len(sums) else np.zeros((0, len(SUMS)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, mean in MEANS.items():
            row[name] = float(mean(total)) if row["n_tokens"] else float("nan")
            low, high, p = bootstrap_interval(mean(boot))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
            if name in WITH_P_VALUE:
                row[f"{name}_p_value"] = p
    kl, delta_p = as_sketch(kl), as_sketch(delta_p)
    for name, q in KL_PERCENTILES.items():
        row[name] = kl.percentile(q)
    row["kl_max"] = float(kl.max) if kl.count else float("nan")
    row["delta_p_min"] = float(delta_p.min) if delta_p.count else float("nan")
    for name, q in DELTA_P_PERCENTILES.items():
        row[name] = delta_p.percentile(q)
    row["delta_p_max"] = float(delta_p.max) if delta_p.count else float("nan")
    row["ppl_ratio"] = float(np.exp(row["ln_ppl_ratio"]))
    row["ppl_ratio_ci_low"], row["ppl_ratio_ci_high"] = (
        np.exp(row["ln_ppl_ratio_ci_low"]),
        np.exp(row["ln_ppl_ratio_ci_high"]),
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        row["nll_mean"], row["nll_baseline_mean"] = total[6] / total[0], total[7] / total[0]
    row["n_resamples"] = n_resamples
    return row


# One line per statistic with its interval (and p-value): the grouping is the table's meaning.
SUMMARY_COLUMNS = [
    "model", "baseline", "n_documents", "n_tokens",
    "kl_mean", "kl_mean_ci_low", "kl_mean_ci_high", *KL_PERCENTILES, "kl_max",
    "kl_reverse_mean", "kl_reverse_mean_ci_low", "kl_reverse_mean_ci_high",
    "same_top1", "same_top1_ci_low", "same_top1_ci_high",
    "delta_p_mean", "delta_p_mean_ci_low", "delta_p_mean_ci_high", "delta_p_mean_p_value",
    "delta_p_rms", "delta_p_rms_ci_low", "delta_p_rms_ci_high", "delta_p_min", *DELTA_P_PERCENTILES, "delta_p_max",
    "ln_ppl_ratio", "ln_ppl_ratio_ci_low", "ln_ppl_ratio_ci_high", "ln_ppl_ratio_p_value",
    "ppl_ratio", "ppl_ratio_ci_low", "ppl_ratio_ci_high", "nll_mean", "nll_baseline_mean",
    "acceptance_mean", "acceptance_mean_ci_low", "acceptance_mean_ci_high",
    "topk_overlap_mean", "topk_overlap_mean_ci_low", "topk_overlap_mean_ci_high",
    "kl_topk_mean", "kl_topk_mean_ci_low", "kl_topk_mean_ci_high", "n_resamples",
    "weight_bytes", "n_parameters", "bits_per_weight", "quant_method", "load_path", "baseline_tail_mass_mean",
]  # fmt: skip


def as_sketch(values) -> QuantileSketch:
    """``values`` as a sketch; an array is kept exact whatever its length."""
    if isinstance(values, QuantileSketch):
        return values
    values = np.asarray(values)
    return QuantileSketch(exact_limit=max(len(values), 1)).add(values)


def divergence_summary(tokens: pd.DataFrame, bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, baseline) pair of a `divergence` table: `SUMMARY_COLUMNS`.

    Documents are the table's doc_ids in order of first appearance, each pair resampled with
    its own ``default_rng(seed)`` (see `summarize`)."""
    rows = []
    for (model, baseline), frame in tokens.groupby(["model", "baseline"], sort=False):
        doc_index, doc_ids = pd.factorize(frame["doc_id"], sort=False)
        columns = {key: frame[key].to_numpy() for key in PAIR_FIELDS}
        sums = document_sums(doc_index, columns, len(doc_ids))
        row = summarize(sums, columns["kl"], columns["delta_p"], bootstrap, seed)
        rows.append({"model": model, "baseline": baseline, **row})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def top_tokens(frame: pd.DataFrame, top_k: int, text_of) -> pd.DataFrame:
    """The ``top_k`` tokens with the largest ``kl`` (first in table order among ties), with
    their text and up to `CONTEXT_CHARS` characters before it; ``text_of(doc_id)`` is the text."""
    top = frame.loc[frame["kl"].nlargest(top_k, keep="first").index] if top_k else frame.iloc[:0]
    return with_text(top, text_of)


DEFINITIONS = {
    "kl": "KL(P_baseline || P_model) = sum_v p_v (log p_v - log q_v), nats, per scored token",
    "kl_reverse": "KL(P_model || P_baseline), nats",
    "delta_p": "q_y - p_y: the true token's probability under the model minus under the baseline",
    "same_top1": "both models' argmax token is the same",
    "ln_ppl_ratio": "ln PPL(model) - ln PPL(baseline) = mean(nll - nll_baseline) over the same tokens, nats",
    "acceptance": "sum_v min(p_v, q_v) = 1 - TV(P, Q): speculative decoding's acceptance probability of a draft "
    "from the model against the baseline",
    "topk_overlap": "|top-k(P_baseline) ∩ top-k(P_model)| / k, k = compare.overlap_k; ties go to the lower token id",
    "kl_topk": "KL(P_S || Q_S) over S = the baseline's top-K tokens (K = compare.kl_top_k), each distribution "
    "renormalised over S (brevitas' top-K-normalised KL), nats",
    "intervals": "95% percentile intervals of a paired document bootstrap (documents resampled, both models together)",
    "percentiles": "over all scored tokens, numpy linear interpolation: exact up to 2,097,152 tokens per model, "
    "beyond that within 0.5% of the exact value (logarithmic buckets, DDSketch's mapping; min and max exact)",
}
# compare.baseline_cache: topk (lmeval.core.divergence.cached_divergence_statistics): which bound each is
TOPK_BOUND = (
    "kl and kl_reverse are LOWER bounds of KL(P||Q) and KL(Q||P), acceptance an UPPER bound of sum_v min(p_v, q_v): "
    "both distributions coarsened to the baseline's K kept ids and the rest of the vocabulary as one cell "
    "(log-sum inequality); topk_overlap, kl_topk, same_top1, delta_p, nll and nll_baseline are exact"
)
TOKEN_INPUTS = TOKEN_PLACE | {*PAIR_FIELDS, "baseline_tail_mass"}


class DivergenceAnalysis(Analysis):
    """Each model but the baseline against the baseline (``compare.divergence``)."""

    name = "divergence"

    def __init__(self, options, baseline: str, models: tuple, per_token: bool):
        self.options, self.baseline, self.models = options, baseline, tuple(models)  # `compare` section
        self.token_file = "divergence.parquet" if per_token else None

    def needs(self) -> Needs:
        return Needs(token_columns=TOKEN_INPUTS)

    def identity(self) -> dict:
        # a model's parts carry its pair's columns, which k and K change
        cached = {"baseline_cache": "topk"} if self.options.baseline_cache == "topk" else {}  # none: as before
        return {
            "divergence_baseline": self.baseline,
            "overlap_k": self.options.overlap_k,
            "kl_top_k": self.options.kl_top_k,
            **cached,
        }

    def start(self, model: str):
        return _Collected(self.options.top_k) if model in self.models else None

    def update(self, state, part: Part):
        if state is not None:
            state.add(part, self.baseline)
        return state

    def merge(self, state, later):
        return later if state is None else state.merge(later)

    def token_rows(self, part: Part):
        if self.token_file is None or part.model not in self.models:
            return None
        return pair_frame(part.model, self.baseline, part.doc_ids, part.columns)

    def finish(self, model: str, state, run: RunFacts) -> ModelResult:
        if state is None:
            return ModelResult()
        c = self.options
        summary = summarize(np.concatenate(state.sums), state.kl, state.delta_p, c.bootstrap, c.seed)
        top = with_text(state.top if state.top is not None else pd.DataFrame(columns=DIVERGENCE_COLUMNS), run.text_of)
        row = {"model": model, "baseline": self.baseline, **summary, **_size(state.protocol)}
        # under compare.baseline_cache: topk, the baseline's mass outside its kept K: how loose the bounds can be
        row["baseline_tail_mass_mean"] = state.tail_sum / state.tail_n if state.tail_n else float("nan")
        return ModelResult(
            tables={"divergence": row, "divergence_tokens": top},
            extra={"plot": (state.kl, state.kl_by_position, state.n_by_position), "protocol": state.protocol},
        )

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        chosen = {m: r for m, r in results.items() if m in self.models}
        tables = {
            "divergence": pd.DataFrame([r.tables["divergence"] for r in chosen.values()], columns=SUMMARY_COLUMNS),
            "divergence_tokens": pd.concat([r.tables["divergence_tokens"] for r in chosen.values()], ignore_index=True)[
                TOP_TOKEN_COLUMNS
            ],
        }
        figure = plot_divergence({m: r.extra["plot"] for m, r in chosen.items()}, self.baseline)
        sized = tables["divergence"][np.isfinite(tables["divergence"]["bits_per_weight"].astype(float))]
        record = {
            "divergence": {
                "baseline": self.baseline,
                "models": list(chosen),
                "definitions": DEFINITIONS,
                "overlap_k": self.options.overlap_k,
                "kl_top_k": self.options.kl_top_k,
                "baseline_cache": _cache_record(self.options),
                "protocol": {m: r.extra["protocol"] for m, r in chosen.items()},
            }
        }
        files = {
            "divergence.csv": tables["divergence"],
            "divergence_tokens.csv": tables["divergence_tokens"],
            "divergence.png": figure,
        }
        if len(sized):  # variants whose weight files are local: their size against their divergence
            files["divergence_bpw.png"] = plot_divergence_bpw(sized, self.baseline)
        return Outputs(files=files, tables=tables, record=record)


def _cache_record(options) -> dict:
    """How the baseline met the models: beside each (exact), or kept as its top-K (bounds)."""
    if options.baseline_cache != "topk":
        return {"mode": "none", "exact": "every statistic from both models' full logits, chunk by chunk"}
    return {
        "mode": "topk",
        "k": options.kl_top_k,
        "kept": "per token, the baseline's k likeliest ids, their log-probabilities, the log of the rest's mass "
        "and its nll, in its parts; each model then scored alone against them",
        "bound": TOPK_BOUND,
    }


def _size(protocol: dict | None) -> dict:
    """The model's weight bytes, parameters and bits per weight, and how it was quantized and
    loaded, from its protocol record (`lmeval.model.quantization.size_record`; NaN where the
    size is unknown, empty strings for a float model)."""
    protocol = protocol or {}
    size, n = protocol.get("weight_bytes"), protocol.get("n_parameters")
    quantization = protocol.get("quantization") or {}
    return {
        "weight_bytes": float("nan") if size is None else size,
        "n_parameters": float("nan") if n is None else n,
        "bits_per_weight": 8.0 * size / n if size and n else float("nan"),
        "quant_method": quantization.get("quant_method", ""),
        "load_path": quantization.get("load_path", ""),
    }


class _Collected:
    """One pair's merge state, none of it growing with the tokens: per-document sums, sketches
    of every token's kl and delta_p (for the percentiles, `QuantileSketch`), KL summed by
    position (for the plot) and the ``top_k`` tokens of largest KL so far."""

    def __init__(self, top_k: int):
        self.top_k, self.top = top_k, None
        self.sums: list[np.ndarray] = []  # per-document SUMS rows, a part at a time
        self.kl, self.delta_p = QuantileSketch(), QuantileSketch()
        self.kl_by_position, self.n_by_position = np.zeros(0), np.zeros(0)
        self.protocol = None
        self.tail_sum, self.tail_n = 0.0, 0  # baseline_tail_mass, under compare.baseline_cache: topk

    def add(self, part: Part, baseline: str) -> None:
        columns, self.protocol = part.columns, part.meta["protocol"]
        self.sums.append(document_sums(columns["doc_index"], columns, len(part.doc_ids)))
        self.kl.add(columns["kl"])
        self.delta_p.add(columns["delta_p"])
        if "baseline_tail_mass" in columns:
            self.tail_sum += float(columns["baseline_tail_mass"].astype(np.float64).sum())
            self.tail_n += len(columns["baseline_tail_mass"])
        self._keep_top(top_candidates(columns, part.doc_ids, self.top_k, part.model, baseline))
        position = columns["position"]
        n = int(position.max()) + 1 if len(position) else 0
        self._add_positions(
            np.bincount(position, weights=columns["kl"].astype(np.float64), minlength=n),
            np.bincount(position, minlength=n),
        )

    def merge(self, later: _Collected) -> _Collected:
        """This state followed by ``later``'s (the parts after this state's)."""
        self.sums += later.sums
        self.kl.merge(later.kl)
        self.delta_p.merge(later.delta_p)
        self.tail_sum, self.tail_n = self.tail_sum + later.tail_sum, self.tail_n + later.tail_n
        self._keep_top(later.top)
        self._add_positions(later.kl_by_position, later.n_by_position)
        self.protocol = later.protocol or self.protocol
        return self

    def _keep_top(self, candidates: pd.DataFrame | None) -> None:
        """The ``top_k`` largest KL of the tokens so far; ties keep corpus order (a stable sort)."""
        if candidates is None:
            return
        frames = [candidates] if self.top is None else [self.top, candidates]
        merged = pd.concat(frames, ignore_index=True).sort_values("kl", ascending=False, kind="stable")
        self.top = merged.head(self.top_k).reset_index(drop=True)

    def _add_positions(self, kl_sum: np.ndarray, n: np.ndarray) -> None:
        size = max(len(self.n_by_position), len(n))
        self.kl_by_position = np.pad(self.kl_by_position, (0, size - len(self.kl_by_position))) + np.pad(
            kl_sum, (0, size - len(kl_sum))
        )
        self.n_by_position = np.pad(self.n_by_position, (0, size - len(self.n_by_position))) + np.pad(
            n, (0, size - len(n))
        )


def top_candidates(columns: dict, doc_ids: list, top_k: int, model: str, baseline: str) -> pd.DataFrame:
    """A part's ``top_k`` tokens of largest KL (first in document-then-position order among
    ties), without their text yet: a part's candidates are few, the text is fetched once at the end."""
    frame = pair_frame(model, baseline, doc_ids, columns)
    top = frame.loc[frame["kl"].nlargest(top_k, keep="first").index] if top_k else frame.iloc[:0]
    return top.reset_index(drop=True)


def with_text(top: pd.DataFrame, text_of) -> pd.DataFrame:
    """``top`` with each token's text and up to `CONTEXT_CHARS` characters before it."""
    texts = [text_of(str(d)) for d in top["doc_id"]]
    starts, ends = top["char_start"].to_numpy(), top["char_end"].to_numpy()
    return top.assign(
        token_text=[t[s:e] for t, s, e in zip(texts, starts, ends)],
        context=[t[max(0, s - CONTEXT_CHARS) : s] for t, s in zip(texts, starts)],
    )[TOP_TOKEN_COLUMNS].reset_index(drop=True)
