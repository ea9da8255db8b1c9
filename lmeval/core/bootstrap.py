"""The document bootstrap: resampled sums and percentile intervals. Pure numpy.

Documents, not tokens, are the independent units of a corpus (tokens of one document share
its topic and style), so every interval lmeval reports resamples documents. A resample
recomputes a pooled figure from resampled SUMS, dividing once at the end, exactly as the
point estimate is pooled.
"""

from __future__ import annotations

import numpy as np

# Rows of the (n_resamples, n_docs) index matrix drawn at a time: bounds memory, same stream.
_CHUNK_ELEMENTS = 1 << 22
# Fewer documents than this get no interval or p-value: resampling 1 document always redraws
# it (an interval of zero width, p = 2 / (B + 1)), and with a handful the resamples take only
# a few distinct values, so the percentile interval is far too narrow and p far too small.
MIN_DOCUMENTS = 10


def resampled_sums(columns, n_resamples: int, seed: int) -> np.ndarray:
    """Column sums over bootstrap resamples of the rows (documents): shape (n_resamples, k).

    The draw is exactly ``np.random.default_rng(seed).integers(0, n_docs, size=(n_resamples,
    n_docs))``: row r lists the documents (with repetition) of resample r. It is drawn in
    blocks of rows to bound memory; numpy's generator yields the identical stream either way.
    """
    columns = np.asarray(columns, dtype=np.float64)  # (D, k)
    n_docs, k = columns.shape
    out = np.empty((n_resamples, k))
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n_docs * k, 1))
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        index = rng.integers(0, n_docs, size=(stop - start, n_docs))  # (b, D)
        out[start:stop] = columns[index].sum(axis=1)  # (b, D, k) -> (b, k)
    return out


def bootstrap_interval(deltas: np.ndarray) -> tuple[float, float, float]:
    """95% percentile interval and two-sided bootstrap p-value of resampled deltas.

    ``ci_low, ci_high`` are ``np.percentile(deltas, [2.5, 97.5])`` (linear interpolation).
    ``p = min(1, 2 * min((1 + #{delta* <= 0}) / (B + 1), (1 + #{delta* >= 0}) / (B + 1)))``:
    the smallest two-sided level at which the percentile interval excludes 0, with the +1
    correction so that p is never 0 from a finite B (its floor is 2 / (B + 1)). All deltas 0
    (a model against itself) gives p = 1. NaN everywhere when B = 0.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    if len(deltas) == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = np.percentile(deltas, [2.5, 97.5])
    b = len(deltas)
    below = (1 + np.count_nonzero(deltas <= 0)) / (b + 1)
    above = (1 + np.count_nonzero(deltas >= 0)) / (b + 1)
    return float(low), float(high), float(min(1.0, 2 * min(below, above)))
