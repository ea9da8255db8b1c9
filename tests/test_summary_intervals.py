"""The summary's intervals (ppl_ci_low, ..., word_ppl_ci_high, ece_ci_low, ..., brier_ci_high): a
document bootstrap of each pooled figure, checked against a plain numpy loop over resamples
(fed documents.parquet, or for calibration the token rows of each resample's documents) and
scipy.stats.bootstrap; and independent of document order, batching and parts."""

import math

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import write_tiny_run
from lmeval.analyses.documents import INTERVAL_METRICS, summary_intervals
from lmeval.core.bootstrap import DocumentRows
from lmeval.core.calibration import INTERVAL_FIGURES
from lmeval.core.units import LN2

B, SEED = 300, 11
# 18 documents of one to three sentences: enough for an interval (compare.min_documents is 10).
DOCS = [
    {"id": f"doc-{i:02d}", "text": " ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(1 + i % 3))} for i in range(18)
]
COUNTS = {"ppl": "n_tokens", "bits_per_token": "n_tokens", "bits_per_byte": "n_bytes", "word_ppl": "n_words"}


def pooled(metric: str, nll_sum, count):
    """The metric from sums, as the glossary defines it."""
    per_unit = nll_sum / count
    return per_unit / LN2 if metric.startswith("bits") else np.exp(per_unit)


def write_run(folder, model_path, docs=DOCS, scoring="max_length: 16, stride: 8, batch_tokens: 128", extra=""):
    sections = f"compare: {{bootstrap: {B}, seed: {SEED}}}\nanalysis: {{positions: false}}\n"
    return write_tiny_run(folder, model_path, docs, scoring, sections, output=extra)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, gpt2_pair):
    model, tokenizer = gpt2_pair
    folder = tmp_path_factory.mktemp("intervals")
    model.save_pretrained(folder / "m")
    tokenizer.save_pretrained(folder / "m")
    lmeval.run(str(write_run(folder, folder / "m")), show_progress=False)
    return folder


def calibration_figures(tokens: pd.DataFrame, n_bins: int = 15, edges=None) -> dict:
    """ECE, MCE, Brier and top-1 accuracy of a set of token rows, from their definitions."""
    conf, correct = tokens["max_prob"].to_numpy(np.float64), tokens["is_top1"].to_numpy(np.float64)
    if edges is None:
        bin_of = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
    else:
        bin_of = np.clip(np.digitize(conf, edges[1:-1]), 0, len(edges) - 2)
    gaps = []
    for b in np.unique(bin_of):
        inside = bin_of == b
        gaps.append((inside.sum(), abs(correct[inside].mean() - conf[inside].mean())))
    n = len(conf)
    brier = 1 - 2 * np.exp(-tokens["nll"].to_numpy(np.float64)) + tokens["sum_q2"].to_numpy(np.float64)
    return {
        "ece": sum(k * g for k, g in gaps) / n,
        "mce": max(g for _, g in gaps),
        "brier": brier.mean(),
        "top1_accuracy": correct.mean(),
    }


def resampled_calibration(tokens: pd.DataFrame, n_resamples: int, edges=None) -> dict:
    """Each figure over ``n_resamples`` resamples of documents (the documented draw, documents
    in doc_id order), each resample's tokens gathered with repetition."""
    ids = sorted(tokens["doc_id"].unique())
    by_doc = dict(list(tokens.groupby("doc_id")))  # a GroupBy has a `keys` attribute: dict() misreads it
    draws = np.random.default_rng(SEED).integers(0, len(ids), size=(n_resamples, len(ids)))
    values = [calibration_figures(pd.concat([by_doc[ids[i]] for i in d]), edges=edges) for d in draws]
    return {k: np.array([v[k] for v in values]) for k in INTERVAL_FIGURES}


def _documents(folder):
    return pd.read_parquet(folder / "out" / "documents.parquet").sort_values("doc_id").reset_index(drop=True)


@pytest.mark.parametrize("metric", INTERVAL_METRICS)
def test_intervals_equal_a_loop_over_resamples_and_scipy(run_folder, metric):
    scipy_stats = pytest.importorskip("scipy.stats")
    docs = _documents(run_folder)
    row = pd.read_csv(run_folder / "out" / "summary.csv").iloc[0]
    nll, count = docs["nll_sum"].to_numpy(np.float64), docs[COUNTS[metric]].to_numpy(np.float64)
    draws = np.random.default_rng(SEED).integers(0, len(docs), size=(B, len(docs)))  # the documented draw
    values = np.array([pooled(metric, nll[d].sum(), count[d].sum()) for d in draws])
    low, high = np.percentile(values, [2.5, 97.5])
    assert row[f"{metric}_ci_low"] == pytest.approx(low, rel=1e-12)
    assert row[f"{metric}_ci_high"] == pytest.approx(high, rel=1e-12)
    assert row[f"{metric}_ci_low"] < row[metric] < row[f"{metric}_ci_high"]
    assert row["n_resamples"] == B

    res = scipy_stats.bootstrap(
        (nll, count),
        lambda s, n, axis=-1: pooled(metric, s.sum(axis=axis), n.sum(axis=axis)),
        paired=True,
        vectorized=True,
        n_resamples=B,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    assert row[f"{metric}_ci_low"] == pytest.approx(res.confidence_interval.low, rel=1e-12)
    assert row[f"{metric}_ci_high"] == pytest.approx(res.confidence_interval.high, rel=1e-12)


@pytest.mark.parametrize("part_chars", [5000, 60])  # one part; documents cut into window-aligned pieces
def test_independent_of_document_order_batching_and_parts(run_folder, tmp_path, part_chars):
    path = write_run(tmp_path, run_folder / "m", docs=DOCS[::-1], scoring="max_length: 16, stride: 8, batch_tokens: 40")
    theirs = lmeval.run(str(path), [f"output.part_chars={part_chars}"], show_progress=False)["summary"].iloc[0]
    ours = pd.read_csv(run_folder / "out" / "summary.csv").iloc[0]
    for metric in (*INTERVAL_METRICS, *INTERVAL_FIGURES):
        for end in ("ci_low", "ci_high"):
            assert theirs[f"{metric}_{end}"] == pytest.approx(ours[f"{metric}_{end}"], rel=1e-6)  # float32 nll


def test_interval_covers_the_corpus_value_it_was_drawn_from():
    """Coverage on a synthetic population: documents drawn from a known mixture, the interval of
    pooled bits per token over 200 of them, 100 times: the true value inside about 95% of the time."""
    rng = np.random.default_rng(0)
    population_bits = 2.0
    hits = 0
    for seed in range(100):
        n_tokens = rng.integers(20, 400, 200)
        bits = rng.normal(population_bits, 0.4, 200)  # per-document bits per token around the truth
        documents = pd.DataFrame(
            {
                "doc_id": [f"d{i}" for i in range(200)],
                "nll_sum": bits * LN2 * n_tokens,
                "n_tokens": n_tokens,
                "n_bytes": n_tokens * 4,
                "n_words": n_tokens,
            }
        )
        row = summary_intervals(documents, 200, seed, 10)
        hits += row["bits_per_token_ci_low"] <= population_bits <= row["bits_per_token_ci_high"]
    assert 88 <= hits <= 100


def test_too_few_documents_and_documents_only_give_nan(run_folder, tmp_path):
    few = summary_intervals(_documents(run_folder).head(9), B, SEED, 10)
    assert few["n_resamples"] == 0 and all(math.isnan(v) for k, v in few.items() if k != "n_resamples")
    assert set(few) == {f"{m}_{e}" for m in INTERVAL_METRICS for e in ("ci_low", "ci_high")} | {"n_resamples"}
    none = summary_intervals(_documents(run_folder), 0, SEED, 10)  # compare.bootstrap: 0
    assert none["n_resamples"] == 0 and math.isnan(none["word_ppl_ci_high"])

    path = write_run(tmp_path, run_folder / "m", extra=", per_token: false, documents_only: true")
    row = lmeval.run(str(path), show_progress=False)["summary"].iloc[0]
    assert row["n_resamples"] == 0 and math.isnan(row["ppl_ci_low"]) and math.isfinite(row["ppl"])


def test_calibration_intervals_equal_a_loop_over_resampled_tokens(run_folder):
    tokens = pd.read_parquet(run_folder / "out" / "tokens.parquet")
    row = pd.read_csv(run_folder / "out" / "summary.csv").iloc[0]
    point = calibration_figures(tokens)
    draws = resampled_calibration(tokens, B)
    for name in INTERVAL_FIGURES:
        assert row[name] == pytest.approx(point[name], rel=1e-9), name
        low, high = np.percentile(draws[name], [2.5, 97.5])
        assert row[f"{name}_ci_low"] == pytest.approx(low, rel=1e-9), name
        assert row[f"{name}_ci_high"] == pytest.approx(high, rel=1e-9), name
        assert row[f"{name}_ci_low"] < row[f"{name}_ci_high"]


def test_equal_mass_bins_keep_the_point_estimates_edges(run_folder, tmp_path):
    path = write_run(tmp_path, run_folder / "m")
    tables = lmeval.run(str(path), ["calibration.binning=mass", "compare.bootstrap=60"], show_progress=False)
    row, bins = tables["summary"].iloc[0], tables["calibration"]
    edges = np.append(bins["lo"].to_numpy(), bins["hi"].to_numpy()[-1])
    tokens = pd.read_parquet(tmp_path / "out" / "tokens.parquet")
    draws = {k: np.percentile(v, [2.5, 97.5]) for k, v in resampled_calibration(tokens, 60, edges).items()}
    for name in ("ece", "mce"):
        assert [row[f"{name}_ci_low"], row[f"{name}_ci_high"]] == pytest.approx(draws[name], rel=1e-9), name


def test_document_rows_sum_pieces_in_doc_id_order_across_spills():
    rows = DocumentRows(2)
    first, later, last = DocumentRows(2), DocumentRows(2), DocumentRows(2)
    first.add(["b", "a"], [[1.0, 2.0], [3.0, 4.0]])
    later.add(["b", "c"], [[10.0, 20.0], [5.0, 6.0]])  # a second piece of "b"
    last.add([], np.zeros((0, 2)))
    for state in (first, later, last):
        rows = rows.absorb(state)
    ids, sums = rows.canonical()
    assert ids.tolist() == ["a", "b", "c"]
    assert sums.tolist() == [[3.0, 4.0], [11.0, 22.0], [5.0, 6.0]]
    with pytest.raises(ValueError, match="3 rows for 2 documents"):
        DocumentRows(1).add(["x", "y"], [[1.0], [2.0], [3.0]])
