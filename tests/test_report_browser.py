"""The run report in a real browser (Debian's headless Chromium, as for the surprisal page):
its script builds the documents table, a click shows a document's token heat map, sorting
works, a document's markup runs nothing, no request leaves the page, a screenshot is not
blank, and a 10,000-document report lists every document.

Interaction is driven from a test-only copy of the page with one more script, allowed by
its own hash beside the page's in the Content-Security-Policy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmeval.view.render import with_script
from lmeval.view.report import _fmt, render_report
from test_html_browser import CHROMIUM, FLAGS, dump_dom
from test_report import embedded, page, synthetic_run, two_model_run  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.report,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)"
    ),
]

DRIVER = """
(function () {
  "use strict";
  var out = document.body.dataset;
  out.loadedMs = String(performance.now());
  var rows = document.querySelectorAll("#documents-table tbody tr");
  out.rows = String(rows.length);
  var first = rows[0].querySelector("button");
  out.clicked = first.textContent;
  first.click();
  out.spans = String(document.querySelectorAll("#token-view span.tok").length);
  out.viewTitle = document.querySelector("#token-view h3").textContent;
  var headers = document.querySelectorAll("#documents-table thead button");
  headers[2].click();
  var ascending = Array.prototype.map.call(document.querySelectorAll("#documents-table tbody tr"), function (r) {
    return r.children[0].textContent;
  });
  out.ascending = JSON.stringify(ascending);
  out.sort = document.querySelectorAll("#documents-table thead th")[2].getAttribute("aria-sort");
  document.getElementById("doc-filter").value = "doc-1";
  document.getElementById("doc-filter").dispatchEvent(new Event("input"));
  out.filtered = String(document.querySelectorAll("#documents-table tbody tr").length);
})();
"""


def driven(page_text: str) -> str:
    return with_script(page_text, DRIVER)


def body_data(dom: str) -> dict:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag))


def unescape(value: str) -> str:
    import html

    return html.unescape(value)


def test_clicking_a_document_shows_its_tokens_and_sorting_and_filtering_work(two_model_run, page, tmp_path):  # noqa: F811
    dom = dump_dom(driven(page), tmp_path, "report")
    data = body_data(dom)
    documents = pd.read_parquet(two_model_run / "documents.parquet")
    tokens = pd.read_parquet(two_model_run / "tokens.parquet")
    assert int(data["rows"]) == documents["doc_id"].nunique()
    clicked = unescape(data["clicked"])
    moved = pd.read_parquet(two_model_run / "divergence.parquet")
    # both models' surprisal, then the variant's KL from the baseline, one span per token
    assert int(data["spans"]) == int((tokens["doc_id"] == clicked).sum() + (moved["doc_id"] == clicked).sum())
    assert unescape(data["view-title"]) == f"Document {clicked}"
    ppl = documents[documents["model"] == documents["model"].iloc[0]].set_index("doc_id")["ppl"]
    assert json.loads(unescape(data["ascending"])) == ppl.sort_values(kind="stable").index.astype(str).tolist()
    assert data["sort"] == "ascending"
    assert int(data["filtered"]) == sum("doc-1" in d for d in documents["doc_id"].unique())


def test_numbers_shown_equal_the_files_and_injected_markup_runs_nothing(two_model_run, page, tmp_path):  # noqa: F811
    dom = dump_dom(page, tmp_path, "plain")
    assert "<title>lmeval report: out</title>" in dom  # a document's <script> never ran to retitle it
    assert "PWNED" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    cells = re.findall(r'<td class="num">([^<]*)</td>', dom)
    summary = pd.read_csv(two_model_run / "summary.csv")
    compare = pd.read_csv(two_model_run / "compare.csv")
    for value in [*summary["ppl"], *summary["bits_per_byte"], *compare["delta"]]:
        assert _fmt(value) in {c.lstrip("+") for c in cells}
    # the document whose id is markup is listed as text in the table the script built
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def page_requests(page_text: str, tmp_path: Path, name: str, screenshot: Path | None = None) -> list[str]:
    """The URLs the page itself asked for, from Chromium's net log: requests whose initiator is
    the page (the browser's own background requests have none, "not an origin")."""
    path = tmp_path / f"{name}.html"
    path.write_text(page_text, encoding="utf-8")
    netlog = tmp_path / f"{name}-net.json"
    shot = [f"--screenshot={screenshot}", "--window-size=1200,1600"] if screenshot else ["--dump-dom"]
    subprocess.run(
        [
            str(CHROMIUM),
            *FLAGS,
            f"--user-data-dir={tmp_path / f'profile-{name}'}",
            f"--log-net-log={netlog}",
            *shot,
            path.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    jobs = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return [
        job["url"]
        for job in jobs
        if "url" in job and job.get("initiator") != "not an origin" and not job["url"].startswith("file:")
    ]


def test_the_request_check_sees_a_page_that_fetches(tmp_path):
    control = '<html><body><img src="http://example.invalid/x.png"></body></html>'
    assert page_requests(control, tmp_path, "control") == ["http://example.invalid/x.png"]


def test_no_request_leaves_the_page_and_the_screenshot_is_not_blank(page, tmp_path):  # noqa: F811
    from PIL import Image

    shot = tmp_path / "shot.png"
    assert page_requests(page, tmp_path, "report", screenshot=shot) == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and charts: far from a blank page


def test_ten_thousand_documents_all_listed_in_the_browser(tmp_path):
    """The table the script builds for 10,000 documents (its load time is measured by
    scripts/bench_report.py, not here: a timed test fails on a busy machine)."""
    page_text = render_report([synthetic_run(tmp_path / "big", n_docs=10_000, tokens_per_doc=50)])
    data = body_data(dump_dom(driven(page_text), tmp_path, "big"))
    assert int(data["rows"]) == 10_000 == len(embedded(page_text)["rows"])
