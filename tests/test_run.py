"""`lmeval run` end to end through the CLI, on a tiny local model and a small corpus."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import write_config, write_jsonl
from lmeval.cli import main
from lmeval.engine.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(CORPUS)] + [{"id": "blank", "text": "  \n "}]


@pytest.fixture
def workspace(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    config = write_config(
        tmp_path,
        f"""
models:
  - {{name: tiny, path: {saved_gpt2}}}
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 256}}
output: {{dir: out}}
""",
    )
    return tmp_path, config


def test_end_to_end_tables_agree(workspace, saved_gpt2):
    folder, config = workspace
    assert main(["run", str(config), "-q"]) == 0
    out = folder / "out"
    for name in (
        "tokens.parquet",
        "documents.parquet",
        "summary.csv",
        "calibration.csv",
        "temperature.csv",
        "reliability.png",
        "run.json",
    ):
        assert (out / name).is_file(), name
    tokens = pd.read_parquet(out / "tokens.parquet")
    documents = pd.read_parquet(out / "documents.parquet")
    summary = pd.read_csv(out / "summary.csv")
    row = summary.iloc[0]
    assert row.ppl == pytest.approx(math.exp(tokens.nll.astype(np.float64).sum() / len(tokens)), rel=1e-9)
    assert row.n_tokens == len(tokens) and row.n_skipped == 1 and row.n_documents == len(CORPUS)
    per_doc = tokens.groupby("doc_id").nll.apply(lambda s: s.astype(np.float64).sum())
    np.testing.assert_allclose(documents.set_index("doc_id").nll_sum[per_doc.index], per_doc, rtol=1e-12)
    assert row.bits_per_byte == pytest.approx(documents.nll_sum.sum() / math.log(2) / documents.n_bytes.sum())
    assert row.word_ppl == pytest.approx(math.exp(documents.nll_sum.sum() / documents.n_words.sum()))
    # The same numbers as the scoring core's API on the same texts.
    api = lmeval.score_texts(CORPUS, str(saved_gpt2), max_length=16)
    np.testing.assert_allclose(tokens.nll.to_numpy(), api.nll.to_numpy(), atol=1e-6)
    record = json.loads((out / "run.json").read_text())
    assert record["protocol"]["models"]["tiny"]["max_length"] == 16
    assert record["data"]["fingerprint"] and record["models"]["tiny"]["files"]
    assert "pooled" in record["protocol"]["aggregation"]
    # where the wall time went: setup (the corpus, the model and its probes), then scoring, then the finish
    before, after = record["seconds_before_first_part"], record["seconds_after_last_part"]
    assert before > 0 and after > 0 and before + after < record["seconds"]
    assert record["tokens_layout"] == {
        "layout": "file",
        "why": f"auto: the corpus holds {sum(map(len, CORPUS))} characters, at most 400,000,000",  # the blank skipped
        "tables": {"tokens.parquet": "tokens.parquet"},
    }


def test_python_api_returns_tables(workspace):
    folder, config = workspace
    tables = lmeval.run(str(config), ["output.dir=" + str(folder / "api")], show_progress=False)
    assert set(tables) >= {"tokens", "documents", "summary", "calibration", "temperature"}
    assert (folder / "api" / "summary.csv").exists()


def test_two_models_two_rows(workspace, saved_gpt2):
    _folder, config = workspace
    config.write_text(
        config.read_text().replace(
            f"  - {{name: tiny, path: {saved_gpt2}}}",
            f"  - {{name: a, path: {saved_gpt2}}}\n  - {{name: b, path: {saved_gpt2}}}",
        )
    )
    tables = lmeval.run(str(config), show_progress=False)
    assert tables["summary"].model.tolist() == ["a", "b"]
    assert tables["summary"].ppl.nunique() == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet", "txt"])
def test_formats_give_the_same_numbers(fmt, workspace):
    folder, config = workspace
    texts = [d["text"] for d in DOCS[:-1]]
    if fmt == "csv":
        pd.DataFrame(DOCS[:-1]).to_csv(folder / "docs.csv", index=False)
        data = ["data.path=" + str(folder / "docs.csv")]
    elif fmt == "parquet":
        pd.DataFrame(DOCS[:-1]).to_parquet(folder / "docs.parquet")
        data = ["data.path=" + str(folder / "docs.parquet")]
    else:
        (folder / "txt").mkdir()
        for d in DOCS[:-1]:
            (folder / "txt" / f"{d['id']}.txt").write_text(d["text"], encoding="utf-8")
        data = ["data.path=" + str(folder / "txt" / "*.txt"), "data.id_field=null"]
    reference = lmeval.run(str(config), ["output.dir=" + str(folder / "ref")], show_progress=False)
    other = lmeval.run(str(config), data + ["output.dir=" + str(folder / fmt)], show_progress=False)
    assert other["summary"].n_tokens.iloc[0] == reference["summary"].n_tokens.iloc[0]
    assert other["summary"].nll_sum.iloc[0] == pytest.approx(reference["summary"].nll_sum.iloc[0], rel=1e-9)
    assert sorted(other["documents"].n_bytes) == sorted(len(t.encode()) for t in texts)


def test_concatenated_mode(workspace, saved_gpt2):
    folder, config = workspace
    tables = lmeval.run(str(config), ["scoring.documents=concatenated"], show_progress=False)
    tokens, documents = tables["tokens"], tables["documents"]
    assert "<separator>" in set(documents.doc_id)
    # The stream's tokens are exactly those of the joined text, scored as one document.
    joined = "\n\n".join(CORPUS)
    stream = lmeval.score_texts([joined], str(saved_gpt2), max_length=16)
    assert len(tokens) == len(stream)
    assert tokens.nll.astype(np.float64).sum() == pytest.approx(stream.nll.astype(np.float64).sum(), rel=1e-6)
    # Each document's tokens slice back into that document's own text.
    texts = {d["id"]: d["text"] for d in DOCS}
    for row in tokens[tokens.doc_id != "<separator>"].itertuples():
        assert 0 <= row.char_start <= row.char_end <= len(texts[row.doc_id])
    assert documents.n_bytes.sum() == len(joined.encode())
    run_json = json.loads((folder / "out" / "run.json").read_text())
    assert run_json["protocol"]["models"]["tiny"]["documents"] == "concatenated"


def test_never_overwrites_without_flag(workspace, capsys):
    folder, config = workspace
    assert main(["run", str(config), "-q"]) == 0
    before = (folder / "out" / "summary.csv").stat().st_mtime_ns
    assert main(["run", str(config), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (folder / "out" / "summary.csv").stat().st_mtime_ns == before
    assert main(["run", str(config), "-q", "--overwrite"]) == 0


def test_all_config_errors_in_one_message(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    config = write_config(
        tmp_path,
        """
models:
  - {path: ./no-such-model}
data: {path: docs.jsonl, text_feild: text}
scoring: {batch_tokens: "many", strid: 4}
""",
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "data.text_feild: unknown key. Did you mean 'text_field'?" in err
    assert "scoring.batch_tokens: must be an integer" in err
    assert "scoring.strid: unknown key. Did you mean 'stride'?" in err
    assert "models[0].path" in err and "does not exist" in err
    assert "4 problems" in err


def test_overrides_win_and_paths_resolve(workspace):
    folder, config = workspace
    loaded = load_config(config, ["scoring.stride=8", "scoring.max_length=32"])
    assert loaded.scoring.stride == 8 and loaded.scoring.max_length == 32
    assert loaded.data.path == str(folder / "docs.jsonl")
    assert loaded.output.dir == str(folder / "out")


def test_validate_command(workspace, capsys):
    _, config = workspace
    assert main(["validate", str(config)]) == 0
    assert main(["validate", str(config), "scoring.bos=first"]) == 2
    assert "scoring.bos" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path",
    sorted([*REPO.glob("configs/**/*.yaml"), *REPO.glob("lmeval/configs/**/*.yaml")]),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_every_shipped_config_validates(path):
    load_config(path)


@pytest.mark.parametrize(
    "rows, words",
    [
        ([{"id": "a", "body": "x"}], "Available columns: id, body"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "must be unique"),
        ([{"id": "a", "text": 5}], "it must be text"),
        ([{"id": "a", "text": None}, {"id": "b", "text": "ok"}], "null"),
        ([{"id": "a", "text": "  "}], "no non-empty documents"),
    ],
)
def test_data_errors(rows, words, workspace, capsys):
    folder, config = workspace
    write_jsonl(folder / "docs.jsonl", rows)
    assert main(["run", str(config), "-q"]) == 2
    assert words in capsys.readouterr().err


def test_missing_data_file(workspace, capsys):
    folder, config = workspace
    (folder / "docs.jsonl").unlink()
    assert main(["run", str(config), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
