"""`QuantileSketch`: exact percentiles while few values, then within the documented relative
accuracy of numpy's exact percentile (the oracle), and a merge that is exact."""

from __future__ import annotations

import numpy as np
import pytest

from lmeval.core.sketch import QuantileSketch

QS = (0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


def kl_like(n: int, seed: int = 0) -> np.ndarray:
    """Non-negative, heavy-tailed over many decades, with exact zeros: as per-token KL is."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(-9, 3, n)
    values[rng.random(n) < 0.05] = 0.0
    return values.astype(np.float32)


def delta_p_like(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)


@pytest.mark.parametrize("make", [kl_like, delta_p_like])
def test_exact_mode_is_numpys_percentile(make):
    values = make(20_000)
    sketch = QuantileSketch()
    for chunk in np.array_split(values, 7):
        sketch.add(chunk)
    assert sketch.exact
    for q in QS:
        assert sketch.percentile(q) == np.percentile(values.astype(np.float64), q)
    assert (sketch.min, sketch.max, sketch.count) == (values.min(), values.max(), len(values))


@pytest.mark.parametrize("make", [kl_like, delta_p_like])
def test_bucket_mode_is_within_the_relative_accuracy(make):
    values = make(200_000)
    sketch = QuantileSketch(alpha=0.005, exact_limit=1000)
    for chunk in np.array_split(values, 13):
        sketch.add(chunk)
    assert not sketch.exact
    exact = np.sort(values.astype(np.float64))
    for q in QS:
        rank = q / 100 * (len(exact) - 1)
        a, b = exact[int(np.floor(rank))], exact[int(np.ceil(rank))]
        bound = 0.005 * max(abs(a), abs(b)) + 1e-300  # one sign: relative; across 0: the larger magnitude
        assert abs(sketch.percentile(q) - np.percentile(exact, q)) <= bound * (1 + 1e-9), q
    assert (sketch.min, sketch.max) == (values.min(), values.max())
    assert sketch.count_at_most(0.0) == int((values <= 0).sum())


def test_merge_is_the_same_as_adding_every_value_to_one_sketch():
    values = kl_like(50_000)
    one = QuantileSketch(exact_limit=10_000).add(values)
    left = QuantileSketch(exact_limit=10_000).add(values[:3000])  # exact, merged with bucketed
    right = QuantileSketch(exact_limit=10_000).add(values[3000:])
    merged = left.merge(right)
    assert not merged.exact and merged.count == len(values)
    assert [merged.percentile(q) for q in QS] == [one.percentile(q) for q in QS]
    edges = np.geomspace(1e-12, 1.0, 30)
    np.testing.assert_array_equal(merged.histogram(edges), one.histogram(edges))


def test_histogram_counts_every_positive_value_once():
    values = kl_like(30_000)
    edges = np.geomspace(values[values > 0].min(), values.max() * (1 + 1e-9), 50)
    exact = QuantileSketch().add(values)
    np.testing.assert_array_equal(exact.histogram(edges), np.histogram(values, edges)[0])
    bucketed = QuantileSketch(exact_limit=100).add(values)
    assert bucketed.histogram(edges).sum() == int((values > 0).sum())


def test_an_empty_sketch_has_no_percentile():
    assert np.isnan(QuantileSketch().percentile(50))
