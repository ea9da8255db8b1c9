"""Model comparison: pooled deltas with a paired document bootstrap, per-token and
per-document differences, comparing earlier runs, and the checkpoint plot.

Two tiny GPT-2s are trained in-process on the conftest corpus from the same initialisation,
one four times longer; the longer-trained one must come out better with an interval that
excludes 0. The bootstrap is checked against an independent numpy implementation and for
coverage on synthetic documents with a known true delta.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from conftest import CORPUS, EOT, build_model, train_bpe
from lmeval.analyses import compare as cmp
from lmeval.analyses import plots
from lmeval.cli import compare as compare_cli
from lmeval.core import bootstrap
from lmeval.engine import compare_runs as compare_runs_module
from lmeval.engine.config import CompareConfig, load_config, step_number
from lmeval.errors import DataError, LmevalError

SHORT, LONG = "step-8", "step-32"  # AdamW steps each model was trained for
VARIATIONS = [
    "The word was with the model in the beginning.",
    "The lazy dog sleeps; the quick brown fox jumps on.",
    "Perplexity is the exponential of the negative log-likelihood.",
    "Entropy plus the Kullback-Leibler divergence equals cross-entropy.",
    "Café owners serve crème brûlée to the dog and the fox.",
    "Formulas use numbers like 3.14159 and 2.71828.",
]
DOCS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(CORPUS + VARIATIONS)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# Tiny trained checkpoints and runs, built once per module
# --------------------------------------------------------------------------------------


def train_checkpoints(tokenizer, folder: Path, steps=(8, 32)) -> dict[str, Path]:
    """Train one GPT-2 from a fixed init with AdamW on the corpus sentences (one padded row
    each, after the BOS it is scored with); save it after each of ``steps``."""
    model = build_model("gpt2", len(tokenizer), seed=0).train()
    rows = [tokenizer(EOT + text)["input_ids"] for text in CORPUS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (6, T)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (6, T)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    saved = {}
    for step in range(1, max(steps) + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in steps:
            path = folder / f"step-{step}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            saved[path.name] = path
    return saved


def run_models(folder: Path, models: dict, data: Path, max_length: int = 32, compare: str = "") -> dict:
    """`lmeval.run` on ``models`` ({name: folder}), writing into ``folder``/out."""
    listed = "\n".join(f"  - {{name: {name}, path: {path}}}" for name, path in models.items())
    config = folder / "run.yaml"
    config.write_text(
        f"models:\n{listed}\ndata: {{path: {data}, id_field: id}}\n"
        f"scoring: {{max_length: {max_length}, batch_tokens: 256}}\noutput: {{dir: out}}\n{compare}",
        encoding="utf-8",
    )
    return lmeval.run(str(config), show_progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on shared CPUs: one thread avoids contention (30x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bpe_tokenizer) -> dict[str, Path]:
    return train_checkpoints(bpe_tokenizer, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def together(tmp_path_factory, checkpoints, data):
    """Both checkpoints scored in one run, and its comparison (baseline: the shorter one)."""
    tables = run_models(
        tmp_path_factory.mktemp("together"), checkpoints, data, compare=f"compare: {{baseline: {SHORT}}}\n"
    )
    frames = cmp.compare_tables(tables, tables["run"], tables["run"]["config"]["compare"])
    return tables, frames


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, checkpoints, data) -> dict[str, Path]:
    """Each checkpoint in its own run folder, plus the long one under another max_length."""
    folders = {}
    for key, name, max_length in ((SHORT, SHORT, 32), (LONG, LONG, 32), ("other-length", LONG, 16)):
        folder = tmp_path_factory.mktemp(key)
        run_models(folder, {name: checkpoints[name]}, data, max_length=max_length)
        folders[key] = folder / "out"
    return folders


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`lmeval compare` as the lead's cli.main runs it: LmevalError -> stderr, exit 2."""
    parser = argparse.ArgumentParser(prog="lmeval")
    compare_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        code = compare_cli.main(parser.parse_args(argv))
    except LmevalError as exc:
        print(f"lmeval: error: {exc}", file=__import__("sys").stderr)
        code = 2
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------
# An independent implementation of the paired document bootstrap
# --------------------------------------------------------------------------------------

ORACLE_COUNTS = {"bits_per_token": "n_tokens", "ppl": "n_tokens", "bits_per_byte": "n_bytes", "word_ppl": "n_words"}


def oracle_bootstrap(model: pd.DataFrame, base: pd.DataFrame, metric: str, n_resamples: int, seed: int) -> dict:
    count = ORACLE_COUNTS[metric]

    def pooled(nll, n):
        return nll / n / math.log(2) if metric.startswith("bits") else np.exp(nll / n)

    n_docs = len(base)
    index = np.random.default_rng(seed).integers(0, n_docs, size=(n_resamples, n_docs))
    m_nll, m_n = model["nll_sum"].to_numpy(float), model[count].to_numpy(float)
    b_nll, b_n = base["nll_sum"].to_numpy(float), base[count].to_numpy(float)
    deltas = pooled(m_nll[index].sum(1), m_n[index].sum(1)) - pooled(b_nll[index].sum(1), b_n[index].sum(1))
    low, high = np.percentile(deltas, [2.5, 97.5])
    p = min(1.0, 2 * min((1 + (deltas <= 0).sum()) / (n_resamples + 1), (1 + (deltas >= 0).sum()) / (n_resamples + 1)))
    ratio_low, ratio_high = np.percentile(
        pooled(m_nll[index].sum(1), m_n[index].sum(1)) / pooled(b_nll[index].sum(1), b_n[index].sum(1)), [2.5, 97.5]
    )
    return {
        "delta": pooled(m_nll.sum(), m_n.sum()) - pooled(b_nll.sum(), b_n.sum()),
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "ratio_ci_low": ratio_low,
        "ratio_ci_high": ratio_high,
    }


def documents_of(documents: pd.DataFrame, model: str, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    base = documents[documents.model == baseline].reset_index(drop=True)
    return documents[documents.model == model].set_index("doc_id").loc[base.doc_id].reset_index(), base


def synthetic_documents(rng, n_docs: int, rates: dict[str, float]) -> pd.DataFrame:
    """Per-document sums for models whose true pooled nats/token is ``rates[name]``; the
    documents' difficulty is shared by all models (what pairing cancels)."""
    n_tokens = rng.integers(20, 200, n_docs)
    difficulty = rng.normal(0, 0.3, n_docs)
    frames = [
        pd.DataFrame(
            {
                "model": name,
                "doc_id": np.arange(n_docs),
                "n_tokens": n_tokens,
                "n_bytes": 4 * n_tokens,
                "n_words": n_tokens // 2 + 1,
                "nll_sum": n_tokens * (rate + difficulty) + np.sqrt(n_tokens) * rng.normal(0, 1, n_docs),
            }
        )
        for name, rate in rates.items()
    ]
    return pd.concat(frames, ignore_index=True)


def synthetic_record(names, sha="same") -> dict:
    protocol = {"max_length": 32, "stride": 32, "bos": "auto", "documents": "independent", "separator": None}
    return {"protocol": {"models": {n: {**protocol, "tokenizer_sha256": sha} for n in names}}}


# --------------------------------------------------------------------------------------
# The in-run comparison
# --------------------------------------------------------------------------------------


def test_longer_training_is_better_with_an_interval_excluding_zero(together):
    tables, frames = together
    compare = frames["compare"]
    assert list(compare.columns[:8]) == ["model", "baseline", "metric", "delta", "ci_low", "ci_high", "p_value", "unit"]
    assert compare.metric.tolist() == ["bits_per_token", "ppl", "bits_per_byte", "word_ppl"]
    assert compare.unit.tolist() == ["bits/token", "ppl (tokens)", "bits/byte", "ppl (words)"]
    assert set(compare.model) == {LONG} and set(compare.baseline) == {SHORT}
    rows = compare.set_index("metric")
    for metric in ("bits_per_token", "bits_per_byte"):
        row = rows.loc[metric]
        assert row.delta < 0 and row.ci_low <= row.delta <= row.ci_high < 0, row
        assert row.p_value < 0.01
    # The pooled values are the summary's, which pools the same sums.
    summary = tables["summary"].set_index("model")
    for metric in ("bits_per_token", "ppl", "bits_per_byte", "word_ppl"):
        assert rows.loc[metric, "value"] == pytest.approx(summary.loc[LONG, metric], rel=1e-12)
        assert rows.loc[metric, "baseline_value"] == pytest.approx(summary.loc[SHORT, metric], rel=1e-12)
    assert (compare.note == "").all() and (compare.n_documents == len(DOCS)).all()


def test_token_and_document_differences(together):
    tables, frames = together
    tokens, per_doc = frames["compare_tokens"], frames["compare_documents"]
    assert list(tokens.columns) == cmp.TOKEN_DIFF_COLUMNS and len(tokens) == CompareConfig().top_k
    assert tokens.delta_nll.abs().is_monotonic_decreasing
    # Each listed delta is the two models' own nll at that (doc_id, position).
    nll = tables["tokens"].set_index(["model", "doc_id", "position"]).nll.astype(np.float64)
    for row in tokens.itertuples():
        assert row.delta_nll == nll[(LONG, row.doc_id, row.position)] - nll[(SHORT, row.doc_id, row.position)]
    # No token outside the list moved more than the smallest listed one.
    everything = nll[LONG].to_numpy() - nll[SHORT].to_numpy()
    assert np.sort(np.abs(everything))[-len(tokens)] == pytest.approx(tokens.delta_nll.abs().min())
    # Per-document deltas add up to the corpus delta.
    summary = tables["summary"].set_index("model")
    assert len(per_doc) == len(DOCS) and per_doc.delta_nll_sum.abs().is_monotonic_decreasing
    assert per_doc.delta_nll_sum.sum() == pytest.approx(summary.nll_sum[LONG] - summary.nll_sum[SHORT], rel=1e-12)
    docs = tables["documents"].set_index(["model", "doc_id"])
    first = per_doc.iloc[0]
    assert first.delta_bits_per_token == pytest.approx(
        docs.bits_per_token[(LONG, first.doc_id)] - docs.bits_per_token[(SHORT, first.doc_id)], rel=1e-12
    )


@pytest.mark.parametrize("metric", ["bits_per_token", "ppl", "bits_per_byte", "word_ppl"])
def test_bootstrap_equals_an_independent_implementation(together, metric):
    tables, frames = together
    row = frames["compare"].set_index("metric").loc[metric]
    expected = oracle_bootstrap(*documents_of(tables["documents"], LONG, SHORT), metric, CompareConfig().bootstrap, 0)
    for key, value in expected.items():
        np.testing.assert_allclose(row[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


def test_a_model_compared_with_itself_differs_by_exactly_zero(together):
    tables, _ = together
    twin = {
        name: pd.concat([t, t[t.model == LONG].assign(model="twin")], ignore_index=True)
        for name, t in tables.items()
        if name in ("documents", "tokens")
    }
    record = json.loads(json.dumps(tables["run"]))
    record["protocol"]["models"]["twin"] = record["protocol"]["models"][LONG]
    frames = cmp.compare_tables(twin, record, CompareConfig(baseline=LONG))
    rows = frames["compare"].set_index("model").loc["twin"]
    assert len(rows) == 4
    assert (rows.delta == 0).all() and (rows.ci_low == 0).all() and (rows.ci_high == 0).all()
    assert (rows.p_value == 1).all()
    assert (rows.ratio == 1).all() and (rows.ratio_ci_low == 1).all() and (rows.ratio_ci_high == 1).all()
    assert (frames["compare_tokens"].query("model == 'twin'").delta_nll == 0).all()


def test_bootstrap_interval_covers_the_true_delta():
    """200 synthetic documents whose true pooled delta is -0.05 nats/token; the 95%
    interval must cover it in 85-100% of 100 independent repetitions."""
    truth = -0.05 / math.log(2)
    covered = []
    for seed in range(100):
        docs = synthetic_documents(np.random.default_rng(seed), 200, {"base": 2.0, "model": 1.95})
        row = cmp.paired_bootstrap(*documents_of(docs, "model", "base"), ("bits_per_token",), 200, seed).iloc[0]
        covered.append(row.ci_low <= truth <= row.ci_high)
    assert 0.85 <= np.mean(covered) <= 1.0


def test_blockwise_draw_is_the_documented_single_draw(monkeypatch):
    columns = np.random.default_rng(1).normal(size=(37, 3))
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 50)  # a few resamples per block
    index = np.random.default_rng(9).integers(0, 37, size=(101, 37))
    np.testing.assert_allclose(
        bootstrap.resampled_sums(columns, 101, 9), columns[index].sum(axis=1), rtol=1e-14, atol=1e-13
    )


def test_a_non_finite_entry_reaches_only_the_resamples_that_draw_it(monkeypatch):
    """Sums are computed as draw counts times the columns, where 0 * inf would be NaN: an
    infinite or NaN entry must spoil exactly the resamples holding its document, as the
    gather of the documented draw does."""
    columns = np.random.default_rng(2).normal(size=(23, 3))
    columns[4, 1], columns[9, 1], columns[7, 2] = np.inf, -np.inf, np.nan
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 60)
    expected = columns[np.random.default_rng(5).integers(0, 23, size=(80, 23))].sum(axis=1)
    got = bootstrap.resampled_sums(columns, 80, 5)
    assert np.isnan(expected).any() and np.isinf(expected).any()  # the draw hits each kind
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
    np.testing.assert_allclose(got[np.isfinite(expected)], expected[np.isfinite(expected)], rtol=1e-14, atol=1e-13)


def test_no_resamples_gives_no_interval():
    docs = synthetic_documents(np.random.default_rng(0), 10, {"base": 2.0, "model": 1.9})
    row = cmp.paired_bootstrap(*documents_of(docs, "model", "base"), ("bits_per_byte",), 0, 0).iloc[0]
    assert row.delta < 0 and all(math.isnan(row[k]) for k in ("ci_low", "ci_high", "p_value"))


def test_different_document_sets_are_refused():
    docs = synthetic_documents(np.random.default_rng(0), 10, {"a": 2.0, "b": 1.9})
    docs = docs[~((docs.model == "b") & (docs.doc_id == 3))]
    with pytest.raises(DataError, match=r"same documents as the baseline 'a' \(got 0 documents only in 'b' and 1"):
        cmp.compare_tables({"documents": docs}, synthetic_record(["a", "b"]), CompareConfig())


def test_different_tokenizers_compare_in_bits_per_byte(tmp_path, checkpoints, data):
    tokenizer = train_bpe(tmp_path, vocab_size=300)
    other = tmp_path / "other-vocab"
    build_model("gpt2", len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    tables = run_models(tmp_path, {LONG: checkpoints[LONG], "other": other}, data)
    assert not cmp.shared_tokenizer(tables["run"])
    frames = cmp.compare_tables(tables, tables["run"], CompareConfig())
    compare = frames["compare"]
    assert compare.metric.tolist() == ["bits_per_byte", "word_ppl"]
    assert compare.note.str.contains("tokenizers differ").all()
    assert compare.note.str.contains("per-token deltas refused; compared in bits per byte and word perplexity").all()
    assert frames["compare_tokens"] is None
    per_doc = frames["compare_documents"]
    assert per_doc.delta_bits_per_token.isna().all() and per_doc.delta_bits_per_byte.notna().all()


def test_lmeval_run_prints_the_comparison_lmeval_compare_prints(tmp_path, checkpoints, data, capsys):
    """Both commands print one table, notes included (why a unit was refused)."""
    tokenizer = train_bpe(tmp_path, vocab_size=300)
    other = tmp_path / "other-vocab"
    build_model("gpt2", len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    listed = f"  - {{name: {LONG}, path: {checkpoints[LONG]}}}\n  - {{name: other, path: {other}}}"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"models:\n{listed}\ndata: {{path: {data}, id_field: id}}\nscoring: {{max_length: 32}}\noutput: {{dir: out}}\n",
        encoding="utf-8",
    )
    from lmeval.cli import main

    assert main(["run", str(config), "-q"]) == 0
    run_out = capsys.readouterr().out
    assert main(["compare", str(tmp_path / "out")]) == 0
    compare_out = capsys.readouterr().out
    assert "note (other vs " in compare_out and "tokenizers differ" in compare_out
    assert compare_out.strip() in run_out


# --------------------------------------------------------------------------------------
# Comparing earlier runs
# --------------------------------------------------------------------------------------


def test_compare_runs_equals_the_in_run_comparison(together, single_runs, tmp_path, capsys):
    _, frames = together
    merged = compare_runs_module.compare_runs([single_runs[SHORT], single_runs[LONG]], baseline=SHORT)
    keys = ["model", "baseline", "metric", "unit"]
    pd.testing.assert_frame_equal(merged["compare"][keys], frames["compare"][keys])
    for column in ("delta", "ci_low", "ci_high", "p_value", "value", "baseline_value", "ratio_ci_low"):
        np.testing.assert_allclose(merged["compare"][column], frames["compare"][column], rtol=1e-12, atol=1e-12)
    # The command prints the table and writes the files.
    code, out, _ = cli(
        ["compare", str(single_runs[SHORT]), str(single_runs[LONG]), "--out", str(tmp_path / "cmp")], capsys
    )
    assert code == 0 and "bits_per_byte" in out and "ppl (words)" in out
    written = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    np.testing.assert_allclose(written.ci_low, frames["compare"].ci_low, rtol=1e-12, atol=1e-12)
    for name in ("compare_tokens.csv", "compare_documents.csv"):
        assert (tmp_path / "cmp" / name).is_file()
    assert (tmp_path / "cmp" / "checkpoints.png").read_bytes().startswith(PNG_SIGNATURE)
    code, _, err = cli(
        ["compare", str(single_runs[SHORT]), str(single_runs[LONG]), "--out", str(tmp_path / "cmp")], capsys
    )
    assert code == 2 and "--overwrite" in err


def _refit_fingerprint(runs: dict, tmp_path: Path) -> list[Path]:
    copy = tmp_path / "copy"
    shutil.copytree(runs[LONG], copy)
    record = json.loads((copy / "run.json").read_text())
    record["data"]["fingerprint"] = "0" * 64
    (copy / "run.json").write_text(json.dumps(record))
    return [runs[SHORT], copy]


@pytest.mark.parametrize(
    "pick, words",
    [
        (lambda runs, tmp: [runs[SHORT], runs["other-length"]], ["max_length: 16 vs 32", "scoring.max_length"]),
        (lambda runs, tmp: [runs[SHORT], runs[SHORT]], ["names must be unique", "distinct `name:`"]),
        (_refit_fingerprint, ["data fingerprint must be equal", "same corpus"]),
        (lambda runs, tmp: [runs[SHORT], tmp], ["must be a finished lmeval run folder", "run.json"]),
    ],
    ids=["max_length", "duplicate-name", "data", "not-a-run"],
)
def test_incomparable_runs_are_refused(pick, words, single_runs, tmp_path, capsys):
    dirs = [str(d) for d in pick(single_runs, tmp_path)]
    with pytest.raises(DataError) as caught:
        compare_runs_module.compare_runs(dirs)
    for word in words:
        assert word in str(caught.value)
    code, out, err = cli(["compare", *dirs], capsys)
    assert code == 2 and words[0] in err and out == ""


# --------------------------------------------------------------------------------------
# Checkpoint series
# --------------------------------------------------------------------------------------


def test_glob_orders_checkpoints_by_step(tmp_path):
    for step in (100, 2, 10):
        (tmp_path / "ckpt" / f"step-{step}").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text("models: [{glob: ckpt/step-*}]\ndata: {path: docs.jsonl}\n", encoding="utf-8")
    assert [m.name for m in load_config(config).models] == ["step-2", "step-10", "step-100"]
    assert sorted(["step-100", "step-10", "step-2"], key=step_number) == ["step-2", "step-10", "step-100"]


def test_plot_checkpoints_writes_a_png(tmp_path):
    names = ["step-100", "step-2", "step-1000", "step-10"]
    docs = synthetic_documents(np.random.default_rng(0), 60, dict(zip(names, (2.2, 3.0, 2.0, 2.6))))
    tables = {"documents": docs}
    frames = cmp.compare_tables(tables, synthetic_record(names), CompareConfig(baseline="step-2", bootstrap=300))
    sums = docs.groupby("model", sort=False)[["nll_sum", "n_tokens", "n_bytes"]].sum().reset_index()
    summary = sums.assign(
        ppl=np.exp(sums.nll_sum / sums.n_tokens), bits_per_byte=sums.nll_sum / math.log(2) / sums.n_bytes
    )
    points = plots.checkpoint_points(summary, frames["compare"], "ppl")
    assert points.step.tolist() == [2, 10, 100, 1000] and points.attrs["by_step"]
    assert points.low.isna().tolist() == [True, False, False, False]  # the baseline has no bar
    assert (points.low.dropna() > 0).all() and (points.low <= points.value).iloc[1:].all()
    path = tmp_path / "checkpoints.png"
    written = compare_runs_module.write_compare(tmp_path, frames, summary)
    assert path in written and path.read_bytes().startswith(PNG_SIGNATURE)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
