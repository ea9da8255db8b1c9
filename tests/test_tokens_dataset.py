"""Token tables as a partitioned dataset (`output.tokens_layout`): a folder of one parquet file
per part that pandas, pyarrow, polars and DuckDB read as the one table the file layout writes,
row for row; `auto` picks it above a size and for streams; --overwrite switches layouts
without leaving a stale table; the word table's second pass, sharded merges and the run
comparison read and write it as they do the file."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import lmeval
from conftest import CORPUS
from helpers import assert_same_tables, read_tables, two_model_config, write_config, write_jsonl
from lmeval.engine import files as files_module
from lmeval.engine.compare_runs import read_run
from lmeval.engine.config import load_config
from lmeval.engine.files import TokenDataset, token_layout
from lmeval.engine.schemas import TOKENS
from lmeval.engine.shards import merge, run_shard

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 3 + 1) % len(CORPUS)]}" for i in range(16)]


def run(config, out, *overrides):
    return lmeval.run(str(config), [f"output.dir={out}", *overrides], show_progress=False)


@pytest.fixture
def both_layouts(tmp_path, saved_gpt2):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS)
    run(config, tmp_path / "file", "output.tokens_layout=file")
    run(config, tmp_path / "dataset", "output.tokens_layout=dataset")
    return tmp_path / "file", tmp_path / "dataset"


def test_the_folder_holds_the_files_rows_in_order_for_every_reader(both_layouts):
    file, dataset = both_layouts
    assert not (dataset / "tokens.parquet").exists() and not (file / "tokens").exists()
    one = pd.read_parquet(file / "tokens.parquet")
    parts = sorted((dataset / "tokens").iterdir())
    assert [p.name for p in parts] == [f"part-{i:06d}.parquet" for i in range(len(parts))]  # no temporary left
    # one file per part of each model, in the table's order: every model's parts, model by model
    assert len(parts) > 4 and all(pq.read_metadata(p).num_rows > 0 for p in parts)
    models = [pd.read_parquet(p, columns=["model"]).model.unique().tolist() for p in parts]
    assert all(len(m) == 1 for m in models) and [m[0] for m in models] == sorted(m[0] for m in models)
    pd.testing.assert_frame_equal(pd.read_parquet(dataset / "tokens"), one, check_exact=True)
    pd.testing.assert_frame_equal(pq.read_table(dataset / "tokens").to_pandas(), one, check_exact=True)
    assert_same_tables(read_tables(dataset), read_tables(file))
    for name in ("compare.csv", "compare_tokens.csv", "compare_documents.csv", "calibration.csv"):
        assert (dataset / name).read_bytes() == (file / name).read_bytes(), name
    record = json.loads((dataset / "run.json").read_text())
    assert record["tokens_layout"] == {
        "layout": "dataset",
        "why": "output.tokens_layout: dataset",
        "tables": {"tokens.parquet": "tokens"},
    }
    assert json.loads((file / "run.json").read_text())["tokens_layout"]["layout"] == "file"


def test_polars_and_duckdb_read_the_folder_as_one_table(both_layouts):
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    file, dataset = both_layouts
    one = pd.read_parquet(file / "tokens.parquet")
    polars = pl.read_parquet(dataset / "tokens" / "*.parquet")
    assert polars.columns == list(one.columns) and polars.height == len(one)
    assert polars["token"].to_list() == one["token"].tolist()
    np.testing.assert_array_equal(polars["nll"].to_numpy(), one["nll"].to_numpy())
    pattern = str(dataset / "tokens" / "*.parquet")
    rows = duckdb.sql(
        f"select model, count(*), sum(nll::double) from read_parquet('{pattern}') group by model order by model"
    )
    expected = one.assign(nll=one.nll.astype(np.float64)).groupby("model").nll.agg(["count", "sum"])
    for model, count, total in rows.fetchall():
        assert count == expected.loc[model, "count"]
        assert total == pytest.approx(expected.loc[model, "sum"], rel=1e-12)


def test_auto_chooses_a_folder_above_the_size_and_for_a_stream(tmp_path, saved_gpt2, monkeypatch):
    assert token_layout("auto", None)[0] == "dataset" and "stream" in token_layout("auto", None)[1]
    assert token_layout("auto", 10**6) == (
        "file",
        f"auto: the corpus holds 1,000,000 characters, at most {files_module.TOKENS_DATASET_ABOVE_CHARS:,}",
    )
    assert token_layout("file", None)[0] == "file" and token_layout("dataset", 1)[0] == "dataset"
    config = two_model_config(tmp_path, saved_gpt2, TEXTS[:4])
    run(config, tmp_path / "small")
    assert (tmp_path / "small" / "tokens.parquet").is_file()
    n_chars = sum(len(t) for t in TEXTS[:4])
    monkeypatch.setattr(files_module, "TOKENS_DATASET_ABOVE_CHARS", n_chars - 1)
    run(config, tmp_path / "large")
    assert (tmp_path / "large" / "tokens").is_dir() and not (tmp_path / "large" / "tokens.parquet").exists()
    why = json.loads((tmp_path / "large" / "run.json").read_text())["tokens_layout"]["why"]
    assert why == f"auto: the corpus holds {n_chars:,} characters, above {n_chars - 1:,}"
    assert_same_tables(read_tables(tmp_path / "large"), read_tables(tmp_path / "small"))


def token_entries(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("tokens", ".tokens")))


def test_overwrite_switches_layout_and_leaves_no_stale_table(tmp_path, saved_gpt2):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS[:4])
    out = tmp_path / "out"
    run(config, out, "output.tokens_layout=dataset")
    reference = pd.read_parquet(out / "tokens")
    # what a run killed mid-merge leaves: a half-built folder, and an old one set aside
    (out / ".tokens.tmp-99").mkdir()
    (out / ".tokens.tmp-99" / "part-000000.parquet").write_bytes(b"half")
    (out / ".tokens.old-99").mkdir()
    lmeval.run(str(config), ["output.tokens_layout=file"], overwrite=True, show_progress=False)
    assert token_entries(out) == ["tokens.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tokens.parquet"), reference, check_exact=True)
    lmeval.run(str(config), ["output.tokens_layout=dataset"], overwrite=True, show_progress=False)
    assert token_entries(out) == ["tokens"]
    lmeval.run(str(config), ["output.tokens_layout=dataset"], overwrite=True, show_progress=False)  # folder over folder
    assert token_entries(out) == ["tokens"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tokens"), reference, check_exact=True)


def test_an_aborted_folder_leaves_nothing(tmp_path):
    writer = TokenDataset(tmp_path / "tokens")
    writer.write(TOKENS.empty_table().to_pandas())
    assert writer.tmp.parent == tmp_path and (writer.tmp / "part-000000.parquet").is_file()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore")
def test_the_word_tables_second_pass_rewrites_each_file_of_the_folder(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS[:6])])
    config = write_config(
        tmp_path,
        f"models: [{{name: tiny, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        "scoring: {batch_tokens: 96, max_length: 24, stride: 16}\n"
        "output: {dir: out, part_chars: 200, per_token: false}\nanalysis: {positions: false, words: true}\n",
    )
    run(config, tmp_path / "file", "output.tokens_layout=file")
    run(config, tmp_path / "dataset", "output.tokens_layout=dataset")
    files = sorted((tmp_path / "dataset" / "words").iterdir())
    assert len(files) > 1
    words = pd.read_parquet(tmp_path / "file" / "words.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dataset" / "words"), words, check_exact=True)
    assert words.columns.size > 5  # the second pass's columns are in every file
    assert all(list(pd.read_parquet(f).columns) == list(words.columns) for f in files)


def test_shards_merge_into_a_folder_with_the_one_process_rows(tmp_path, saved_gpt2):
    config = two_model_config(tmp_path, saved_gpt2, TEXTS, part_chars=200)
    run(config, tmp_path / "reference", "output.tokens_layout=file")
    reference = read_tables(tmp_path / "reference")
    text = config.read_text().replace("part_chars: 200", "part_chars: 200, tokens_layout: dataset")
    config.write_text(text)
    for shard in range(2):
        run_shard(load_config(config), shard, 2, show_progress=False)
    tables = merge(tmp_path / "out", return_tokens=True)
    assert (tmp_path / "out" / "tokens").is_dir()
    pd.testing.assert_frame_equal(tables["tokens"].reset_index(drop=True), reference["tokens"], check_exact=True)
    assert_same_tables(read_tables(tmp_path / "out"), reference)


def test_comparing_finished_runs_reads_a_folder_as_the_file(both_layouts):
    file, dataset = both_layouts
    pd.testing.assert_frame_equal(read_run(dataset)["tokens"], read_run(file)["tokens"], check_exact=True)
