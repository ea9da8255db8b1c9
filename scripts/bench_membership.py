"""Benchmark: what ``analysis.membership: true`` (and the position curve) cost a run, measured
side by side in one process, as ratios.

    python scripts/bench_membership.py [--model gpt2-50k] [--tokens 30000] [--doc-chars 2000] [--repeats 3] [--threads T]

The same config is run with ``analysis.membership`` false and true (and with
``analysis.positions: false``, to show what the default position curve costs), in turns, so
that drift in the machine's load falls on every variant alike; one untimed run warms up
first. Each variant reports the median over ``--repeats`` of the whole `lmeval.run` wall
time and of the scoring time alone (the parts' seconds: tokenize, forward, reductions),
and its ratio to the plain run. Membership adds Var_q[log q] to the one pass over each
chunk of logits, and the Min-K% sorting and zlib compression per document. A second table
times that one pass alone (`token_statistics` on one chunk of logits, with and without
``moments``, in turns), where the extra cost is all there is to see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

VARIANTS = {
    "plain": ["analysis.membership=false"],
    "membership": ["analysis.membership=true"],
    "no positions": ["analysis.membership=false", "analysis.positions=false"],
}


def write_inputs(folder: Path, model_name: str, n_tokens: int, doc_chars: int, device: str) -> tuple[Path, int]:
    model, tokenizer = bench.build_model(model_name, torch.float32, "cpu")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    books = bench.load_texts(n_tokens, tokenizer)
    texts = [book[i : i + doc_chars] for book in books for i in range(0, len(book), doc_chars)]  # many documents
    rows = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    (folder / "docs.jsonl").write_text(rows, encoding="utf-8")
    max_length, batch_tokens = bench.MODELS[model_name]
    (folder / "run.yaml").write_text(
        f"models: [{{name: m, path: {folder / 'model'}, device: {device}}}]\n"
        "data: {path: docs.jsonl}\n"
        f"scoring: {{max_length: {max_length}, batch_tokens: {batch_tokens}}}\n"
        f"output: {{dir: {folder / 'out'}, per_token: false}}\n",
        encoding="utf-8",
    )
    return folder / "run.yaml", len(texts)


def timed_run(config: Path, overrides: list[str]) -> tuple[float, float, int]:
    import lmeval

    started = time.perf_counter()
    tables = lmeval.run(str(config), overrides, overwrite=True, show_progress=False, return_tokens=False)
    wall = time.perf_counter() - started
    row = tables["summary"].iloc[0]
    return wall, row.n_tokens / row.tokens_per_second, int(row.n_tokens)


def time_reductions(vocab: int, rows: int, repeats: int, temperatures) -> tuple[float, float]:
    """Median seconds of one eager pass over a (rows, vocab) chunk, without and with moments."""
    from lmeval.core.losses import Workspace, token_statistics

    logits, targets = torch.randn(rows, vocab) * 3, torch.randint(0, vocab, (rows,))
    workspace, times = Workspace(), {False: [], True: []}
    for _ in range(repeats + 1):  # the first round warms the scratch buffers, untimed
        for moments in (False, True):
            started = time.perf_counter()
            token_statistics(logits, targets, temperatures, workspace=workspace, moments=moments)
            times[moments].append(time.perf_counter() - started)
    return statistics.median(times[False][1:]), statistics.median(times[True][1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-50k", choices=list(bench.MODELS))
    parser.add_argument("--tokens", type=int, default=30000)
    parser.add_argument(
        "--doc-chars", type=int, default=2000, help="split the books into documents of this many characters"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config, n_docs = write_inputs(Path(tmp), args.model, args.tokens, args.doc_chars, args.device)
        timed_run(config, VARIANTS["membership"])  # warm-up, untimed
        times = {name: ([], []) for name in VARIANTS}
        for _ in range(args.repeats):
            for name, overrides in VARIANTS.items():
                wall, scoring, n_tokens = timed_run(config, overrides)
                times[name][0].append(wall)
                times[name][1].append(scoring)
    print(
        f"model {args.model}, {n_tokens} tokens in {n_docs} documents, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} runs each"
    )
    base_wall, base_scoring = (statistics.median(v) for v in times["plain"])
    print(f"{'variant':<14} {'run s':>8} {'ratio':>7} {'scoring s':>10} {'ratio':>7}")
    for name, (walls, scorings) in times.items():
        wall, scoring = statistics.median(walls), statistics.median(scorings)
        print(f"{name:<14} {wall:8.2f} {wall / base_wall:7.3f} {scoring:10.2f} {scoring / base_scoring:7.3f}")
    from lmeval.engine.config import CalibrationConfig

    temperatures = CalibrationConfig().temperatures  # what a run computes by default
    print(f"\none pass over a chunk of logits (eager, {len(temperatures)} temperatures), median of {5 * args.repeats}")
    print(f"{'vocab x rows':<16} {'plain ms':>9} {'moments ms':>11} {'ratio':>7}")
    for vocab, rows in ((50257, 80), (128256, 32)):
        plain, moments = time_reductions(vocab, rows, 5 * args.repeats, temperatures)
        print(f"{f'{vocab} x {rows}':<16} {plain * 1e3:9.2f} {moments * 1e3:11.2f} {moments / plain:7.3f}")


if __name__ == "__main__":
    main()
