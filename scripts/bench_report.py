"""The run report at 10,000 documents (issue 32): the page's size, the time to build it, and
the time headless Chromium takes to load it and build its documents table.

A real run: the demo's two checkpoints score 10,000 documents cut from the demo's held-out
books (``--words`` words each, per-token rows kept), then ``lmeval report`` writes the page.
The load time is ``performance.now()`` once the page's script has built the table (one extra
script, allowed by its hash, reads it), the median of ``--repeat`` loads in a fresh profile.

    python scripts/bench_report.py [--documents 10000] [--words 40] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import lmeval
from lmeval.engine.demo import PACKAGE
from lmeval.view.render import with_script
from lmeval.view.report import render_report

DEMO_DIR = PACKAGE / "assets" / "demo"
CHROMIUM = "/usr/bin/chromium"
PROBE = 'document.body.dataset.loaded = String(performance.now()); document.body.dataset.rows = String(document.querySelectorAll("#documents-table tbody tr").length);'


def corpus(path: Path, n_docs: int, words: int) -> None:
    """``n_docs`` documents of ``words`` words each, cut in turn from the demo's held-out books."""
    text = " ".join(json.loads(line)["text"] for line in (DEMO_DIR / "heldout.jsonl").read_text().splitlines())
    tokens = text.split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            start = (i * words) % (len(tokens) - words)
            f.write(json.dumps({"id": f"doc-{i:05d}", "text": " ".join(tokens[start : start + words])}) + "\n")


def load_ms(page: str, folder: Path, k: int) -> tuple[float, int]:
    path = folder / f"probe-{k}.html"
    path.write_text(with_script(page, PROBE), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    dom = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={folder / f'profile-{k}'}", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return float(re.search(r'data-loaded="([^"]+)"', body).group(1)), int(
        re.search(r'data-rows="([^"]+)"', body).group(1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus(folder / "docs.jsonl", args.documents, args.words)
        config = folder / "run.yaml"
        config.write_text(
            f"models: [{{name: early, path: {DEMO_DIR / 'early'}, dtype: float32}}, "
            f"{{name: final, path: {DEMO_DIR / 'final'}, dtype: float32}}]\n"
            "data: {path: docs.jsonl, id_field: id}\nscoring: {max_length: 256}\n"
            "compare: {baseline: early}\noutput: {dir: out, report: false}\n",
            encoding="utf-8",
        )
        started = time.perf_counter()
        tables = lmeval.run(str(config), show_progress=False, return_tokens=False)
        scored = time.perf_counter() - started
        started = time.perf_counter()
        page = render_report([folder / "out"])
        built = time.perf_counter() - started
        loads = [load_ms(page, folder, k) for k in range(args.repeat)]
        tokens = int(tables["summary"]["n_tokens"].iloc[0])
    print(f"run: {args.documents:,} documents, {tokens:,} tokens per model, 2 models, scored in {scored:.1f} s")
    print(f"report: {len(page.encode('utf-8')) / 2**20:.2f} MB (budget 5 MB), built in {built:.2f} s")
    print(
        f"Chromium load to the table built: median {statistics.median(ms for ms, _ in loads):.0f} ms over {args.repeat} "
        f"(each: {', '.join(f'{ms:.0f}' for ms, _ in loads)}; budget 2000 ms); rows shown {loads[0][1]:,}"
    )


if __name__ == "__main__":
    main()
