"""The bundled offline demo: `lmeval run configs/demo.yaml` on a fresh machine, no hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "lmeval" / "assets" / "demo"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lmeval", "run", str(REPO / "configs" / "demo.yaml"), f"output.dir={out}", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_demo_writes_every_file(demo_run):
    out, stdout = demo_run
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
    assert "final" in stdout and "ppl" in stdout


def test_final_checkpoint_beats_early_and_learned_something(demo_run):
    out, _ = demo_run
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    vocab = json.loads((ASSETS / "final" / "config.json").read_text())["vocab_size"]
    assert summary.loc["final", "ppl"] < summary.loc["early", "ppl"]
    assert summary.loc["final", "bits_per_byte"] < summary.loc["early", "bits_per_byte"]
    assert summary.loc["final", "ppl"] < vocab / 20  # far below uniform guessing over the vocabulary


def test_comparison_finds_final_better(demo_run):
    out, stdout = demo_run
    compare = pd.read_csv(out / "compare.csv").set_index("metric")
    for metric in ("bits_per_token", "bits_per_byte"):
        row = compare.loc[metric]
        assert row.model == "final" and row.baseline == "early"
        assert row.delta < 0 and row.ci_high < 0  # better, with a CI that excludes 0
    assert "bits_per_byte" in stdout and (out / "checkpoints.png").is_file()


def test_matches_the_training_scripts_float64_reference(demo_run):
    """train_log.json holds each book's nll_sum from a float64 log-softmax of the full logits,
    computed by the training script itself: an independent oracle for the whole pipeline."""
    out, _ = demo_run
    reference = json.loads((ASSETS / "train_log.json").read_text())["heldout_eval"]
    documents = pd.read_parquet(out / "documents.parquet")
    for model in ("early", "final"):
        ours = documents[documents.model == model].set_index("doc_id")
        for book, ref in reference[model]["per_doc"].items():
            assert ours.loc[book, "n_tokens"] == ref["tokens"]
            assert ours.loc[book, "nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-5)


def test_bundled_models_load_offline():
    code = (
        "from lmeval.model.loading import load_model; from lmeval.model.spec import ModelSpec;"
        f"lm = load_model(ModelSpec(path={str(ASSETS / 'final')!r}));"
        "print(lm.vocab_size, lm.max_positions)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", "256"]


def test_assets_fit_their_budgets():
    for checkpoint in ("early", "final"):
        size = sum(f.stat().st_size for f in (ASSETS / checkpoint).iterdir())
        assert size <= 4 * 2**20, checkpoint
    assert (ASSETS / "heldout.jsonl").stat().st_size <= 300 * 1024


def test_packaged_demo_config_is_the_clones_protocol():
    """The config shipped inside the package (what `lmeval demo` runs from a wheel) and the
    clone's configs/demo.yaml name the same models, data and protocol."""
    from lmeval.engine.config import load_config
    from lmeval.engine.demo import demo_config_path

    packaged, clone = load_config(demo_config_path()), load_config(REPO / "configs" / "demo.yaml")
    assert demo_config_path().is_relative_to(REPO / "lmeval")  # package data, not a clone file
    for section in ("models", "data", "scoring", "calibration", "compare"):
        assert getattr(packaged, section) == getattr(clone, section), section


def test_lmeval_demo_writes_runs_demo_in_the_current_folder(tmp_path, monkeypatch, capsys):
    from lmeval.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "-q", "data.max_documents=2"]) == 0  # the packaged config, by its package path
    out = tmp_path / "runs" / "demo"
    assert (out / "run.json").is_file() and (out / "compare.csv").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["source"].endswith(os.path.join("lmeval", "configs", "demo.yaml"))
    assert "wrote " + str(out) in capsys.readouterr().out
