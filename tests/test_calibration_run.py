"""Calibration and label smoothing through `lmeval run`, checked against the model's own logits."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import lmeval
from conftest import CORPUS
from helpers import write_config, write_jsonl
from lmeval.cli import main

EPS = [0.0, 0.05, 0.1]
TEMPS = [0.7, 1.0, 1.3]


@pytest.fixture
def calib_run(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in CORPUS])
    config = write_config(
        tmp_path,
        f"""
models: [{{name: tiny, path: {saved_gpt2}}}]
data: {{path: docs.jsonl}}
scoring: {{max_length: 64}}
calibration: {{bins: 10, label_smoothing: [0.0, 0.05, 0.1], temperatures: [0.7, 1.0, 1.3]}}
output: {{dir: out}}
""",
    )
    return tmp_path, config, lmeval.run(str(config), show_progress=False)


def full_logits(model_dir, tokenizer_texts):
    """Every document's full logits from one plain forward: the oracle's input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    logits, targets = [], []
    for text in tokenizer_texts:
        ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits.append(model(torch.tensor([ids])).logits[0, :-1].double())
        targets.append(torch.tensor(ids[1:]))
    return torch.cat(logits), torch.cat(targets)


def oracle_ece(conf, correct, bins):
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        inside = (conf >= edges[b]) & ((conf < edges[b + 1]) if b < bins - 1 else (conf <= 1))
        if inside.any():
            total += inside.sum() / len(conf) * abs(correct[inside].mean() - conf[inside].mean())
    return total


def test_summary_columns_and_values_match_full_logits(calib_run, saved_gpt2):
    _folder, _, tables = calib_run
    row = tables["summary"].iloc[0]
    z, y = full_logits(saved_gpt2, CORPUS)
    q = torch.softmax(z, dim=1)
    vocab = z.shape[1]
    for eps in EPS:
        label = f"{eps}"
        ce = F.cross_entropy(z, y, label_smoothing=eps).item()
        a, b = 1 - eps + eps / vocab, eps / vocab
        h = -(a * math.log(a) + (vocab - 1) * (b * math.log(b) if b > 0 else 0.0))
        assert row[f"ce_eps{label}"] == pytest.approx(ce, abs=1e-5)
        assert row[f"h_eps{label}"] == pytest.approx(h, abs=1e-9)
        assert row[f"kl_eps{label}"] == pytest.approx(ce - h, abs=1e-5) and row[f"kl_eps{label}"] >= 0
    onehot = F.one_hot(y, vocab).double()
    assert row.brier == pytest.approx(((q - onehot) ** 2).sum(1).mean().item(), abs=1e-6)
    conf = q.max(1).values.numpy()
    correct = (q.argmax(1) == y).double().numpy()
    assert row.ece == pytest.approx(oracle_ece(conf, correct, 10), abs=1e-5)
    assert row.top1_accuracy == pytest.approx(correct.mean())
    assert row.confidence_mean == pytest.approx(conf.mean(), abs=1e-6)
    temperature = tables["temperature"]
    assert list(temperature.columns) == ["model", "temperature", "nll_mean", "ece"]
    for t in TEMPS:
        at = temperature[temperature.temperature == t].iloc[0]
        nll_t = F.cross_entropy(z / t, y).item()
        conf_t = torch.softmax(z / t, 1).max(1).values.numpy()
        assert at.nll_mean == pytest.approx(nll_t, abs=1e-5)
        assert at.ece == pytest.approx(oracle_ece(conf_t, correct, 10), abs=1e-5)
    assert temperature[temperature.temperature == 1.0].nll_mean.iloc[0] == pytest.approx(row.nll_mean, abs=1e-9)
    best = temperature.loc[temperature.nll_mean.idxmin(), "temperature"]
    assert row.best_temperature == best


@pytest.mark.figures
def test_calibration_files(calib_run):
    folder, _, _ = calib_run
    bins = pd.read_csv(folder / "out" / "calibration.csv")
    assert list(bins.columns) == ["model", "bin", "lo", "hi", "n_tokens", "confidence_mean", "accuracy"]
    assert len(bins) == 10
    png = (folder / "out" / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(folder / "out" / "reliability.png").shape[0] > 100
    summary = pd.read_csv(folder / "out" / "summary.csv")
    for column in (
        "ece",
        "mce",
        "brier",
        "top1_accuracy",
        "confidence_mean",
        "entropy_mean",
        "best_temperature",
        "ce_eps0.1",
        "h_eps0.1",
        "kl_eps0.1",
        "ce_eps0.05",
        "ce_eps0.0",
    ):
        assert column in summary.columns, column


def test_equal_mass_bins(calib_run):
    folder, config, _ = calib_run
    tables = lmeval.run(str(config), ["calibration.binning=mass", f"output.dir={folder / 'mass'}"], show_progress=False)
    counts = tables["calibration"].n_tokens
    assert counts.max() - counts.min() <= max(2, counts.sum() // 10)


@pytest.mark.parametrize(
    "override, words",
    [
        ("calibration.label_smoothing=[0.1, 1.0]", "calibration.label_smoothing[1]"),
        ("calibration.label_smoothing=[-0.1]", "calibration.label_smoothing[0]"),
        ("calibration.temperatures=[1.0, 0]", "calibration.temperatures[1]"),
        ("calibration.temperatures=[-1]", "calibration.temperatures[0]"),
        ("calibration.bins=0", "calibration.bins"),
    ],
)
def test_bad_calibration_options(override, words, calib_run, capsys):
    _, config, _ = calib_run
    assert main(["validate", str(config), override]) == 2
    assert words in capsys.readouterr().err
