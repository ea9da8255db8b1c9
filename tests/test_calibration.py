"""Tests for lmeval.calibration against independent oracles.

The oracles are written here from the definitions: torch's own label-smoothed cross-entropy,
an explicit P_eps vector, an explicit full softmax for the Brier score, and a plain loop over
bins for ECE/MCE. The module under test is never used as its own reference.
"""

from __future__ import annotations

import math
import re

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmeval.analyses import plots
from lmeval.core import calibration as cal
from lmeval.engine.files import write_figure

EPS_GRID = (0.0, 0.05, 0.1, 0.3)
TEMPERATURES = (0.7, 0.85, 1.0, 1.15, 1.3)


# ------------------------------------------------------------------------------ oracles


def token_stats(logits: torch.Tensor, y: torch.Tensor, temperatures=()) -> dict:
    """The per-token arrays the scorer hands over, computed here in float64 then cast to float32."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    q = logq.exp()
    stats = {
        "nll": -logq.gather(1, y[:, None])[:, 0],
        "max_prob": q.max(dim=-1).values,
        "is_top1": q.argmax(dim=-1) == y,
        "sum_q2": (q * q).sum(dim=-1),
        "mean_neg_logq": -logq.mean(dim=-1),
        "entropy": -(q * logq).sum(dim=-1),
    }
    out = {k: (v.numpy() if v.dtype == torch.bool else v.float().numpy()) for k, v in stats.items()}
    if temperatures:
        scaled = [torch.log_softmax(logits.double() / t, dim=-1) for t in temperatures]
        out["nll_t"] = torch.stack([-s.gather(1, y[:, None])[:, 0] for s in scaled], 1).float().numpy()
        out["max_prob_t"] = torch.stack([s.exp().max(-1).values for s in scaled], 1).float().numpy()
    return out


def random_logits(n: int, vocab: int, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, vocab, (n,), generator=g)
    return logits, y


def oracle_ece_mce(confidence, correct, n_bins: int) -> tuple[float, float]:
    """ECE and MCE by a plain loop; bin i is [lo, hi), the last bin [lo, 1]."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece, mce = 0.0, 0.0
    for i in range(n_bins):
        upper = conf <= edges[i + 1] if i == n_bins - 1 else conf < edges[i + 1]
        members = (conf >= edges[i]) & upper
        if members.any():
            gap = abs(corr[members].mean() - conf[members].mean())
            ece += members.sum() / len(conf) * gap
            mce = max(mce, gap)
    return ece, mce


def explicit_smoothed_target(eps: float, vocab: int, label: int = 0) -> np.ndarray:
    p = np.full(vocab, eps / vocab, dtype=np.float64)
    p[label] += 1.0 - eps
    return p


def explicit_entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def make_sums(stats: dict, eps_grid=EPS_GRID, temperatures=(), n_bins=15, rows=slice(None)):
    per_token = {k: v[rows] for k, v in stats.items()}
    nll_t, max_prob_t = per_token.pop("nll_t", None), per_token.pop("max_prob_t", None)
    if not temperatures:
        nll_t = max_prob_t = None
    return cal.calibration_sums(
        **per_token, eps_grid=eps_grid, nll_t=nll_t, max_prob_t=max_prob_t, temperatures=temperatures, n_bins=n_bins
    )


@pytest.fixture(scope="module")
def small_batch():
    logits, y = random_logits(4000, 50, seed=0)
    return logits, y, token_stats(logits, y, TEMPERATURES)


# ------------------------------------------------------------------------ label smoothing


@pytest.fixture(scope="module", params=[3, 50257], ids=lambda v: f"V{v}")
def logits_by_vocab(request):
    vocab = request.param
    logits, y = random_logits(64 if vocab > 1000 else 2000, vocab, seed=vocab)
    return logits, y, token_stats(logits, y)


@pytest.mark.parametrize("eps", EPS_GRID)
def test_label_smoothed_ce_matches_torch(logits_by_vocab, eps):
    logits, y, stats = logits_by_vocab
    expected = F.cross_entropy(logits, y, label_smoothing=eps, reduction="none").numpy()
    got = cal.label_smoothed_ce(stats["nll"], stats["mean_neg_logq"], eps)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab", [1, 2, 3, 10, 50257])
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-6, 0.05, 0.1, 0.3, 0.9, 0.999])
def test_smoothed_target_entropy_matches_explicit_vector(vocab, eps):
    expected = explicit_entropy(explicit_smoothed_target(eps, vocab))
    got = cal.smoothed_target_entropy(eps, vocab)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert got >= 0.0


@pytest.mark.parametrize("vocab", [3, 50])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_kl_is_ce_minus_entropy_and_nonnegative(vocab, eps):
    logits, y = random_logits(300, vocab, seed=vocab)
    stats = token_stats(logits, y)
    h = cal.smoothed_target_entropy(eps, vocab)
    per_token_kl = cal.label_smoothed_ce(stats["nll"], stats["mean_neg_logq"], eps) - h
    assert per_token_kl.min() >= -1e-6  # float32 inputs
    # Oracle: KL(P_eps || Q) from explicit vectors, token by token.
    logq = torch.log_softmax(logits, -1).numpy()
    p = np.stack([explicit_smoothed_target(eps, vocab, int(t)) for t in y])
    oracle_kl = (p * (np.log(p) - logq)).sum(axis=1)
    summary = cal.summarize(make_sums(stats, eps_grid=(eps,)), vocab_size=vocab)
    label = cal.eps_label(eps)
    assert summary[f"kl_eps{label}"] == pytest.approx(oracle_kl.mean(), abs=1e-5)
    assert summary[f"ce_eps{label}"] - summary[f"h_eps{label}"] == pytest.approx(oracle_kl.mean(), abs=1e-5)


def test_kl_of_a_perfect_smoothed_model_is_zero_and_a_wrong_vocab_is_refused():
    vocab, eps = 10, 0.1
    y = torch.arange(200) % vocab
    logits = torch.from_numpy(np.log(np.stack([explicit_smoothed_target(eps, vocab, int(t)) for t in y])))
    sums = make_sums(token_stats(logits, y), eps_grid=(eps,))
    assert cal.summarize(sums, vocab_size=vocab)["kl_eps0.1"] == pytest.approx(0.0, abs=1e-6)
    assert cal.summarize(sums, vocab_size=vocab)["kl_eps0.1"] >= 0.0
    with pytest.raises(ValueError, match=r"summarize: kl_eps0.1 must be >= 0 .*vocab_size \(110\)"):
        cal.summarize(sums, vocab_size=110)


# -------------------------------------------------------------------- ECE, MCE, Brier


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_mce_match_loop_oracle(n_bins):
    rng = np.random.default_rng(n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = np.concatenate([rng.uniform(0, 1, 5000) ** 0.3, edges, edges, [0.0, 1.0]])
    correct = rng.uniform(size=conf.size) < conf**1.5
    bins = cal.reliability_bins(conf, correct, n_bins=n_bins)
    ece, mce = oracle_ece_mce(conf, correct, n_bins)
    assert bins.n_total == conf.size
    assert cal.expected_calibration_error(bins) == pytest.approx(ece, abs=1e-12)
    assert cal.max_calibration_error(bins) == pytest.approx(mce, abs=1e-12)


def test_ece_mce_on_model_outputs(small_batch):
    _, _, stats = small_batch
    bins = cal.reliability_bins(stats["max_prob"], stats["is_top1"])
    ece, mce = oracle_ece_mce(stats["max_prob"], stats["is_top1"], 15)
    assert cal.expected_calibration_error(bins) == pytest.approx(ece, abs=1e-12)
    assert cal.max_calibration_error(bins) == pytest.approx(mce, abs=1e-12)


@pytest.mark.parametrize("vocab", [2, 7, 50])
def test_brier_matches_full_softmax(vocab):
    logits, y = random_logits(500, vocab, seed=vocab)
    q = torch.softmax(logits, -1).numpy()
    onehot = np.eye(vocab)[y.numpy()]
    expected = ((q - onehot) ** 2).sum(axis=1)
    stats = token_stats(logits, y)
    got = cal.brier_terms(stats["nll"], stats["sum_q2"])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    exact = cal.brier_terms(-torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0].numpy(), (q * q).sum(axis=1))
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", ["width", "mass"])
def test_perfectly_calibrated_synthetic_has_small_ece(scheme):
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.05, 1.0, 200_000)
    correct = rng.uniform(size=conf.size) < conf
    assert cal.expected_calibration_error(cal.reliability_bins(conf, correct, scheme=scheme)) < 0.01


@pytest.mark.parametrize("low", [0.05, 0.25])
def test_overconfident_synthetic_ece(low):
    rng = np.random.default_rng(2)
    conf = rng.uniform(low, 1.0, 200_000)
    correct = rng.uniform(size=conf.size) < np.clip(conf - 0.2, 0.0, 1.0)
    # Every gap has the same sign, so ECE = E[conf - clip(conf - 0.2)] = E[min(conf, 0.2)]:
    # exactly 0.2 when all confidences exceed 0.2, a little less when some do not (clipping).
    expected = np.minimum(conf, 0.2).mean()
    ece = cal.expected_calibration_error(cal.reliability_bins(conf, correct))
    assert ece == pytest.approx(expected, abs=0.01)
    if low >= 0.2:
        assert ece == pytest.approx(0.2, abs=0.01)


# --------------------------------------------------------------------------- bins


@pytest.mark.parametrize("n, n_bins", [(1000, 15), (1001, 10), (15, 15), (7, 15), (1, 3), (0, 5)])
def test_equal_mass_bins_balanced_without_ties(n, n_bins):
    conf = np.random.default_rng(n).uniform(size=n)
    bins = cal.reliability_bins(conf, conf > 0.5, n_bins=n_bins, scheme="mass")
    assert bins.n_total == n
    if n:
        assert len(bins.n_tokens) == min(n, n_bins)
        assert bins.n_tokens.max() - bins.n_tokens.min() <= 1
        assert bins.lo[0] == conf.min() and bins.hi[-1] == conf.max()


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=1, max_size=60),
    n_bins=st.integers(1, 12),
)
def test_equal_mass_bins_never_split_ties(values, n_bins):
    conf = np.array(values)
    bins = cal.reliability_bins(conf, np.ones_like(conf), n_bins=n_bins, scheme="mass")
    assert bins.n_total == conf.size and len(bins.n_tokens) <= n_bins
    assert (bins.n_tokens > 0).all()
    for v in np.unique(conf):  # every copy of a value lands in one bin
        holding = cal.reliability_bins(conf, conf == v, n_bins=n_bins, scheme="mass").correct_sum
        assert (holding > 0).sum() == 1


def test_confidence_one_goes_in_last_bin_and_frame_columns():
    bins = cal.reliability_bins(np.array([1.0, np.float32(1.0000001), 0.0]), [True, True, False], 4)
    assert bins.n_tokens.tolist() == [1, 0, 0, 2]
    frame = bins.to_frame()
    assert list(frame.columns) == ["bin", "lo", "hi", "n_tokens", "confidence_mean", "accuracy"]
    assert frame["accuracy"].isna().tolist() == [False, True, True, False]
    assert frame["hi"].iloc[-1] == 1.0


def test_merge_bins_of_halves_equals_whole(small_batch):
    _, _, stats = small_batch
    conf, top1 = stats["max_prob"], stats["is_top1"]
    whole = cal.reliability_bins(conf, top1)
    merged = cal.merge_bins(
        cal.reliability_bins(conf[:1234], top1[:1234]), cal.reliability_bins(conf[1234:], top1[1234:])
    )
    np.testing.assert_array_equal(merged.n_tokens, whole.n_tokens)
    np.testing.assert_allclose(merged.confidence_sum, whole.confidence_sum, rtol=1e-12)
    np.testing.assert_allclose(merged.correct_sum, whole.correct_sum, rtol=1e-12)
    with pytest.raises(ValueError, match="merge_bins: bin edges must be identical"):
        cal.merge_bins(whole, cal.reliability_bins(conf, top1, n_bins=10))
    with pytest.raises(ValueError, match="equal-mass bins cannot merge"):
        cal.merge_bins(
            cal.reliability_bins(conf[:9], top1[:9], scheme="mass"),
            cal.reliability_bins(conf[9:], top1[9:], scheme="mass"),
        )


def test_merge_sums_of_halves_equals_whole(small_batch):
    _, _, stats = small_batch
    whole = make_sums(stats, temperatures=TEMPERATURES)
    merged = cal.merge_sums(
        make_sums(stats, temperatures=TEMPERATURES, rows=slice(None, 1500)),
        make_sums(stats, temperatures=TEMPERATURES, rows=slice(1500, None)),
    )
    assert merged.n_tokens == whole.n_tokens
    s_whole, s_merged = cal.summarize(whole, vocab_size=50), cal.summarize(merged, vocab_size=50)
    assert s_merged.keys() == s_whole.keys()
    for key, value in s_whole.items():
        assert s_merged[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    np.testing.assert_allclose(
        cal.temperature_table(merged, TEMPERATURES).to_numpy(),
        cal.temperature_table(whole, TEMPERATURES).to_numpy(),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="merge_sums: eps grids and temperatures must match"):
        cal.merge_sums(whole, make_sums(stats, eps_grid=(0.1,), temperatures=TEMPERATURES))


# ------------------------------------------------------------------ summary, temperatures


def test_summarize_matches_direct_means(small_batch):
    logits, y, stats = small_batch
    summary = cal.summarize(make_sums(stats, eps_grid=(0, 0.05, 0.1)), vocab_size=50)
    q = torch.softmax(logits, -1).numpy()
    assert summary["brier"] == pytest.approx(((q - np.eye(50)[y.numpy()]) ** 2).sum(1).mean(), abs=1e-6)
    assert summary["top1_accuracy"] == pytest.approx((q.argmax(1) == y.numpy()).mean(), abs=1e-12)
    assert summary["confidence_mean"] == pytest.approx(q.max(1).mean(), abs=1e-6)
    assert summary["entropy_mean"] == pytest.approx(-(q * np.log(q)).sum(1).mean(), abs=1e-5)
    assert summary["ce_eps0.0"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)
    assert summary["h_eps0.0"] == 0.0 and summary["kl_eps0.0"] == summary["ce_eps0.0"]
    assert {"ce_eps0.05", "h_eps0.1", "kl_eps0.1"} <= summary.keys()
    assert math.isnan(summary["best_temperature"])
    assert all(isinstance(v, float) for v in summary.values())


def test_summarize_of_no_tokens_is_nan():
    empty = np.zeros(0)
    sums = cal.calibration_sums(empty, empty, empty, empty, empty, empty, eps_grid=[0.1])
    summary = cal.summarize(sums, vocab_size=10)
    assert math.isnan(summary["ece"]) and math.isnan(summary["brier"]) and math.isnan(summary["kl_eps0.1"])


def test_temperature_grid(small_batch):
    logits, y, stats = small_batch
    sums = make_sums(stats, temperatures=TEMPERATURES)
    table = cal.temperature_table(sums, TEMPERATURES)
    assert list(table.columns) == ["temperature", "nll_mean", "ece"]
    assert table["temperature"].tolist() == list(TEMPERATURES)
    at_one = table.set_index("temperature").loc[1.0]
    assert at_one["nll_mean"] == pytest.approx(stats["nll"].astype(np.float64).mean(), rel=1e-12)
    oracle_nll = []
    for k, t in enumerate(TEMPERATURES):
        scaled = logits / t
        oracle_nll.append(F.cross_entropy(scaled, y).item())
        conf_t = torch.softmax(scaled, -1).max(-1).values.numpy()
        top1 = (scaled.argmax(-1) == y).numpy()
        assert table["ece"][k] == pytest.approx(oracle_ece_mce(conf_t, top1, 15)[0], abs=1e-6)
        assert table["nll_mean"][k] == pytest.approx(oracle_nll[-1], abs=1e-5)
    best = cal.summarize(sums, vocab_size=50)["best_temperature"]
    assert best == TEMPERATURES[int(np.argmin(oracle_nll))]
    with pytest.raises(ValueError, match="temperature_table: temperatures must be the grid"):
        cal.temperature_table(sums, (1.0,))


# ------------------------------------------------------------------------- validation


MESSAGE_SHAPE = r"^{path}: .+ must be .+ \(got .+\)\. \S"


@pytest.mark.parametrize(
    "options, path",
    [
        ({"label_smoothing": [0.0, 1.0]}, "calibration.label_smoothing[1]"),
        ({"label_smoothing": [-0.1]}, "calibration.label_smoothing[0]"),
        ({"label_smoothing": ["0.1"]}, "calibration.label_smoothing[0]"),
        ({"label_smoothing": [0.1, 0.1]}, "calibration.label_smoothing[1]"),
        ({"label_smoothing": [0, 0.0]}, "calibration.label_smoothing[1]"),
        ({"label_smoothing": 0.1}, "calibration.label_smoothing"),
        ({"temperatures": [1.0, 0]}, "calibration.temperatures[1]"),
        ({"temperatures": [-1]}, "calibration.temperatures[0]"),
        ({"temperatures": [float("nan")]}, "calibration.temperatures[0]"),
        ({"temperatures": ["hot"]}, "calibration.temperatures[0]"),
        ({"bins": 0}, "calibration.bins"),
        ({"bins": "15"}, "calibration.bins"),
        ({"bins": 2.5}, "calibration.bins"),
        ({"bins": True}, "calibration.bins"),
    ],
)
def test_validate_calibration_options_rejects(options, path):
    given_options = {
        "bins": 15,
        "label_smoothing": [0.0, 0.05, 0.1],
        "temperatures": [0.7, 0.85, 1.0, 1.15, 1.3],
        **options,
    }
    errors = cal.validate_calibration_options(**given_options)
    assert len(errors) == 1, errors
    assert re.match(MESSAGE_SHAPE.format(path=re.escape(path)), errors[0]), errors[0]


def test_validate_calibration_options_accepts_defaults_and_names_where():
    assert cal.validate_calibration_options(15, [0.0, 0.05, 0.1], [0.7, 0.85, 1.0, 1.15, 1.3]) == []
    assert cal.validate_calibration_options(15, [], []) == []
    errors = cal.validate_calibration_options(0, [1.0], [0], where="runs[2].calibration")
    assert [e.split(":")[0] for e in errors] == [
        "runs[2].calibration.bins",
        "runs[2].calibration.label_smoothing[0]",
        "runs[2].calibration.temperatures[0]",
    ]


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: cal.reliability_bins([0.5, 1.5], [1, 0]),
            r"reliability_bins: confidence must be in \[0, 1\] \(got 1.5",
        ),
        (lambda: cal.reliability_bins([np.nan], [1]), "reliability_bins: confidence must be in"),
        (lambda: cal.reliability_bins([0.5, 0.6], [1]), "reliability_bins: per-token arrays must be the same length"),
        (lambda: cal.reliability_bins([0.5], [1], n_bins=0), "reliability_bins: n_bins must be an integer >= 1"),
        (lambda: cal.reliability_bins([0.5], [1], scheme="quantile"), "reliability_bins: scheme must be"),
        (lambda: cal.reliability_bins([[0.5]], [[1]]), "must be a 1-D array"),
        (lambda: cal.label_smoothed_ce([1.0], [2.0], 1.0), r"label_smoothed_ce: eps must be in \[0, 1\)"),
        (lambda: cal.smoothed_target_entropy(0.1, 0), "smoothed_target_entropy: vocab_size must be"),
        (lambda: cal.brier_terms([1.0, 2.0], [0.5]), "brier_terms: per-token arrays must be the same length"),
        (lambda: cal.eps_label("0.1"), "eps_label: eps must be a number"),
        (
            lambda: cal.calibration_sums(
                [1.0],
                [0.5],
                [True],
                [0.3],
                [2.0],
                [1.0],
                eps_grid=[0.1],
                temperatures=[1.0],
                nll_t=np.ones((1, 2)),
                max_prob_t=np.ones((1, 1)),
            ),
            r"calibration_sums: nll_t must be of shape \(n_tokens, n_temperatures\) = \(1, 1\)",
        ),
        (
            lambda: cal.calibration_sums([1.0], [0.5], [True], [0.3], [2.0], [1.0], eps_grid=[0.1, 2]),
            r"calibration_sums.eps_grid\[1\]: eps must be in",
        ),
        (
            lambda: cal.calibration_sums([1.0], [0.5], [True], [0.3], [2.0], [1.0], eps_grid=[], temperatures=[0]),
            r"calibration_sums.temperatures\[0\]: temperature must be",
        ),
        (lambda: plots.plot_reliability({}), "plot_reliability: bins_by_model must be non-empty"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert re.search(r"must be .+ \(got .+\)\. \S", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "eps, label",
    [
        (0.1, "0.1"),
        (0.05, "0.05"),
        (0.0, "0.0"),
        (0, "0.0"),
        (1e-05, "1e-05"),
        (np.float64(0.1), "0.1"),
        (np.int64(0), "0.0"),
    ],
)
def test_eps_label_is_one_spelling_per_value(eps, label):
    assert cal.eps_label(eps) == label


@pytest.mark.parametrize("written", ["[0, 0.1]", "[0.0, 0.1]", "[0.00, 1e-1]"])
def test_label_smoothing_columns_have_one_spelling_whatever_the_yaml(written, small_batch, tmp_path):
    """`label_smoothing: [0]` and `[0.0]` mean one thing, so they name the same columns."""
    from lmeval.engine.config import load_config

    (tmp_path / "c.yaml").write_text(
        f"models: [gpt2]\ndata: {{path: gpt2}}\ncalibration: {{label_smoothing: {written}}}\n"
    )
    grid = load_config(tmp_path / "c.yaml").calibration.label_smoothing
    summary = cal.summarize(make_sums(small_batch[2], eps_grid=grid), vocab_size=50)
    assert {"ce_eps0.0", "h_eps0.0", "kl_eps0.0", "ce_eps0.1"} <= summary.keys()
    assert not any(key.endswith(("eps0", "eps0.00")) for key in summary)


# ------------------------------------------------------------------------------- plot


@pytest.mark.figures
def test_plot_reliability_writes_png(tmp_path, small_batch):
    _, _, stats = small_batch
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.05, 1.0, 5000)
    models = {
        "model-a": cal.reliability_bins(stats["max_prob"], stats["is_top1"]),
        "overconfident": cal.reliability_bins(conf, rng.uniform(size=conf.size) < conf - 0.2),
    }
    path = tmp_path / "plots" / "reliability.png"
    write_figure(plots.plot_reliability(models, title="test"), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temp file left
