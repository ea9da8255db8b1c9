"""The run report (`lmeval report`, report.html): every number read from the run's files and
shown as text, nothing fetched, a document's markup never run, the size budget kept."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import write_config, write_jsonl
from lmeval.cli import main
from lmeval.errors import OutputError
from lmeval.view.report import TOKEN_BUDGET, _fmt, _signed, render_report

pytestmark = pytest.mark.report  # its runs write report.html (tests/conftest.py)
INJECTION = "Before <script>document.title='PWNED'</script> and <img src=x onerror=\"alert(1)\"> after."


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory, gpt2_pair, tiny_models):
    """A finished two-model run (per-token rows kept): a GPT-2 and a Llama on one tokenizer,
    one document carrying markup in its id and its text."""
    folder = tmp_path_factory.mktemp("report")
    _, tokenizer = gpt2_pair
    for arch in ("gpt2", "llama"):
        tiny_models[arch].save_pretrained(folder / arch)
        tokenizer.save_pretrained(folder / arch)
    rows = [{"id": f"doc-{i}", "text": t, "source": "odd" if i % 2 else "even"} for i, t in enumerate(CORPUS)]
    rows.append({"id": "<script>alert(1)</script>", "text": INJECTION, "source": "<b>markup</b>"})
    write_jsonl(folder / "docs.jsonl", rows)
    config = write_config(
        folder,
        f"""
models: [{{name: base, path: {folder / "gpt2"}}}, {{name: other, path: {folder / "llama"}}}]
data: {{path: docs.jsonl, id_field: id, group_by: [source]}}
scoring: {{max_length: 64}}
compare: {{bootstrap: 200, min_documents: 3, divergence: true}}
analysis: {{membership: true}}
output: {{dir: out}}
""",
    )
    lmeval.run(str(config), show_progress=False)
    return folder / "out"


@pytest.fixture(scope="module")
def page(two_model_run) -> str:
    return (two_model_run / "report.html").read_text(encoding="utf-8")


def embedded(page: str) -> dict:
    raw = re.search(r'<script type="application/json" id="lmeval-report">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def test_every_run_writes_its_report_and_the_switch_turns_it_off(two_model_run, tmp_path):
    assert (two_model_run / "report.html").is_file()
    config = two_model_run.parent / "run.yaml"
    off = lmeval.run(str(config), ["output.report=false", f"output.dir={tmp_path / 'off'}"], show_progress=False)
    assert "summary" in off and not (tmp_path / "off" / "report.html").exists()


def test_headline_numbers_and_deltas_are_the_files_numbers_as_text(two_model_run, page):
    summary = pd.read_csv(two_model_run / "summary.csv")
    for row in summary.itertuples():
        for metric in ("ppl", "bits_per_token", "bits_per_byte", "ece", "brier"):
            assert f'<td class="num">{_fmt(getattr(row, metric))}</td>' in page, (row.model, metric)
        summary_part = page[page.index('id="summary"') : page.index("</section>", page.index('id="summary"'))]
        for metric in ("ppl", "bits_per_token", "bits_per_byte", "word_ppl"):  # each with its interval
            low, high = getattr(row, f"{metric}_ci_low"), getattr(row, f"{metric}_ci_high")
            assert low < getattr(row, metric) < high
            assert f'<td class="num">{_fmt(low)}</td><td class="num">{_fmt(high)}</td>' in summary_part
    assert "Bits per byte by model, 95% intervals" in page  # the forest plot of the two models
    compare = pd.read_csv(two_model_run / "compare.csv")
    for row in compare.itertuples():
        for value in (row.delta, row.ci_low, row.ci_high):
            text = _signed(value)
            assert f'<td class="num">{text}</td>' in page
            if np.isfinite(value):  # NaN (too few documents for an interval) is shown as a dash
                assert text.startswith("-" if value < 0 else "+")


def test_documents_table_holds_every_document_with_the_files_values(two_model_run, page):
    data = embedded(page)
    documents = pd.read_parquet(two_model_run / "documents.parquet")
    columns = data["columns"]
    by_id = {row[0]: dict(zip(columns, row)) for row in data["rows"]}
    assert set(by_id) == set(documents["doc_id"].astype(str))
    for row in documents.itertuples():
        shown = by_id[str(row.doc_id)]
        assert shown[f"ppl {row.model}"] == pytest.approx(row.ppl, rel=1e-15)
        assert shown[f"bits_per_byte {row.model}"] == pytest.approx(row.bits_per_byte, rel=1e-15)
    deltas = pd.read_csv(two_model_run / "compare_documents.csv")
    for row in deltas.itertuples():
        assert by_id[str(row.doc_id)][f"\u0394 bits_per_byte {row.model}"] == pytest.approx(row.delta_bits_per_byte)
    # every token view is the token table's rows for that document, in order, with the text under each span
    tokens = pd.read_parquet(two_model_run / "tokens.parquet")
    texts = {f"doc-{i}": t for i, t in enumerate(CORPUS)} | {"<script>alert(1)</script>": INJECTION}
    for (doc, model), g in tokens.groupby(["doc_id", "model"]):
        view = data["views"][doc][model]
        assert [t[0] for t in view] == [texts[doc][a:b] for a, b in zip(g["char_start"], g["char_end"])]
        np.testing.assert_allclose([t[1] for t in view], g["surprisal_bits"], atol=6e-5)
        assert [t[2] for t in view] == g["rank"].tolist()
    # with a baseline, each variant's KL per token, on the same text
    moved = pd.read_parquet(two_model_run / "divergence.parquet")
    for (doc, model), g in moved.groupby(["doc_id", "model"]):
        view = data["divergence"][doc][model]
        assert [t[0] for t in view] == [texts[doc][a:b] for a, b in zip(g["char_start"], g["char_end"])]
        np.testing.assert_allclose([t[1] for t in view], g["kl"], atol=6e-5)
        np.testing.assert_allclose([t[2] for t in view], g["delta_p"], rtol=1e-6)


def test_nothing_is_fetched_and_markup_from_data_is_never_markup(page):
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r'\b(src|href)\s*=\s*"(https?:)?//', page)  # no external script, font or image
    assert "http://www.w3.org/2000/svg" in page  # the SVG namespace is a name, not a request
    assert "<script>alert" not in page and "<script>document" not in page and "<img src=x" not in page
    scripts = re.findall(r"<script\b", page)
    assert len(scripts) == 2  # the escaped JSON and the page's own script


def test_several_runs_make_a_checkpoint_curve(two_model_run, tmp_path):
    import shutil

    steps = []
    for step in (100, 2000):
        target = tmp_path / f"step-{step}"
        shutil.copytree(two_model_run, target)
        steps.append(target)
    page = render_report(steps)
    assert 'id="checkpoints"' in page and "bits_per_byte against the step" in page
    section = page[page.index('id="checkpoints"') :]
    assert "<td>step-100</td>" in section and '<td class="num">2,000</td>' in section
    # each model's line carries its interval as a shaded band, and the table its ends as text
    assert "bits_per_byte against the step, 95% intervals shaded" in section
    chart = section[section.index("bits_per_byte against the step") : section.index("</svg>")]
    assert chart.count('fill-opacity="0.15"') == 2  # one band per model
    summary = pd.read_csv(two_model_run / "summary.csv")
    for value in [*summary["bits_per_byte_ci_low"], *summary["ppl_ci_high"]]:
        assert f'<td class="num">{_fmt(value)}</td>' in section


def test_one_run_over_a_glob_of_steps_makes_a_checkpoint_curve_with_intervals(gpt2_pair, tmp_path):
    from helpers import finetuned

    model, tokenizer = gpt2_pair
    for k, step in enumerate((400, 100, 2000)):  # saved out of order: the curve follows the step
        target = tmp_path / "ckpt" / f"step-{step}"
        (finetuned(model, seed=k) if k else model).save_pretrained(target)
        tokenizer.save_pretrained(target)
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS * 2)])
    config = write_config(
        tmp_path,
        "models: [{glob: ckpt/step-*}]\ndata: {path: docs.jsonl, id_field: id}\nscoring: {max_length: 64}\n"
        "compare: {bootstrap: 100}\nanalysis: {positions: false}\noutput: {dir: out}\n",
    )
    lmeval.run(str(config), show_progress=False)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    section = page[page.index('id="checkpoints"') : page.index("</section>", page.index('id="checkpoints"'))]
    assert "bits_per_byte against the step, 95% intervals shaded" in section
    chart = section[section.index("bits_per_byte against the step") : section.index("</svg>")]
    assert chart.count('fill-opacity="0.15"') == 1  # one line: the run, over its checkpoints
    table = section[section.index("<table>") :]
    assert table.index("<td>step-100</td>") < table.index("<td>step-400</td>") < table.index("<td>step-2000</td>")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    for value in [*summary["bits_per_byte_ci_low"], *summary["ece_ci_high"]]:
        assert f'<td class="num">{_fmt(value)}</td>' in table


def test_models_without_steps_make_no_checkpoint_curve(page):
    assert 'id="checkpoints"' not in page  # "base" and "other" are two models, not a series


def test_cli_writes_the_page_and_names_a_folder_that_is_not_a_finished_run(two_model_run, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(two_model_run), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # without the run at hand, the token views still show the text: read from the config's corpus
    assert embedded(text)["views"] == embedded((two_model_run / "report.html").read_text(encoding="utf-8"))["views"]
    assert _signed(-0.5) == "-0.5" and _signed(0.25) == "+0.25" and _fmt(float("nan")) == "\u2013"
    with pytest.raises(OutputError, match=r"no run.json"):
        render_report([tmp_path])


def synthetic_run(folder: Path, n_docs: int, tokens_per_doc: int) -> Path:
    """A run folder written directly (the tables a two-model run writes, random values): the
    report's size budget at a scale a test cannot score."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"protocol": {}}), encoding="utf-8")
    ids = [f"document-{i:06d}" for i in range(n_docs)]
    summary = pd.DataFrame(
        {"model": ["a", "b"], "n_documents": n_docs, "n_tokens": n_docs * tokens_per_doc, "ppl": [20.0, 18.0]}
    )
    summary.to_csv(folder / "summary.csv", index=False)
    docs = pd.DataFrame(
        {
            "model": np.repeat(["a", "b"], n_docs),
            "doc_id": ids * 2,
            "n_tokens": tokens_per_doc,
            "ppl": rng.uniform(5, 50, 2 * n_docs),
            "bits_per_byte": rng.uniform(0.5, 2, 2 * n_docs),
        }
    )
    docs.to_parquet(folder / "documents.parquet")
    pd.DataFrame(
        {"model": "b", "baseline": "a", "doc_id": ids, "delta_bits_per_byte": rng.normal(0, 0.1, n_docs)}
    ).to_csv(folder / "compare_documents.csv", index=False)
    n = n_docs * tokens_per_doc
    pd.DataFrame(
        {
            "model": "a",
            "doc_id": np.repeat(ids, tokens_per_doc),
            "token": "tok",
            "char_start": np.tile(np.arange(tokens_per_doc) * 3, n_docs),
            "char_end": np.tile(np.arange(tokens_per_doc) * 3 + 3, n_docs),
            "surprisal_bits": rng.uniform(0, 20, n),
            "rank": rng.integers(1, 100, n),
        }
    ).to_parquet(folder / "tokens.parquet")
    return folder


def test_ten_thousand_documents_stay_under_five_megabytes_with_a_sampled_drill_down(tmp_path):
    run = synthetic_run(tmp_path / "big", n_docs=10_000, tokens_per_doc=50)
    page = render_report([run])
    assert len(page.encode("utf-8")) < 5 * 2**20
    data = embedded(page)
    assert len(data["rows"]) == 10_000  # every document is listed
    viewed = sum(len(v["a"]) for v in data["views"].values())
    assert 0 < viewed <= TOKEN_BUDGET and len(data["views"]) < 10_000
    docs = pd.read_parquet(run / "documents.parquet")
    per_doc = docs.groupby("doc_id")["bits_per_byte"].mean().sort_values()
    assert {per_doc.index[0], per_doc.index[-1]} <= set(data["views"])  # the best and the worst are kept
    assert "Token views are embedded for" in page and html.escape("the best, the worst") in page


def test_groups_divergence_and_membership_sections_show_their_files(two_model_run, page):
    groups = pd.read_csv(two_model_run / "groups.csv")
    section = page[page.index('<section id="groups"') :]
    for row in groups.itertuples():
        assert html.escape(f"{row.level}: {row.group} ({row.model})") in section  # the forest plot's row label
        assert f'<td class="num">{_fmt(row.bits_per_byte)}</td>' in section
    assert "&lt;b&gt;markup&lt;/b&gt;" in section and "<b>markup</b>" not in page
    divergence = pd.read_csv(two_model_run / "divergence.csv")
    section = page[page.index('<section id="divergence"') :]
    for value in (*divergence["kl_mean"], *divergence["kl_p99"], *divergence["ln_ppl_ratio"]):
        assert _fmt(value) in section
    top = pd.read_csv(two_model_run / "divergence_tokens.csv", dtype={"context": str}, keep_default_na=False)
    assert all(html.escape(c) in section for c in top["context"])  # the moved tokens with their text
    data = embedded(page)
    documents = pd.read_parquet(two_model_run / "documents.parquet")
    rows = {r[0]: dict(zip(data["columns"], r)) for r in data["rows"]}
    for row in documents.itertuples():
        assert rows[str(row.doc_id)][f"zlib_ratio {row.model}"] == pytest.approx(row.zlib_ratio)
