"""`lmeval run --model M --data D`: the same Config, tables and run.json as the YAML it stands
for; `--print-config` round trips; the shipped lm-eval wikitext config; `--version`, epilogs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from lmeval.cli import build_parser, main
from lmeval.engine.config import config_from_options, config_to_yaml, load_config, raw_config_from_options
from lmeval.engine.detokenize import wikitext_detokenizer

PACKAGE = Path(lmeval.__file__).resolve().parent
TABLES = ("tokens.parquet", "documents.parquet", "summary.csv", "calibration.csv", "temperature.csv")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_tables(out: Path) -> dict:
    tables = {n: pd.read_parquet(out / n) if n.endswith(".parquet") else pd.read_csv(out / n) for n in TABLES}
    tables["summary"] = tables.pop("summary.csv").drop(columns="tokens_per_second")  # wall-clock, not a result
    return tables


def assert_same_run(a: Path, b: Path) -> None:
    """Identical tables and identical run.json protocol and config (up to output.dir/source)."""
    left, right = read_tables(a), read_tables(b)
    for name in left:
        pd.testing.assert_frame_equal(left[name], right[name], check_exact=True, obj=name)
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert ra["protocol"] == rb["protocol"]
    for record in (ra, rb):
        record["config"]["output"].pop("dir"), record["config"].pop("source")
    assert ra["config"] == rb["config"] and ra["data"] == rb["data"] and ra["models"] == rb["models"]


def test_flags_yaml_and_printed_config_give_identical_runs(tmp_path, saved_gpt2, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative flags resolve against the current folder
    flags = [
        "--model",
        str(saved_gpt2),
        "--data",
        corpus.name,
        "--text-field",
        "text",
        "--max-length",
        "16",
        "--stride",
        "8",
    ]
    assert main(["run", *flags, "--out", "by-flags", "-q", "scoring.batch_tokens=64"]) == 0
    # The YAML file the flags stand for.
    (tmp_path / "same.yaml").write_text(
        f"models: [{{path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl}}\n"
        "scoring: {max_length: 16, stride: 8, batch_tokens: 64}\noutput: {dir: by-yaml}\n",
        encoding="utf-8",
    )
    assert main(["run", "same.yaml", "-q"]) == 0
    assert_same_run(tmp_path / "by-flags", tmp_path / "by-yaml")
    record = json.loads((tmp_path / "by-flags" / "run.json").read_text())
    assert (
        record["protocol"]["models"]["tiny-gpt2"]["max_length"],
        record["protocol"]["models"]["tiny-gpt2"]["stride"],
    ) == (16, 8)
    # --print-config: runs nothing, prints a complete config (defaults included) ...
    capsys.readouterr()
    assert main(["run", *flags, "--out", "printed", "scoring.batch_tokens=64", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "printed").exists()
    assert set(re.findall(r"^(\w+):", printed, flags=re.M)) == {
        "models",
        "data",
        "scoring",
        "output",
        "calibration",
        "compare",
        "analysis",
    }
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    # ... which, fed back to `lmeval run`, reproduces the run ...
    assert main(["run", "printed.yaml", "-q"]) == 0
    assert_same_run(tmp_path / "by-flags", tmp_path / "printed")
    # ... and prints itself again unchanged.
    capsys.readouterr()
    assert main(["run", "printed.yaml", "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_printed_yaml_loads_back_into_an_equal_config(tmp_path, saved_gpt2, corpus):
    options = raw_config_from_options(
        [str(saved_gpt2), "gpt2"],
        str(corpus),
        data_name=None,
        split="train",
        max_length=32,
        stride=16,
        out=str(tmp_path / "o"),
    )
    config = config_from_options(None, options, ["calibration.label_smoothing=[0.0, 0.2]", "scoring.separator='\n'"])
    (tmp_path / "c.yaml").write_text(config_to_yaml(config), encoding="utf-8")
    again = load_config(tmp_path / "c.yaml")
    assert dataclasses.replace(again, source=None) == dataclasses.replace(config, source=None)
    assert [m.path for m in again.models] == [str(saved_gpt2), "gpt2"]  # a hub id stays a hub id


def test_flags_lay_over_a_config_file(tmp_path, saved_gpt2, corpus, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("models: [{path: gpt2}]\ndata: {path: elsewhere.jsonl, id_field: id}\nscoring: {stride: 4}\n")
    assert main(["run", str(config), "--model", str(saved_gpt2), "--data", str(corpus), "--print-config"]) == 0
    printed = capsys.readouterr().out
    import yaml

    raw = yaml.safe_load(printed)
    assert [m["path"] for m in raw["models"]] == [str(saved_gpt2)]
    assert raw["data"]["path"] == str(corpus) and raw["data"]["id_field"] == "id"  # other keys kept
    assert raw["scoring"]["stride"] == 4


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run"], "both --model and --data, must be given (got neither)"),
        (["run", "--model", "gpt2"], "(got --model only)"),
        (["validate", "--data", "x.jsonl"], "(got --data only)"),
        (["run", "--model", "gpt2", "--data", "d.jsonl", "--stride", "0"], "--stride: must be an integer >= 1"),
        (["run", "missing.yaml"], "config file not found"),
    ],
)
def test_missing_or_bad_options_are_named(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = None
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err


def test_overrides_after_flags_without_a_config(tmp_path, saved_gpt2, corpus, capsys):
    argv = ["run", "--model", str(saved_gpt2), "--data", str(corpus), "scoring.bos=none", "--print-config"]
    assert main(argv) == 0
    assert "bos: none" in capsys.readouterr().out


def test_version_and_every_subcommand_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lmeval {lmeval.__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"run", "demo", "validate", "surprisal", "compare"}
    for name, command in sub.choices.items():
        assert command.epilog and "examples:" in command.epilog and f"lmeval {name}" in command.epilog, name


def test_validate_leaves_torch_unloaded_with_flags(tmp_path, corpus):
    code = (
        f"from lmeval.cli import main; assert main(['validate', '--model', 'gpt2', '--data', {str(corpus)!r}]) == 0\n"
        "import sys; assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------
# lm-evaluation-harness's wikitext protocol
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((PACKAGE / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_packaged_config_validates(path):
    load_config(path)


def test_shipped_wikitext_config_validates_offline_by_name(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # The corpus's column is `text`, the config's `page`: validate refuses what run would refuse.
    assert main(["validate", "lm_eval_wikitext", f"data.path={corpus}", "--model", "gpt2"]) == 2
    assert "data.text_field: 'page' must be a column" in capsys.readouterr().err
    assert main(["validate", "lm_eval_wikitext", f"data.path={corpus}", "data.text_field=text", "--model", "gpt2"]) == 0
    config = load_config(PACKAGE / "configs" / "lm_eval_wikitext.yaml")
    assert (config.data.path, config.data.name, config.data.split) == (
        "EleutherAI/wikitext_document_level",
        "wikitext-2-raw-v1",
        "test",
    )
    assert (config.data.text_field, config.data.detokenizer, config.data.count_on) == ("page", "wikitext", "source")
    assert config.scoring.max_length is None and config.scoring.stride is None and config.scoring.bos == "auto"
    assert main(["run", "lm_eval_wikitext", "--model", "gpt2", "--print-config"]) == 0
    assert f"dir: {tmp_path / 'runs' / 'lm_eval_wikitext'}" in capsys.readouterr().out  # never inside the package


PAGES = [
    (
        " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a "
        "guest @-@ starring role on the television series The Bill in 2000 . \n"
    ),
    (
        " = = Career = = \n In 2006 , Boulter starred alongside Whishaw in the play Citizenship ( written by "
        'Mark Ravenhill ) . It was 4 @,@ 000 feet , or 1 @.@ 2 km ; it \'s " hot " : 30 ° C ! \n'
    ),
]


def test_wikitext_detokenizer_gold():
    assert wikitext_detokenizer("a @-@ b , c ( d ) = = H = = 3 ° C it 's") == "a-b, c (d) == H == 3°C it's"


def test_wikitext_detokenizer_matches_lm_eval():
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm-eval is not installed (pip install lmeval[bench])")
    path = Path(spec.submodule_search_locations[0]) / "tasks" / "wikitext" / "preprocess_wikitext.py"
    ref_spec = importlib.util.spec_from_file_location("preprocess_wikitext", path)  # no lm_eval package import
    ref = importlib.util.module_from_spec(ref_spec)
    ref_spec.loader.exec_module(ref)
    for page in PAGES:
        assert wikitext_detokenizer(page) == ref.wikitext_detokenizer({"page": page})


def test_wikitext_protocol_scores_detokenized_text_and_counts_the_source(tmp_path, saved_gpt2, gpt2_pair):
    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"page": p}) + "\n" for p in PAGES), encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "run",
        "lm_eval_wikitext",
        "--model",
        str(saved_gpt2),
        f"data.path={data}",
        "data.split=train",
        "scoring.max_length=16",
        f"output.dir={out}",
        "-q",
    ]
    assert main(argv) == 0
    summary = pd.read_csv(out / "summary.csv").iloc[0]
    # Oracle: loglikelihood_rolling over the detokenized pages (score_texts, stride = L, BOS
    # prefix), normalised by the ORIGINAL page's words and bytes, as lm-eval's process_results.
    tokens = lmeval.score_texts([wikitext_detokenizer(p) for p in PAGES], gpt2_pair, max_length=16)
    nll = tokens.nll.astype(np.float64).sum()
    words = sum(len(re.split(r"\s+", p)) for p in PAGES)
    n_bytes = sum(len(p.encode("utf-8")) for p in PAGES)
    assert summary.word_ppl == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert summary.byte_ppl == pytest.approx(math.exp(nll / n_bytes), rel=1e-6)
    assert summary.bits_per_byte == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)
    assert summary.n_tokens == len(tokens)
    docs = tokens.groupby("doc_id").nll.apply(lambda s: math.exp(s.astype(np.float64).mean()))
    assert summary.ppl_doc_mean == pytest.approx(docs.mean(), rel=1e-6)  # HF evaluate's mean_perplexity


def test_count_on_source_refuses_unscored_first_tokens(tmp_path, corpus, capsys):
    argv = ["validate", "lm_eval_wikitext", f"data.path={corpus}", "scoring.bos=none"]
    assert main(argv) == 2
    assert "data.count_on: source" in capsys.readouterr().err
