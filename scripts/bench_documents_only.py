"""What `--documents-only` saves: one model over the bundled demo corpus, a full run against a
documents-only run (no calibration, positions or token rows; no temperature grid), each in a
fresh folder, best of ``--repeat``. Prints the wall seconds of each and their ratio, and checks
that the per-document nll sums agree.

    python scripts/bench_documents_only.py [--repeat 3] [--copies 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import lmeval
from lmeval.engine.demo import PACKAGE

DEMO_DIR = PACKAGE / "assets" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--copies", type=int, default=4, help="the demo corpus repeated this many times (new ids)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [json.loads(line) for line in (DEMO_DIR / "heldout.jsonl").read_text().splitlines()]
        with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
            for k in range(args.copies):
                for row in rows:
                    f.write(json.dumps({"id": f"{row['id']}-{k}", "text": row["text"]}) + "\n")
        config = folder / "run.yaml"
        config.write_text(
            f"models: [{{name: final, path: {DEMO_DIR / 'final'}, dtype: float32}}]\n"
            f"data: {{path: {folder / 'docs.jsonl'}, id_field: id}}\n"
            "scoring: {max_length: 256, batch_tokens: 8192}\n"
        )
        seconds: dict[str, float] = {}
        for mode, extra in (("full", []), ("documents_only", ["output.documents_only=true"])):
            best = float("inf")
            for r in range(args.repeat):
                out = folder / f"{mode}-{r}"
                started = time.perf_counter()
                lmeval.run(str(config), [f"output.dir={out}", *extra], show_progress=False, return_tokens=False)
                best = min(best, time.perf_counter() - started)
            seconds[mode] = best
        full, only = (pd.read_parquet(folder / f"{m}-0" / "documents.parquet") for m in ("full", "documents_only"))
        n_tokens = int(only.n_tokens.sum())
        worst = float(np.max(np.abs(only.nll_sum.to_numpy() / full.nll_sum.to_numpy() - 1)))
        print(f"{n_tokens} tokens, {len(only)} documents, best of {args.repeat}")
        for mode, s in seconds.items():
            print(f"  {mode:15s} {s:7.2f} s  {n_tokens / s:9.0f} tokens/s")
        print(
            f"  speedup {seconds['full'] / seconds['documents_only']:.2f}x; nll_sum max relative difference {worst:.1e}"
        )


if __name__ == "__main__":
    main()
