"""Calibration of per-token predictions: can the model's confidence be trusted? Pure math.

Cross-entropy says how much probability a model puts on the observed token; it does not say
whether a stated confidence means what it says. A model is *calibrated* when, among the tokens
it predicts with top-1 probability about 0.8, the top-1 guess is right about 80% of the time.
This module turns the per-token arrays the scorer produces (``nll``, ``max_prob``, ``is_top1``,
``sum_q2``, ``mean_neg_logq``, ``entropy`` and, per temperature T, ``nll_t`` / ``max_prob_t``
computed from logits / T) into:

* reliability bins, ECE and MCE (probabilities, in [0, 1]);
* the multiclass Brier score over the full vocabulary (unitless, in [0, 2]);
* label-smoothed cross-entropy ``ce_eps`` = H(P_eps, Q), the entropy H(P_eps) of the smoothed
  target and their difference KL(P_eps || Q) >= 0 (all in nats). ``ce_eps`` is a cross-entropy
  against a smoothed target, not a likelihood: never exponentiate it into a "perplexity";
* mean NLL and ECE over a grid of temperatures, and the temperature with the lowest NLL.

Everything streams: per-batch functions return float64 sums and integer counts, `merge_*`
adds them, and means are divided once at the end (`summarize`), as torchmetrics does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# float32 softmax can round a top probability a hair above 1; beyond this it is a bug.
_PROB_SLACK = 1e-6
# float32 inputs carry ~6e-8 relative error, so a mean CE can sit that far below its exact value.
_KL_REL_TOL = 1e-6


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _eps_error(path: str, eps) -> str | None:
    if not _is_number(eps):
        return f"{path}: eps must be a number (got {eps!r}). Write it unquoted, e.g. 0.1."
    if not 0.0 <= eps < 1.0:
        return f"{path}: eps must be in [0, 1) (got {eps!r}). Use a value such as 0.1."
    return None


def _temperature_error(path: str, t) -> str | None:
    if not _is_number(t) or not 0.0 < t < math.inf:
        return f"{path}: temperature must be a finite number > 0 (got {t!r}). Use a value such as 1.0."
    return None


def _count_error(path: str, value, name: str = "bins", fix: str = "Use the default 15.") -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        return f"{path}: {name} must be an integer >= 1 (got {value!r}). {fix}"
    return None


def _list_errors(path: str, values, item_error) -> list[str]:
    """Errors for each item of a list, plus one per repeated value (0 and 0.0 are the same)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        return [f"{path}: value must be a list (got {values!r}). Write a YAML list, e.g. [1.0]."]
    errors: list[str] = []
    seen: dict[object, int] = {}  # value -> its first index
    for i, value in enumerate(values):
        value = value.item() if isinstance(value, np.generic) else value
        message = item_error(f"{path}[{i}]", value)
        if message is None and value in seen:
            message = (
                f"{path}[{i}]: values must be unique (got {value!r}, already at [{seen[value]}]). Remove the duplicate."
            )
        if message is None:
            seen[value] = i
        else:
            errors.append(message)
    return errors


def _raise_first(errors: Sequence[str | None]) -> None:
    """Raise the first real message, for functions that fail fast instead of listing all."""
    for message in errors:
        if message:
            raise ValueError(message)


def validate_calibration_options(bins, label_smoothing, temperatures, where="calibration") -> list[str]:
    """Every problem with a ``calibration:`` config block, as messages naming the key path.

    Returns an empty list when the block is usable: ``bins`` an integer >= 1, each
    ``label_smoothing`` eps a number in [0, 1) (eps = 1 makes the target uniform whatever the
    token, so the score no longer depends on the data), each temperature a finite number > 0,
    and no value listed twice in either list.
    """
    errors = [e for e in [_count_error(f"{where}.bins", bins)] if e]
    errors += _list_errors(f"{where}.label_smoothing", label_smoothing, _eps_error)
    errors += _list_errors(f"{where}.temperatures", temperatures, _temperature_error)
    return errors


def _as_1d(where: str, name: str, x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(
            f"{where}: {name} must be a 1-D array, one value per token "
            f"(got shape {arr.shape}). Flatten the batch first."
        )
    return arr


def _as_probability(where: str, name: str, x) -> np.ndarray:
    """1-D float64 values in [0, 1] (bools allowed); NaN and out-of-range values are refused."""
    arr = _as_1d(where, name, x)
    bad = ~((arr >= 0.0) & (arr <= 1.0 + _PROB_SLACK))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: {name} must be in [0, 1] (got {float(arr[i])!r} at token {i}). "
            "Pass probabilities (softmax outputs) or booleans, not logits."
        )
    return np.minimum(arr, 1.0)


def _same_length(where: str, **arrays: np.ndarray) -> int:
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"{where}: per-token arrays must be the same length (got {lengths}). "
            "Pass arrays from the same batch of tokens."
        )
    return next(iter(lengths.values()))


def _ratio(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    return total / np.where(count > 0, count, np.nan)


@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """Per-bin token counts and sums of confidence and correctness (one row per bin).

    Bin i covers [lo[i], hi[i]); the last bin also includes hi. Keeping sums rather than
    means lets batches be added (`merge_bins`) and divided once at the end.
    """

    lo: np.ndarray
    hi: np.ndarray
    n_tokens: np.ndarray  # int64
    confidence_sum: np.ndarray  # float64
    correct_sum: np.ndarray  # float64

    @property
    def confidence_mean(self) -> np.ndarray:
        """Mean top-1 probability per bin; NaN for empty bins."""
        return _ratio(self.confidence_sum, self.n_tokens)

    @property
    def accuracy(self) -> np.ndarray:
        """Fraction of tokens whose top-1 guess was right, per bin; NaN for empty bins."""
        return _ratio(self.correct_sum, self.n_tokens)

    @property
    def n_total(self) -> int:
        """Tokens over all bins."""
        return int(self.n_tokens.sum())

    def to_frame(self):
        """A DataFrame with columns bin, lo, hi, n_tokens, confidence_mean, accuracy."""
        import pandas as pd

        return pd.DataFrame(
            {
                "bin": np.arange(len(self.lo)),
                "lo": self.lo,
                "hi": self.hi,
                "n_tokens": self.n_tokens,
                "confidence_mean": self.confidence_mean,
                "accuracy": self.accuracy,
            }
        )


def _mass_edges(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges giving each bin the same number of tokens (to within one), ties kept together.

    Bin k starts at the value of rank floor(k * N / n_bins) in sorted order. A value tied
    across a boundary goes whole to the upper bin, and bins whose start values coincide
    (many ties, or N < n_bins) merge, so fewer than n_bins bins may come back. The first
    edge is the smallest confidence and the last the largest; empty input gives one empty
    bin [0, 1].
    """
    if confidence.size == 0:
        return np.array([0.0, 1.0])
    ordered = np.sort(confidence)
    starts = np.unique(np.arange(n_bins) * confidence.size // n_bins)
    return np.append(np.unique(ordered[starts]), ordered[-1])


def _bin_index(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each confidence's bin: [edges[i], edges[i+1]), the last bin closed."""
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, len(edges) - 2)


def _bin_by_edges(confidence: np.ndarray, correct: np.ndarray, edges: np.ndarray) -> ReliabilityBins:
    k = len(edges) - 1
    index = _bin_index(confidence, edges)
    return ReliabilityBins(
        lo=edges[:-1].copy(),
        hi=edges[1:].copy(),
        n_tokens=np.bincount(index, minlength=k).astype(np.int64),
        confidence_sum=np.bincount(index, weights=confidence, minlength=k),
        correct_sum=np.bincount(index, weights=correct, minlength=k),
    )


def reliability_bins(confidence, correct, n_bins=15, scheme="width") -> ReliabilityBins:
    """Group tokens by confidence to compare, per group, stated confidence with accuracy.

    ``confidence`` is the top-1 probability and ``correct`` whether the top-1 guess was the
    observed token. ``scheme="width"``: n_bins equal-width bins on [0, 1] (confidence 1.0 goes
    in the last bin); these can be merged across batches. ``scheme="mass"``: bins holding
    equal numbers of tokens, from the sorted confidences (see `_mass_edges` for ties); these
    depend on the data, so they cannot be merged across batches.
    """
    where = "reliability_bins"
    _raise_first([_count_error(where, n_bins, "n_bins")])
    conf = _as_probability(where, "confidence", confidence)
    corr = _as_probability(where, "correct", correct)
    _same_length(where, confidence=conf, correct=corr)
    if scheme == "width":
        edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    elif scheme == "mass":
        edges = _mass_edges(conf, int(n_bins))
    else:
        raise ValueError(f"{where}: scheme must be 'width' or 'mass' (got {scheme!r}). Use 'width' for streaming.")
    return _bin_by_edges(conf, corr, edges)


def merge_bins(a: ReliabilityBins, b: ReliabilityBins) -> ReliabilityBins:
    """Bins of two batches combined: counts and sums add. Edges must be identical."""
    if not (np.array_equal(a.lo, b.lo) and np.array_equal(a.hi, b.hi)):
        raise ValueError(
            f"merge_bins: bin edges must be identical (got {len(a.lo)} bins from "
            f"{a.lo[:1]} and {len(b.lo)} bins from {b.lo[:1]}). Use scheme='width' "
            "with the same n_bins for every batch; equal-mass bins cannot merge."
        )
    return ReliabilityBins(
        a.lo, a.hi, a.n_tokens + b.n_tokens, a.confidence_sum + b.confidence_sum, a.correct_sum + b.correct_sum
    )


def expected_calibration_error(bins: ReliabilityBins) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b|: the token-weighted mean calibration gap.

    A probability in [0, 1]; 0 means stated confidence matches accuracy in every bin.
    Equals sum_b |correct_sum_b - confidence_sum_b| / N. NaN when there are no tokens.
    """
    n = bins.n_total
    return float(np.abs(bins.correct_sum - bins.confidence_sum).sum() / n) if n else math.nan


def max_calibration_error(bins: ReliabilityBins) -> float:
    """MCE = max over non-empty bins of |acc_b - conf_b|: the worst gap. NaN if all are empty."""
    nonempty = bins.n_tokens > 0
    if not nonempty.any():
        return math.nan
    return float(np.abs(bins.accuracy - bins.confidence_mean)[nonempty].max())


def brier_terms(nll, sum_q2) -> np.ndarray:
    """Per-token multiclass Brier score sum_v (q_v - onehot_v)^2 = 1 - 2 q_y + sum_v q_v^2.

    A proper score that, unlike NLL, is bounded (in [0, 2]) so a few confidently wrong tokens
    cannot dominate it. Over the full vocabulary; q_y = exp(-nll). float64.
    """
    where = "brier_terms"
    nll, sum_q2 = _as_1d(where, "nll", nll), _as_1d(where, "sum_q2", sum_q2)
    _same_length(where, nll=nll, sum_q2=sum_q2)
    return 1.0 - 2.0 * np.exp(-nll) + sum_q2


def smoothed_target_entropy(eps: float, vocab_size: int) -> float:
    """H(P_eps) in nats, for torch's label-smoothed target P_eps = (1 - eps) onehot + eps / V.

    The floor under the label-smoothed CE: ce_eps = H(P_eps) + KL(P_eps || Q), so subtracting
    it leaves the part a model can reduce. P_eps puts a = 1 - eps + eps/V on the label and
    b = eps/V elsewhere; H = -a log a - (V - 1) b log b, with log a computed by log1p.
    """
    where = "smoothed_target_entropy"
    _raise_first(
        [_eps_error(where, eps), _count_error(where, vocab_size, "vocab_size", "Pass the width of the model's logits.")]
    )
    if eps == 0:
        return 0.0
    off = eps * (vocab_size - 1) / vocab_size  # mass off the label, 1 - a
    return -(1.0 - off) * math.log1p(-off) - off * (math.log(eps) - math.log(vocab_size))


def label_smoothed_ce(nll, mean_neg_logq, eps) -> np.ndarray:
    """Per-token CE against P_eps, in nats: (1 - eps) nll + eps mean_v(-log q_v).

    Equals ``F.cross_entropy(logits, y, label_smoothing=eps, reduction="none")``. It rewards
    keeping some mass on every token; it is not a likelihood, so it has no perplexity.
    """
    where = "label_smoothed_ce"
    _raise_first([_eps_error(where, eps)])
    nll, mnl = _as_1d(where, "nll", nll), _as_1d(where, "mean_neg_logq", mean_neg_logq)
    _same_length(where, nll=nll, mean_neg_logq=mnl)
    return (1.0 - eps) * nll + eps * mnl


def eps_label(eps) -> str:
    """How eps is written in column names: ``repr`` of it as a float, one spelling per value.

    So 0, 0.0 and np.int64(0) all give "0.0"; 0.1 -> "0.1", 0.05 -> "0.05", 1e-05 -> "1e-05".
    numpy scalars are converted to Python floats first (np.float32(0.1) becomes
    "0.10000000149011612", its exact value).
    """
    if not _is_number(eps):
        raise ValueError(f"eps_label: eps must be a number (got {eps!r}). Pass an int or float.")
    return repr(float(eps))


@dataclass(frozen=True, eq=False)
class CalibrationSums:
    """Everything `summarize` needs, as float64 sums over ``n_tokens`` tokens; add with `merge_sums`."""

    n_tokens: int
    nll_sum: float
    brier_sum: float
    entropy_sum: float
    max_prob_sum: float
    top1_sum: float
    ce_eps_sums: dict  # eps as the user gave it -> sum of label_smoothed_ce
    nll_t_sums: np.ndarray  # (K,) sum of NLL at each temperature
    bins: ReliabilityBins  # equal width, from max_prob
    bins_t: list  # one equal-width ReliabilityBins per temperature, from max_prob_t
    temperatures: tuple = field(default=())  # (K,) floats, the grid nll_t_sums refers to


_SCALAR_SUMS = ("nll_sum", "brier_sum", "entropy_sum", "max_prob_sum", "top1_sum")


def _temperature_columns(where, temperatures, n, **arrays) -> tuple[tuple, dict]:
    _raise_first(_list_errors(f"{where}.temperatures", list(temperatures), _temperature_error))
    temps = tuple(float(t) for t in temperatures)
    columns = {}
    for name, x in arrays.items():
        arr = np.zeros((n, 0)) if x is None and not temps else np.asarray(x, dtype=np.float64)
        if arr.shape != (n, len(temps)):
            raise ValueError(
                f"{where}: {name} must be of shape (n_tokens, n_temperatures) = "
                f"{(n, len(temps))} (got {None if x is None else arr.shape}). "
                "Pass one column per grid temperature, in grid order."
            )
        columns[name] = arr
    return temps, columns


def calibration_sums(
    nll,
    max_prob,
    is_top1,
    sum_q2,
    mean_neg_logq,
    entropy,
    *,
    eps_grid,
    nll_t=None,
    max_prob_t=None,
    temperatures=(),
    n_bins=15,
) -> CalibrationSums:
    """Sums of every calibration quantity over one batch of tokens (see `CalibrationSums`)."""
    where = "calibration_sums"
    nll = _as_1d(where, "nll", nll)
    conf = _as_probability(where, "max_prob", max_prob)
    top1 = _as_probability(where, "is_top1", is_top1)
    mnl, ent = _as_1d(where, "mean_neg_logq", mean_neg_logq), _as_1d(where, "entropy", entropy)
    brier = brier_terms(nll, sum_q2)
    n = _same_length(where, nll=nll, max_prob=conf, is_top1=top1, sum_q2=brier, mean_neg_logq=mnl, entropy=ent)
    _raise_first(_list_errors(f"{where}.eps_grid", list(eps_grid), _eps_error))
    temps, cols = _temperature_columns(where, temperatures, n, nll_t=nll_t, max_prob_t=max_prob_t)
    return CalibrationSums(
        n_tokens=n,
        nll_sum=float(nll.sum()),
        brier_sum=float(brier.sum()),
        entropy_sum=float(ent.sum()),
        max_prob_sum=float(conf.sum()),
        top1_sum=float(top1.sum()),
        ce_eps_sums={e: float(label_smoothed_ce(nll, mnl, e).sum()) for e in eps_grid},
        nll_t_sums=cols["nll_t"].sum(axis=0),
        bins=reliability_bins(conf, top1, n_bins),
        bins_t=[reliability_bins(cols["max_prob_t"][:, k], top1, n_bins) for k in range(len(temps))],
        temperatures=temps,
    )


def merge_sums(a: CalibrationSums, b: CalibrationSums) -> CalibrationSums:
    """Sums of two batches combined; both must use the same eps grid, temperatures and bins."""
    labels_a, labels_b = [eps_label(e) for e in a.ce_eps_sums], [eps_label(e) for e in b.ce_eps_sums]
    if labels_a != labels_b or a.temperatures != b.temperatures:
        raise ValueError(
            f"merge_sums: eps grids and temperatures must match (got {labels_a}, "
            f"{list(a.temperatures)} and {labels_b}, {list(b.temperatures)}). "
            "Compute every batch with the same calibration options."
        )
    return CalibrationSums(
        n_tokens=a.n_tokens + b.n_tokens,
        **{name: getattr(a, name) + getattr(b, name) for name in _SCALAR_SUMS},
        ce_eps_sums={ea: a.ce_eps_sums[ea] + b.ce_eps_sums[eb] for ea, eb in zip(a.ce_eps_sums, b.ce_eps_sums)},
        nll_t_sums=a.nll_t_sums + b.nll_t_sums,
        bins=merge_bins(a.bins, b.bins),
        bins_t=[merge_bins(x, y) for x, y in zip(a.bins_t, b.bins_t)],
        temperatures=a.temperatures,
    )


def _kl(ce: float, h: float, label: str, vocab_size: int) -> float:
    """KL(P_eps || Q) = ce - h >= 0; rounding-sized negatives become 0, larger ones are bugs."""
    kl = ce - h
    if kl < -(1e-9 + _KL_REL_TOL * abs(ce)):
        raise ValueError(
            f"summarize: kl_eps{label} must be >= 0 (got {kl!r} = ce {ce!r} - h {h!r}). "
            f"Check vocab_size ({vocab_size}) is the logits' width and mean_neg_logq "
            "averages over all of it."
        )
    return max(kl, 0.0)


def summarize(sums: CalibrationSums, *, vocab_size: int) -> dict:
    """Means and calibration errors from accumulated sums, all floats (NaN with no tokens).

    Keys: ece, mce, brier, top1_accuracy, confidence_mean, entropy_mean; per eps
    ce_eps<label>, h_eps<label>, kl_eps<label> (nats, label from `eps_label`); and
    best_temperature, the grid temperature with the lowest mean NLL (NaN without a grid).
    """
    n = sums.n_tokens
    mean = (lambda total: total / n) if n else (lambda total: math.nan)
    out = {
        "ece": expected_calibration_error(sums.bins),
        "mce": max_calibration_error(sums.bins),
        "brier": mean(sums.brier_sum),
        "top1_accuracy": mean(sums.top1_sum),
        "confidence_mean": mean(sums.max_prob_sum),
        "entropy_mean": mean(sums.entropy_sum),
    }
    for eps, ce_sum in sums.ce_eps_sums.items():
        label, ce = eps_label(eps), mean(ce_sum)
        h = smoothed_target_entropy(eps, vocab_size)
        out[f"ce_eps{label}"], out[f"h_eps{label}"] = ce, h
        out[f"kl_eps{label}"] = _kl(ce, h, label, vocab_size) if n else math.nan
    best = sums.temperatures[int(np.argmin(sums.nll_t_sums))] if n and sums.temperatures else math.nan
    out["best_temperature"] = float(best)
    return out


def temperature_table(sums: CalibrationSums, temperatures):
    """Mean NLL (nats) and ECE at each temperature: columns temperature, nll_mean, ece."""
    import pandas as pd

    temps = tuple(float(t) for t in temperatures)
    if temps != sums.temperatures:
        raise ValueError(
            f"temperature_table: temperatures must be the grid the sums were computed "
            f"on (got {list(temps)}, sums have {list(sums.temperatures)}). Pass the same list."
        )
    n = sums.n_tokens
    nll_mean = sums.nll_t_sums / n if n else np.full(len(temps), np.nan)
    return pd.DataFrame(
        {"temperature": list(temps), "nll_mean": nll_mean, "ece": [expected_calibration_error(b) for b in sums.bins_t]}
    )


# --------------------------------------------------------------------------------------
# Document bootstrap of the calibration figures
# --------------------------------------------------------------------------------------

INTERVAL_FIGURES = ("ece", "mce", "brier", "top1_accuracy")


def width_edges(n_bins: int) -> np.ndarray:
    """The edges of ``n_bins`` equal-width bins on [0, 1] (`reliability_bins`' ``width``)."""
    return np.linspace(0.0, 1.0, int(n_bins) + 1)


def document_rows(doc_index, n_docs: int, max_prob, is_top1, brier, edges: np.ndarray) -> np.ndarray:
    """Per document, the sums behind ECE, MCE, Brier and accuracy: ``(n_docs, 2 + 3K)`` float64,
    columns ``brier_sum, top1_sum``, then `binned_rows`. A resample of documents adds rows and
    recomputes each figure from the sums (`resampled_figures`), as `summarize` does."""
    doc = np.asarray(doc_index, dtype=np.int64)
    per_doc = [np.bincount(doc, weights=np.asarray(w, dtype=np.float64), minlength=n_docs) for w in (brier, is_top1)]
    return np.column_stack([*per_doc, binned_rows(doc, n_docs, max_prob, is_top1, edges)])


def binned_rows(doc_index, n_docs: int, max_prob, is_top1, edges: np.ndarray) -> np.ndarray:
    """``(n_docs, 3K)`` float64: for each of the K bins of ``edges``, each document's token
    count, then its confidence sums, then its correct counts."""
    doc = np.asarray(doc_index, dtype=np.int64)
    conf = np.asarray(max_prob, dtype=np.float64)
    k = len(edges) - 1
    cell = doc * k + _bin_index(conf, edges)  # (N,) one (document, bin) cell per token
    weights = (None, conf, np.asarray(is_top1, dtype=np.float64))
    return np.column_stack([np.bincount(cell, weights=w, minlength=n_docs * k).reshape(n_docs, k) for w in weights])


def resampled_figures(sums: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """ECE, MCE, Brier and top-1 accuracy of each row of ``sums``, shape ``(B, 2 + 3K)``: the
    column sums of `document_rows` over one resample each. NaN where a resample has no token."""
    brier, top1 = sums[:, 0], sums[:, 1]
    count, conf, correct = (sums[:, 2 + i * n_bins : 2 + (i + 1) * n_bins] for i in range(3))  # (B, K) each
    n = count.sum(axis=1)
    safe = np.where(n > 0, n, np.nan)
    gap = np.abs(correct - conf)  # (B, K): |correct_sum - confidence_sum| per bin
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_gap = np.where(count > 0, gap / np.where(count > 0, count, 1.0), -np.inf)
    mce = bin_gap.max(axis=1, initial=-np.inf)
    return {
        "ece": gap.sum(axis=1) / safe,
        "mce": np.where(np.isfinite(mce), mce, np.nan),
        "brier": brier / safe,
        "top1_accuracy": top1 / safe,
    }
