"""Mergeable percentiles with a stated error bound, in memory that does not grow with the corpus.

Why: a percentile of every token's KL or delta p needs every value, and a corpus of 50M tokens
would hold 400 MB of them. `QuantileSketch` keeps the values themselves while they are few
(``exact_limit``, 2**21 by default: 8 MB of float32), so small and medium corpora get numpy's
exact linear-interpolation percentile; past that it keeps counts in logarithmic buckets:
DDSketch's mapping (Masson, Rim & Lee, VLDB 2019), with bucket k holding the magnitudes in
(gamma**(k-1), gamma**k], gamma = (1 + alpha) / (1 - alpha).

**Error bound** (bucket mode): each reported percentile is within relative accuracy ``alpha``
(0.5% by default) of the exact one, ``|reported - exact| <= alpha * |exact|``, when the two order
statistics it interpolates between have one sign; across a sign change the error is at most
``alpha`` times the larger of their magnitudes. Magnitudes below ``MIN_MAGNITUDE`` count as 0.
The minimum and maximum are always exact, and every percentile is clipped to them. Two
sketches merge by adding counts, so the merge is exact: merging is the same as adding every
value to one sketch.

The library `ddsketch` (DataDog) implements the same mapping, but adds one value per Python
call; a part holds ~10^5 tokens, so this module maps a whole array at once with numpy.
"""

from __future__ import annotations

import numpy as np

MIN_MAGNITUDE = 1e-30  # float32 KL rounding noise sits far above this; below it a value is 0


class QuantileSketch:
    """Percentiles of a stream of float values, exact up to ``exact_limit`` values, then
    within relative accuracy ``alpha`` (see the module docstring)."""

    def __init__(self, alpha: float = 0.005, exact_limit: int = 1 << 21):
        self.alpha, self.exact_limit = alpha, exact_limit
        self.gamma_log = np.log((1 + alpha) / (1 - alpha))
        self.count, self.min, self.max = 0, np.inf, -np.inf
        self.min_positive = np.inf  # the plot's log axis starts here
        self.values: list[np.ndarray] | None = []  # exact mode; None once bucketed
        self.buckets = {sign: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for sign in (1, -1)}  # (keys, counts)
        self.zeros = 0

    @property
    def exact(self) -> bool:
        return self.values is not None

    def add(self, values) -> QuantileSketch:
        raw = np.asarray(values).ravel()  # kept as given (float32 columns stay 4 bytes a value)
        values = raw.astype(np.float64, copy=False)
        if not len(values):
            return self
        self.count += len(values)
        self.min, self.max = min(self.min, values.min()), max(self.max, values.max())
        positive = values[values > 0]
        if len(positive):
            self.min_positive = min(self.min_positive, positive.min())
        if self.values is not None:  # exact mode
            self.values.append(raw.copy())
            if self.count > self.exact_limit:
                self._to_buckets()
        else:
            self._bucket(values)
        return self

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """This sketch with ``other``'s values added (same alpha and limit), in place."""
        if other.count == 0:
            return self
        if other.values is not None:  # exact mode
            return self.add(np.concatenate(other.values))
        if self.exact:
            self._to_buckets()
        self.count += other.count
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.min_positive = min(self.min_positive, other.min_positive)
        self.zeros += other.zeros
        for sign in (1, -1):
            self._add_counts(sign, *other.buckets[sign])
        return self

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) with numpy's linear interpolation; NaN when empty."""
        if self.count == 0:
            return float("nan")
        if self.values is not None:  # exact mode
            return float(np.percentile(np.concatenate(self.values).astype(np.float64), q))
        rank = q / 100 * (self.count - 1)
        lower, upper = int(np.floor(rank)), int(np.ceil(rank))
        values, cumulative = self._ordered()
        low, high = (values[np.searchsorted(cumulative, r, side="right")] for r in (lower, upper))
        value = low + (rank - lower) * (high - low)
        return float(np.clip(value, self.min, self.max))

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Counts of the values in the bins ``edges`` (as `numpy.histogram`); in bucket mode
        each bucket counts at its representative value, so a count may move one bin at an edge."""
        if self.values is not None:  # exact mode
            values = np.concatenate(self.values) if self.values else np.zeros(0)
            return np.histogram(values, bins=edges)[0]
        values, cumulative = self._ordered()
        # the end buckets' representatives stay within the values' range (and positives above 0)
        values = np.where(values > 0, np.clip(values, self.min_positive, self.max), np.clip(values, self.min, self.max))
        return np.histogram(values, bins=edges, weights=np.diff(cumulative, prepend=0))[0].astype(np.int64)

    def count_at_most(self, threshold: float) -> int:
        """How many values are <= ``threshold`` (exact in both modes for threshold 0)."""
        if self.values is not None:  # exact mode
            return int(sum((v <= threshold).sum() for v in self.values))
        values, cumulative = self._ordered()
        index = np.searchsorted(values, threshold, side="right")
        return int(cumulative[index - 1]) if index else 0

    # ---- bucket mode ---------------------------------------------------------------------------

    def _to_buckets(self) -> None:
        values, self.values = self.values or [], None
        for chunk in values:
            self._bucket(chunk)

    def _bucket(self, values: np.ndarray) -> None:
        magnitude = np.abs(values)
        small = magnitude < MIN_MAGNITUDE
        self.zeros += int(small.sum())
        for sign in (1, -1):
            chosen = magnitude[(values > 0 if sign > 0 else values < 0) & ~small]
            keys = np.ceil(np.log(chosen) / self.gamma_log).astype(np.int64)
            self._add_counts(sign, *np.unique(keys, return_counts=True))

    def _add_counts(self, sign: int, keys: np.ndarray, counts: np.ndarray) -> None:
        old_keys, old_counts = self.buckets[sign]
        merged, inverse = np.unique(np.concatenate([old_keys, keys]), return_inverse=True)
        self.buckets[sign] = merged, np.bincount(inverse, weights=np.concatenate([old_counts, counts])).astype(np.int64)

    def _representative(self, keys: np.ndarray) -> np.ndarray:
        """The value within relative ``alpha`` of every magnitude of bucket k: 2 g^k / (g + 1)."""
        gamma = np.exp(self.gamma_log)
        return 2 * np.exp(keys * self.gamma_log) / (gamma + 1)

    def _ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Bucket values in ascending order and the running count up to each."""
        neg_keys, neg_counts = self.buckets[-1]
        pos_keys, pos_counts = self.buckets[1]
        values = np.concatenate([-self._representative(neg_keys[::-1]), [0.0], self._representative(pos_keys)])
        counts = np.concatenate([neg_counts[::-1], [self.zeros], pos_counts])
        return values, np.cumsum(counts)
