"""The position curve (positions.csv, positions.png) and icl_score, against pandas over the
token table and an independent document bootstrap (numpy, and scipy.stats.bootstrap)."""

import math

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import write_tiny_run
from lmeval.core.positions import BinnedSums, Bins, SpilledSums, binned_sums, icl_window, log_edges, pooled_bins
from lmeval.engine.config import load_config
from lmeval.errors import ConfigError

B, SEED = 400, 7
# Three copies of each sentence: ~60-90 tokens per document, several windows each.
DOCS = [{"id": f"doc-{i}", "text": " ".join([t] * 3)} for i, t in enumerate(CORPUS)]


def write_run(folder, model_path, docs=DOCS, analysis="", scoring="max_length: 16, stride: 8, batch_tokens: 128"):
    sections = f"analysis: {{bootstrap: {B}, seed: {SEED}, icl_context: [4, 12]{analysis}}}\n"
    return write_tiny_run(folder, model_path, docs, scoring, sections)


@pytest.fixture(scope="module")
def run_tables(tmp_path_factory, gpt2_pair):
    model, tokenizer = gpt2_pair
    folder = tmp_path_factory.mktemp("positions")
    model.save_pretrained(folder / "m")
    tokenizer.save_pretrained(folder / "m")
    tables = lmeval.run(str(write_run(folder, folder / "m")), show_progress=False)
    return folder, tables


# --------------------------------------------------------------------------------------
# Core: bins and sums
# --------------------------------------------------------------------------------------


def test_log_edges_and_bounds():
    assert log_edges(1)[:8].tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert log_edges(4)[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13]
    values = np.random.default_rng(0).integers(0, 10**6, 5000)
    for bins in (Bins("log", 1), Bins("log", 4), Bins("linear", width=64)):
        lo, hi = bins.bounds(bins.index(values))
        assert np.all((lo <= values) & (values < hi))


def test_binned_sums_match_groupby_and_merge_repeats():
    rng = np.random.default_rng(1)
    doc, pos = rng.integers(0, 9, 3000), rng.integers(0, 2000, 3000)
    nll = rng.gamma(2.0, 1.5, 3000).astype(np.float32)
    bins = Bins("log", 2)
    halves = [binned_sums(doc[s], pos[s], nll[s], bins) for s in (slice(0, 1700), slice(1700, None))]
    merged = BinnedSums.concat(halves)  # a (document, bin) pair in both halves becomes one entry
    frame = pd.DataFrame({"doc": doc, "bin": bins.index(pos), "nll": nll.astype(np.float64), "pos": pos})
    expected = frame.groupby(["doc", "bin"]).agg(n=("nll", "size"), s=("nll", "sum"), v=("pos", "sum")).reset_index()
    np.testing.assert_array_equal(merged.doc, expected.doc)
    np.testing.assert_array_equal(merged.bin, expected.bin)
    np.testing.assert_array_equal(merged.n_tokens, expected.n)
    np.testing.assert_allclose(merged.nll_sum, expected.s, rtol=1e-12)
    pooled = pooled_bins(merged)
    by_bin = frame.groupby("bin").agg(n=("nll", "size"), m=("nll", "mean"), d=("doc", "nunique"))
    np.testing.assert_allclose(pooled["nll_mean"], by_bin.m, rtol=1e-12)
    np.testing.assert_array_equal(pooled["n_documents"], by_bin.d)


def test_spilled_entries_read_back_exactly_and_keep_appending():
    """A run's entries wait in a temporary file (not in memory); reading them back gives every
    field bit for bit, in append order, and appends after a read still land at the end."""
    rng = np.random.default_rng(2)
    bins = Bins("log", 4)
    chunks = [
        binned_sums(rng.integers(0, 5, 400), rng.integers(0, 900, 400), rng.random(400), bins, 5 * i) for i in range(3)
    ]
    spilled = SpilledSums()
    spilled.append(chunks[0])
    spilled.load()
    for chunk in chunks[1:]:
        spilled.append(chunk)
    back = spilled.load()
    spilled.close()
    for name in BinnedSums.__dataclass_fields__:
        expected = np.concatenate([getattr(c, name) for c in chunks])
        assert getattr(back, name).dtype == expected.dtype, name
        np.testing.assert_array_equal(getattr(back, name), expected, err_msg=name)


# --------------------------------------------------------------------------------------
# positions.csv from a run
# --------------------------------------------------------------------------------------


def _binned_tokens(tokens: pd.DataFrame, rows: pd.DataFrame, axis: str) -> pd.Series:
    """Each token's bin, read off positions.csv's own [lo, hi) edges (not the code's binning)."""
    edges = np.append(rows["lo"].to_numpy(), rows["hi"].to_numpy()[-1])
    index = pd.cut(tokens[axis], bins=edges, right=False, labels=False)
    assert not index.isna().any(), "a token falls outside every bin"
    return rows["bin"].to_numpy()[index.to_numpy(int)]


@pytest.mark.parametrize("axis", ["position", "context_len"])
def test_bin_means_equal_groupby_over_tokens(run_tables, axis):
    folder, _tables = run_tables
    tokens = pd.read_parquet(folder / "out" / "tokens.parquet")
    on_disk = pd.read_csv(folder / "out" / "positions.csv")
    rows = on_disk[on_disk["axis"] == axis].reset_index(drop=True)
    assert (rows["lo"].to_numpy()[1:] >= rows["hi"].to_numpy()[:-1]).all()  # ordered, disjoint
    tokens["bin"] = _binned_tokens(tokens, rows, axis)
    tokens["nll64"] = tokens["nll"].astype(np.float64)
    expected = tokens.groupby("bin").agg(
        n=("nll64", "size"), mean=("nll64", "mean"), docs=("doc_id", "nunique"), value=(axis, "mean")
    )
    np.testing.assert_array_equal(rows["n_tokens"], expected.n)
    np.testing.assert_array_equal(rows["n_documents"], expected.docs)
    np.testing.assert_allclose(rows["nll_mean"], expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(rows["value_mean"], expected.value, rtol=1e-12)
    assert rows["n_tokens"].sum() == len(tokens)
    assert (folder / "out" / "positions.png").stat().st_size > 10_000


def _per_document_bins(tokens, rows, axis, doc_order):
    tokens = tokens.assign(bin=_binned_tokens(tokens, rows, axis), nll64=tokens["nll"].astype(np.float64))
    grid = tokens.pivot_table(index="doc_id", columns="bin", values="nll64", aggfunc=["size", "sum"], fill_value=0)
    counts = grid["size"].reindex(index=doc_order, columns=rows["bin"], fill_value=0).to_numpy(np.float64)
    sums = grid["sum"].reindex(index=doc_order, columns=rows["bin"], fill_value=0).to_numpy(np.float64)
    return counts, sums  # (D, bins)


@pytest.mark.parametrize("axis", ["position", "context_len"])
def test_intervals_match_an_independent_bootstrap(run_tables, axis):
    """A plain loop over resamples of documents (in doc_id order, drawn from the seed),
    pooling each bin from the token table; and scipy.stats.bootstrap where every resample
    has tokens in the bin."""
    scipy_stats = pytest.importorskip("scipy.stats")
    folder, _ = run_tables
    tokens = pd.read_parquet(folder / "out" / "tokens.parquet")
    rows = pd.read_csv(folder / "out" / "positions.csv").query("axis == @axis").reset_index(drop=True)
    doc_order = sorted(d["id"] for d in DOCS)
    counts, sums = _per_document_bins(tokens, rows, axis, doc_order)
    draws = np.random.default_rng(SEED).integers(0, len(doc_order), size=(B, len(doc_order)))
    means = np.empty((B, len(rows)))
    for r in range(B):
        n, s = counts[draws[r]].sum(axis=0), sums[draws[r]].sum(axis=0)
        means[r] = np.where(n > 0, s / np.where(n > 0, n, 1), np.nan)
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(means, [2.5, 97.5], axis=0)
    several = rows["n_documents"].to_numpy() >= 2
    np.testing.assert_allclose(rows["ci_low"][several], low[several], rtol=1e-12)
    np.testing.assert_allclose(rows["ci_high"][several], high[several], rtol=1e-12)
    assert rows["ci_low"][~several].isna().all() and rows["ci_high"][~several].isna().all()
    assert (rows["ci_low"][several] <= rows["nll_mean"][several] + 1e-9).all()

    everywhere = np.flatnonzero((counts > 0).all(axis=0))
    assert len(everywhere) >= 3
    for j in everywhere[:3]:
        res = scipy_stats.bootstrap(
            (counts[:, j], sums[:, j]),
            lambda n, s, axis=-1: s.sum(axis=axis) / n.sum(axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=B,
            method="percentile",
            rng=np.random.default_rng(SEED),
        )
        assert rows["ci_low"][j] == pytest.approx(res.confidence_interval.low, rel=1e-12)
        assert rows["ci_high"][j] == pytest.approx(res.confidence_interval.high, rel=1e-12)


def test_icl_score_equals_pandas(run_tables):
    folder, _tables = run_tables
    tokens = pd.read_parquet(folder / "out" / "tokens.parquet")
    (e_lo, e_hi), (l_lo, l_hi) = icl_window(4), icl_window(12)
    assert (e_lo, e_hi, l_lo, l_hi) == (4, 4, 11, 13)
    early = tokens[tokens.context_len.between(e_lo, e_hi)]
    late = tokens[tokens.context_len.between(l_lo, l_hi)]
    docs = sorted(set(early.doc_id) & set(late.doc_id))
    expected = (
        late[late.doc_id.isin(docs)].nll.astype(np.float64).mean()
        - early[early.doc_id.isin(docs)].nll.astype(np.float64).mean()
    )
    row = pd.read_csv(folder / "out" / "summary.csv").iloc[0]
    assert row.icl_documents == len(docs) == len(DOCS)
    assert row.icl_score == pytest.approx(expected, rel=1e-12)
    assert row.icl_ci_low < row.icl_score < row.icl_ci_high
    assert pd.isna(row.icl_note)  # written as an empty string


def test_independent_of_document_order_batching_and_parts(run_tables, tmp_path):
    folder, _ = run_tables
    path = write_run(tmp_path, folder / "m", docs=DOCS[::-1], scoring="max_length: 16, stride: 8, batch_tokens: 48")
    tables = lmeval.run(str(path), ["output.part_chars=10000"], show_progress=False)
    ours = pd.read_csv(folder / "out" / "positions.csv")
    theirs = tables["positions"]
    pd.testing.assert_frame_equal(
        ours[["axis", "bin", "lo", "hi", "n_tokens", "n_documents"]],
        theirs[["axis", "bin", "lo", "hi", "n_tokens", "n_documents"]],
        check_dtype=False,
    )
    for column in ("nll_mean", "ci_low", "ci_high"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-5, atol=1e-6, err_msg=column)


def test_short_documents_give_nan_icl_with_a_note(run_tables, tmp_path):
    folder, _ = run_tables
    path = write_run(tmp_path, folder / "m", analysis=", position_bins: linear, bin_width: 8")
    tables = lmeval.run(str(path), ["analysis.icl_context=[50, 500]"], show_progress=False)
    row = tables["summary"].iloc[0]
    assert math.isnan(row.icl_score) and row.icl_documents == 0
    assert "scoring.max_length at least 550" in row.icl_note
    positions = tables["positions"]
    assert ((positions.hi - positions.lo) == 8).all() and (positions.lo % 8 == 0).all()


def test_positions_off_writes_nothing(run_tables, tmp_path):
    folder, _ = run_tables
    tables = lmeval.run(str(write_run(tmp_path, folder / "m")), ["analysis.positions=false"], show_progress=False)
    assert "positions" not in tables and "icl_score" not in tables["summary"]
    assert not (tmp_path / "out" / "positions.csv").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("analysis.bins_per_octave=0", "analysis.bins_per_octave: must be >= 1"),
        ("analysis.icl_context=[500, 50]", "analysis.icl_context: must be two context lengths"),
        ("analysis.mink_k=[0, 20]", "analysis.mink_k: must be distinct percentages in (0, 100]"),
        ("analysis.mink_k=[10, 10.0]", "analysis.mink_k: must be distinct"),
        ("analysis.reference=other", "analysis.reference: must name one of the models (tiny)"),
        ("analysis.position_bins=sqrt", "analysis.position_bins: must be one of log, linear"),
        ("analysis.bootstrap=-1", "analysis.bootstrap: must be >= 0"),
        ("analysis.membersip=true", "Did you mean 'membership'?"),
    ],
)
def test_config_errors(tmp_path, saved_gpt2, override, message):
    path = write_run(tmp_path, saved_gpt2)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value)
