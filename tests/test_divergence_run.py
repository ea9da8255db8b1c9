"""`compare: {divergence: true}` in `lmeval run`: the tables it writes agree with numpy and
with `lmeval.divergence`; interrupted (Ctrl-C or SIGKILL) it resumes to identical tables;
two ranks write the same tables as one; mixed tokenizers are refused before scoring; and
`lmeval surprisal --baseline` draws the same numbers."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import lmeval
from conftest import CORPUS, build_model, train_bpe
from helpers import finetuned, numpy_summary, write_config, write_jsonl
from lmeval import ConfigError, TokenizerMismatchError
from lmeval.analyses.divergence import SUMMARY_COLUMNS
from lmeval.cli import main
from lmeval.engine.parts import model_dirname, plan_groups
from lmeval.engine.schemas import DIVERGENCE

passes = importlib.import_module("lmeval.engine.passes")
TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 5 + 1) % len(CORPUS)]}" for i in range(10)]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_models, bpe_tokenizer):
    """A base and a nudged 'fine-tune' of the tiny GPT-2, saved as local folders."""
    folder = tmp_path_factory.mktemp("checkpoints")
    for name, model in (("base", tiny_models["gpt2"]), ("ft", finetuned(tiny_models["gpt2"], 0.2))):
        model.save_pretrained(folder / name)
        bpe_tokenizer.save_pretrained(folder / name)
    return folder / "base", folder / "ft"


def workspace(folder, checkpoints, extra: str = "", texts=TEXTS):
    base, ft = checkpoints
    write_jsonl(folder / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    return write_config(
        folder,
        f"""
models: [{{name: ft, path: {ft}}}, {{name: base, path: {base}}}]
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 64}}
output: {{dir: out, part_chars: 300}}
compare: {{baseline: base, divergence: true, bootstrap: 200, top_k: 7}}
{extra}""",
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoints):
    folder = tmp_path_factory.mktemp("reference")
    config = workspace(folder, checkpoints)
    tables = lmeval.run(str(config), show_progress=False)
    return folder, config, tables


def read_divergence(out):
    return {
        "divergence.parquet": pd.read_parquet(out / "divergence.parquet"),
        "divergence.csv": pd.read_csv(out / "divergence.csv"),
        "divergence_tokens.csv": pd.read_csv(out / "divergence_tokens.csv", keep_default_na=False),
    }


def assert_same(a: dict, b: dict):
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def test_run_writes_the_divergence_tables(reference, checkpoints):
    folder, _, tables = reference
    out = folder / "out"
    assert not (out / "parts").exists()
    assert pq.read_schema(out / "divergence.parquet").remove_metadata().equals(DIVERGENCE)
    per_token = pd.read_parquet(out / "divergence.parquet")
    assert set(per_token.model) == {"ft"} and set(per_token.baseline) == {"base"}
    summary = pd.read_csv(out / "divergence.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS and len(summary) == 1
    row = summary.iloc[0]
    for key, value in numpy_summary(per_token, 200, 0).items():  # the csv equals numpy over the parquet
        assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # ln PPL(model) - ln PPL(base) agrees with the run's own summary of each model.
    ppl = tables["summary"].set_index("model").ppl
    assert row.ln_ppl_ratio == pytest.approx(np.log(ppl["ft"]) - np.log(ppl["base"]), abs=1e-5)
    # Both nlls are the run's own per-token nll of each model, token for token.
    tokens = pd.read_parquet(out / "tokens.parquet")
    for column, name in (("nll_y", "ft"), ("nll_baseline", "base")):  # nll_x: the tokens table's
        mine = tokens[tokens.model == name].merge(per_token, on=["doc_id", "position"], validate="1:1")
        assert len(mine) == len(per_token) and (mine.token_id_x == mine.token_id_y).all()
        np.testing.assert_allclose(mine[column], mine["nll_x"], rtol=1e-6, atol=1e-6)
    # The same per-token numbers as the Python API on the same texts.
    api = lmeval.divergence(TEXTS, str(checkpoints[1]), str(checkpoints[0]), max_length=16)
    ordered = per_token.assign(doc=per_token.doc_id.str[1:].astype(int)).sort_values(["doc", "position"])
    for key in ("kl", "kl_reverse", "delta_p", "nll", "nll_baseline"):
        np.testing.assert_allclose(ordered[key], api[key], atol=1e-6, rtol=1e-6, err_msg=key)
    # The top tokens are the largest KLs of the table, with their text and context.
    top = pd.read_csv(out / "divergence_tokens.csv", keep_default_na=False)
    assert len(top) == 7
    np.testing.assert_allclose(top.kl, np.sort(per_token.kl.to_numpy())[::-1][:7], rtol=1e-6)
    texts = {f"d{i}": t for i, t in enumerate(TEXTS)}
    for r in top.itertuples():
        assert r.token_text == texts[r.doc_id][r.char_start : r.char_end]
        assert texts[r.doc_id][: r.char_start].endswith(r.context)
    assert (out / "divergence.png").read_bytes()[:8] == PNG
    record = json.loads((out / "run.json").read_text())
    assert record["divergence"]["baseline"] == "base" and record["divergence"]["models"] == ["ft"]
    assert record["divergence"]["protocol"]["ft"]["max_length"] == 16


def test_ctrl_c_during_the_divergence_pass_resumes_to_identical_tables(reference, checkpoints, tmp_path, monkeypatch):
    ref_folder = reference[0]
    config = workspace(tmp_path, checkpoints)
    real, written = passes.write_part, []

    def interrupt_after_two(path, columns, meta):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        real(path, columns, meta)

    monkeypatch.setattr(passes, "write_part", interrupt_after_two)
    assert main(["run", str(config), "-q"]) == 130
    pair_parts = tmp_path / "out" / "parts" / model_dirname("ft")  # ft's pass is the pair's (ft comes first)
    assert len(list(pair_parts.glob("*.parquet"))) == 2
    written.clear()
    monkeypatch.setattr(passes, "write_part", lambda p, c, m: (written.append(p), real(p, c, m)))
    assert main(["run", str(config), "-q"]) == 0
    n_groups = len(plan_groups([len(t) for t in TEXTS], 300))
    assert (
        len([p for p in written if p.parent == pair_parts]) == n_groups - 2
    )  # only the missing groups were scored again
    assert_same(read_divergence(tmp_path / "out"), read_divergence(ref_folder / "out"))


@pytest.mark.slow
def test_sigkill_mid_divergence_then_rerun_gives_identical_tables(reference, checkpoints, tmp_path):
    config = workspace(tmp_path, checkpoints)
    command = [sys.executable, "-m", "lmeval", "run", str(config), "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "out" / "parts" / model_dirname("ft")
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.rglob("*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same(read_divergence(tmp_path / "out"), read_divergence(reference[0] / "out"))


@pytest.mark.slow
def test_two_ranks_write_the_same_divergence_tables(reference, checkpoints, tmp_path):
    from helpers import run_ranks

    config = workspace(tmp_path, checkpoints)
    done = run_ranks(config, nproc=2, timeout=600)
    assert done.returncode == 0, done.stderr
    ours, ref = read_divergence(tmp_path / "out"), read_divergence(reference[0] / "out")
    pd.testing.assert_frame_equal(ours["divergence.parquet"], ref["divergence.parquet"], check_exact=False, atol=1e-6)
    numeric = ref["divergence.csv"].select_dtypes("number").columns
    np.testing.assert_allclose(ours["divergence.csv"][numeric], ref["divergence.csv"][numeric], rtol=1e-5, atol=1e-7)


def test_mixed_tokenizers_are_refused_before_any_scoring(tmp_path, checkpoints):
    other_tokenizer = train_bpe(tmp_path, vocab_size=300)
    other = tmp_path / "other"
    build_model("gpt2", len(other_tokenizer)).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": TEXTS[0]}])
    config = write_config(
        tmp_path,
        f"""
models: [{{name: other, path: {other}}}, {{name: base, path: {checkpoints[0]}}}]
data: {{path: docs.jsonl, id_field: id}}
output: {{dir: out}}
compare: {{baseline: base, divergence: true}}
""",
    )
    with pytest.raises(TokenizerMismatchError, match=r"identical tokenizers.*bits_per_byte"):
        lmeval.run(str(config), show_progress=False)
    assert not list((tmp_path / "out" / "parts").rglob("*.parquet"))  # nothing was scored


def test_config_needs_two_models_and_a_boolean(tmp_path, checkpoints):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "x"}])
    config = write_config(
        tmp_path, f"models: [{{path: {checkpoints[0]}}}]\ndata: {{path: docs.jsonl}}\ncompare: {{divergence: maybe}}\n"
    )
    with pytest.raises(ConfigError, match=r"compare\.divergence: must be true or false"):
        lmeval.load_config(config)
    with pytest.raises(ConfigError, match=r"compare\.divergence: needs at least two models"):
        lmeval.load_config(config, ["compare.divergence=true"])


@pytest.mark.slow
def test_concatenated_documents(tmp_path, checkpoints):
    """One stream: separator tokens are their own rows, and both nlls are the run's own."""
    config = workspace(tmp_path, checkpoints, "", texts=TEXTS[:4])
    lmeval.run(str(config), ["scoring.documents=concatenated"], show_progress=False)
    out = tmp_path / "out"
    per_token, tokens = pd.read_parquet(out / "divergence.parquet"), pd.read_parquet(out / "tokens.parquet")
    assert "<separator>" in set(per_token.doc_id)
    for column, name in (("nll_y", "ft"), ("nll_baseline", "base")):  # nll_x: the tokens table's
        mine = tokens[tokens.model == name].merge(per_token, on=["doc_id", "position"], validate="1:1")
        assert len(mine) == len(per_token)
        np.testing.assert_allclose(mine[column], mine["nll_x"], rtol=1e-6, atol=1e-6)
    row = pd.read_csv(out / "divergence.csv").iloc[0]
    assert row.n_documents == 5 and row.n_tokens == len(per_token)


@pytest.mark.slow
def test_per_token_false_writes_no_per_token_table(tmp_path, checkpoints):
    config = workspace(tmp_path, checkpoints, "", texts=TEXTS[:2])
    tables = lmeval.run(str(config), ["output.per_token=false"], show_progress=False)
    out = tmp_path / "out"
    assert not (out / "divergence.parquet").exists() and (out / "divergence.csv").exists()
    assert tables["divergence"].n_tokens.iloc[0] > 0


# --------------------------------------------------------------------------------------
# lmeval surprisal --baseline
# --------------------------------------------------------------------------------------


def test_surprisal_baseline_html_and_csv(tmp_path, checkpoints, capsys):
    base, ft = checkpoints
    text = "The quick <b>brown</b> fox & the dog."
    page = tmp_path / "page.html"
    code = main(
        ["surprisal", "--model", str(ft), "--baseline", str(base), "--html", str(page), "--format", "csv", text]
    )
    assert code == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out), keep_default_na=False)
    api = lmeval.divergence([text], str(ft), str(base))
    np.testing.assert_allclose(table.kl, api.kl, rtol=1e-6)
    np.testing.assert_allclose(table.delta_bits, (api.nll - api.nll_baseline) / np.log(2), rtol=1e-5, atol=1e-6)
    html = page.read_text()
    assert "<b>" not in html and "&lt;" in html and "&amp;" in html  # the document is text, never markup
    data = json.loads(re.search(r'id="lmeval-data">(.*?)</script>', html, re.S).group(1))
    rows = data[0]["rows"]
    assert len(rows) == len(table) == html.count('class="tok')
    assert [r["kl"] for r in rows] == pytest.approx(table.kl.tolist(), rel=1e-6)
    assert [r["surprisal_bits_baseline"] for r in rows] == pytest.approx(
        table.surprisal_bits_baseline.tolist(), rel=1e-6
    )
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', html)]
    assert values == pytest.approx(table.delta_bits.tolist(), rel=1e-6, abs=1e-9)  # coloured by delta_nll
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    node = shutil.which("node")
    if node:  # at least parse the page's script
        (tmp_path / "page.js").write_text(script)
        assert subprocess.run([node, "--check", str(tmp_path / "page.js")]).returncode == 0


def test_surprisal_baseline_terminal_and_refusals(checkpoints, capsys):
    base, ft = checkpoints
    assert (
        main(["surprisal", "--model", str(ft), "--baseline", str(base), "--by", "kl", "--color", "always", "a dog"])
        == 0
    )
    out = capsys.readouterr().out
    assert "mean KL" in out and "kl_nats" in out and "\x1b[" in out
    assert main(["surprisal", "--model", str(ft), "--baseline", str(base), "--words", "a dog"]) == 2
    assert "--words: must not be combined with --baseline" in capsys.readouterr().err
