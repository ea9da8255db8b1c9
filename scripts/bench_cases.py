"""The regimes of `bench.py --case`: short sentences, strided windows, `lmeval run` end to end, and
the per-token reductions alone.

Each method runs in its own subprocess (`bench.py --child --method ...`), first once untimed
on a small slice, then timed; `bench.py --repeat N` interleaves N runs of every method and
keeps the fastest. See `bench.py`'s docstring for what each case compares.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASE_METHODS = {
    "short": ("lmeval-short", "minicons"),
    "strided": ("lmeval-strided", "hf-recipe"),
    "e2e": ("lmeval-run", "scoring-only"),
}
CASE_MODEL = {"short": "demo", "strided": "gpt2-50k", "e2e": "demo"}
STRIDED = (256, 64)  # L, S = L / 4
MINICONS_BATCH = 64  # sentences per token_score call


def sentences(tokenizer, n: int) -> list[str]:
    """``n`` sentences of 5-40 tokens from the held-out books, cycled with a marker if needed."""
    import bench

    books = [
        json.loads(line)["text"] for line in (bench.DEMO / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    pieces = [p.strip() for b in books for p in re.split(r"(?<=[.;:?!])\s+", b) if p.strip()]
    lengths = [len(x) for x in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
    pool = [p for p, k in zip(pieces, lengths) if 5 <= k <= 40]
    out, round_ = [], 0
    while len(out) < n:
        out += [p if round_ == 0 else f"({round_}) {p}" for p in pool][: n - len(out)]
        round_ += 1
    return out


# ---- short sentences: lmeval vs minicons, per-token log-probabilities --------------------------


def run_lmeval_short(model, tokenizer, texts, args) -> dict:
    import lmeval

    frame = lmeval.score_texts(texts, (model, tokenizer), bos="none", max_length=256, compile="auto")
    nll = frame.nll.to_numpy(np.float64)
    return {
        "tokens": len(frame),
        "per_token": _by_doc(frame.doc_id.to_numpy(), frame.position.to_numpy(), -nll, len(texts)),
        "reductions": frame.attrs["reductions"],
    }


def _by_doc(doc_id, position, values, n_docs) -> list[list[float]]:
    out = [[] for _ in range(n_docs)]
    for d, p, v in zip(doc_id.tolist(), position.tolist(), values.tolist()):
        out[d].append((p, v))
    return [[v for _, v in sorted(rows)] for rows in out]


def run_minicons(model, tokenizer, texts, args) -> dict:
    from minicons import scorer

    lm = scorer.IncrementalLMScorer(model, device=str(next(model.parameters()).device), tokenizer=tokenizer)
    per_token = []
    for i in range(0, len(texts), MINICONS_BATCH):
        for sentence in lm.token_score(texts[i : i + MINICONS_BATCH]):
            per_token.append([score for _, score in sentence[1:]])  # the first token is never scored (0.0)
    return {"tokens": sum(map(len, per_token)), "per_token": per_token}


# ---- strided windows: lmeval vs the transformers recipe on the same windows ----------------------


def strided_windows(tokenizer, texts):
    from lmeval.core.windows import make_windows

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [w for i, t in enumerate(ids) for w in make_windows(i, t, [tokenizer.eos_token_id], *STRIDED)]


def run_lmeval_strided(model, tokenizer, texts, args) -> dict:
    import lmeval

    frame = lmeval.score_texts(texts, (model, tokenizer), max_length=STRIDED[0], stride=STRIDED[1], compile="auto")
    sums = np.bincount(
        frame.doc_id.to_numpy().astype(np.int64), weights=frame.nll.to_numpy(np.float64), minlength=len(texts)
    )
    return {"tokens": len(frame), "doc_nll": sums.tolist(), "reductions": frame.attrs["reductions"]}


def run_hf_recipe(model, tokenizer, texts, args) -> dict:
    """The "perplexity of fixed-length models" loop: one window per forward, logits for every
    position (``model(ids).logits``, as ``model(ids, labels=...)`` computes them), and the
    cross-entropy of the window's scored targets. Run over lmeval's windows so that both
    score the same tokens with the same contexts."""
    import torch.nn.functional as F

    sums = np.zeros(len(texts))
    n = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for w in strided_windows(tokenizer, texts):
            logits = model(torch.tensor([w.input_ids], device=device)).logits[0, w.first_scored :]
            sums[w.doc_id] += F.cross_entropy(
                logits.float(), torch.tensor(w.targets, device=device), reduction="sum"
            ).item()
            n += w.n_scored
    return {"tokens": n, "doc_nll": sums.tolist()}


# ---- end to end: `lmeval run` vs scoring alone -----------------------------------------------------


def _write_run(folder: Path, model_dir: Path, texts: list[str], part_chars: int | None = None) -> Path:
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    config = folder / "cfg.yaml"
    config.write_text(
        f"models: [{{name: m, path: {model_dir}, dtype: float32}}]\n"
        "data: {path: docs.jsonl, id_field: id}\nscoring: {max_length: 256, batch_tokens: 8192}\n"
        "output: {dir: out" + (f", part_chars: {part_chars}" if part_chars else "") + "}\n",
        encoding="utf-8",
    )
    return config


def _saved(model, tokenizer, folder: Path) -> Path:
    target = folder / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def run_lmeval_run(model, tokenizer, texts, args) -> dict:
    import lmeval
    from lmeval.model.loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        config = _write_run(Path(tmp), _saved(model, tokenizer, Path(tmp)), texts, args.part_chars)
        started = time.perf_counter()
        load_model(Path(tmp) / "model")  # the load that `run` repeats, timed to subtract it
        load = time.perf_counter() - started
        started = time.perf_counter()
        tables = lmeval.run(str(config), show_progress=False, return_tokens=False)
        seconds = time.perf_counter() - started - load
        return {
            "tokens": int(tables["summary"].n_tokens.sum()),
            "doc_nll": tables["documents"].nll_sum.tolist(),
            "seconds_override": seconds,
            "load_seconds": load,
            "after_last_part_seconds": tables["run"]["seconds_after_last_part"],
            "before_first_part_seconds": tables["run"].get("seconds_before_first_part", float("nan")),
        }


def run_scoring_only(model, tokenizer, texts, args) -> dict:
    from lmeval.engine.config import CalibrationConfig
    from lmeval.engine.data import Document, tokenize_documents
    from lmeval.model.loading import prepare_model
    from lmeval.model.scorer import ScoreOptions
    from lmeval.producers.score import score_documents

    lm = prepare_model(model, tokenizer, name="m")
    options = ScoreOptions(batch_tokens=8192, temperatures=CalibrationConfig().temperatures)  # as the run
    docs = tokenize_documents([Document(f"doc-{i}", t) for i, t in enumerate(texts)], tokenizer)
    columns = score_documents(lm, docs, 256, None, options)
    sums = np.bincount(columns["doc_index"], weights=columns["nll"].astype(np.float64), minlength=len(texts))
    return {"tokens": len(columns["nll"]), "doc_nll": sums.tolist()}


RUNNERS = {
    "lmeval-short": run_lmeval_short,
    "minicons": run_minicons,
    "lmeval-strided": run_lmeval_strided,
    "hf-recipe": run_hf_recipe,
    "lmeval-run": run_lmeval_run,
    "scoring-only": run_scoring_only,
}


def child(args) -> dict:
    import bench

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = bench.build_model(args.model, torch.float32, device)
    if args.method in ("lmeval-short", "minicons"):
        texts = sentences(tokenizer, args.sentences)
    else:
        texts = bench.load_texts(args.tokens, tokenizer)
    run = RUNNERS[args.method]
    base = bench.rss_mb()
    started = time.perf_counter()
    run(model, tokenizer, [text[:4000] for text in texts[:2]], args)  # a short slice: the strided corpus is 2 books
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    out = run(model, tokenizer, texts, args)
    out["seconds"] = out.pop("seconds_override", time.perf_counter() - started)
    out.update(warmup=warmup, peak_rise_mb=bench.peak_rss_mb() - base)
    return out


def compare(args) -> None:
    import bench

    if args.case == "reductions":
        return reductions(args)
    if args.case == "packing":
        return packing(args)
    methods = list(CASE_METHODS[args.case])
    if "minicons" in methods:
        try:
            import minicons  # noqa: F401
        except ImportError:
            methods.remove("minicons")
            print("minicons is not installed: skipping it (pip install -e '.[bench]')")
    model = CASE_MODEL[args.case]
    base = [
        "--model",
        model,
        "--tokens",
        str(args.tokens),
        "--threads",
        str(args.threads),
        "--sentences",
        str(args.sentences),
        *(["--part-chars", str(args.part_chars)] if args.part_chars else []),
    ]
    results = bench.run_children({m: [*base, "--method", m] for m in methods}, args.repeat)
    print(f"\n== {args.case}: model {model}, threads = {args.threads}, repeat = {args.repeat}")
    print(
        f"{'method':<16} {'tokens':>8} {'seconds':>9} {'tok/s':>9} {'peak RSS rise MB':>17} {'warm-up s':>10} "
        f"{'spread':>7} {'runs s':>20}"
    )
    for name, r in results.items():
        runs = " ".join(f"{x:.1f}" for x in r["all_seconds"])
        print(
            f"{name:<16} {r['tokens']:>8} {r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>9.0f} "
            f"{r['peak_rise_mb']:>17.1f} {r['warmup']:>10.1f} {bench.spread(r):>7} {runs:>20}"
        )
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        ratios = [y / x for x, y in zip(ra["all_seconds"], rb["all_seconds"])]
        print(
            f"{a} vs {b}: throughput {rb['seconds'] / ra['seconds'] * ra['tokens'] / rb['tokens']:.2f}x "
            f"(tokens/s of the fastest runs; per-round {' '.join(f'{x:.2f}' for x in ratios)})"
        )
        agreement(ra, rb)
    for name, r in results.items():
        if "after_last_part_seconds" in r:  # the merge keeps pace: this should not grow with the corpus
            print(
                f"{name}: {r['after_last_part_seconds']:.2f} s after the last part (merge close, tables, figures, "
                f"comparison, run.json) of {r['seconds']:.2f} s; {r['before_first_part_seconds']:.2f} s before the "
                f"first part, its model load ({r['load_seconds']:.2f} s, subtracted) included"
            )
        if "reductions" in r:
            print(f"{name}: reductions ran {r['reductions']}")


# ---- the per-token reductions alone: each CPU path, with and without the temperature grid ----------

REDUCTION_SHAPES = ((4096, 1048), (50257, 128), (128256, 128))  # (V, rows): the scorer's default CPU chunks


def reductions(args) -> None:
    """`token_statistics` on one chunk of random logits, per path (ATen ``eager``, the C
    ``kernel``, ``compiled`` when asked for with ``--compiled``) and temperatures (none, the
    calibration default grid), interleaved in this one process ``--repeat`` times (x 5 calls);
    the fastest call's wall and CPU (`time.process_time`) nanoseconds per logit."""
    import os

    from lmeval.core import kernels
    from lmeval.core.losses import Workspace, token_statistics
    from lmeval.engine.config import CalibrationConfig

    torch.set_num_threads(args.threads)
    grid = tuple(CalibrationConfig().temperatures)
    paths = ["eager", "kernel"] + (["compiled"] if args.compiled else [])
    print(f"\n== reductions: threads = {args.threads}, repeat = {args.repeat}, load {os.getloadavg()[0]:.2f}")
    print(f"grid {grid}; kernel {'built' if kernels.library() is not None else 'UNAVAILABLE'}")
    print(f"{'V':>7} {'rows':>5} {'path':<9} {'temperatures':<13} {'wall ns/logit':>14} {'CPU ns/logit':>13}")
    lib = kernels.library()
    for vocab, rows in REDUCTION_SHAPES:
        g = torch.Generator().manual_seed(vocab)
        logits = torch.randn(rows, vocab, generator=g) * 4
        targets = torch.randint(0, vocab, (rows,), generator=g)
        sums = logits.double().sum(1)
        best: dict = {}
        for _ in range(args.repeat):
            for path in paths:
                kernels._STATE["lib"] = lib if path == "kernel" else None
                for name, temps in (("none", ()), ("default grid", grid)):
                    workspace = Workspace()
                    for _ in range(5):
                        wall, cpu = time.perf_counter(), time.process_time()
                        token_statistics(
                            logits, targets, temps, compiled=path == "compiled", workspace=workspace, logit_sums=sums
                        )
                        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                        key = (path, name)
                        best[key] = min(best.get(key, (wall, cpu)), (wall, cpu))
        kernels._STATE["lib"] = lib
        for (path, name), (wall, cpu) in best.items():
            n = rows * vocab
            print(f"{vocab:>7} {rows:>5} {path:<9} {name:<13} {1e9 * wall / n:>14.2f} {1e9 * cpu / n:>13.2f}")
        today = best[("eager", "none")]
        for path in paths[1:]:
            ratio = today[0] / best[(path, "default grid")][0], today[1] / best[(path, "default grid")][1]
            print(f"{vocab:>7} {path} with the grid vs eager without: {ratio[0]:.2f}x wall, {ratio[1]:.2f}x CPU")


# ---- packing short texts: the body on padded batches against packed rows ------------------------


def _packed_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Window indices packed into rows of ``width`` tokens, longest first, each into the
    first of the last 8 open rows with room (first-fit decreasing, bounded search)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r in range(len(rows) - 1, max(-1, len(rows) - 9), -1):
            if free[r] >= lengths[k]:
                rows[r].append(k)
                free[r] -= lengths[k]
                break
        else:
            rows.append([k])
            free.append(width - lengths[k])
    return rows


def _packed_batch(windows, group: list[list[int]], width: int):
    """(B, width) ids and position ids: each window's positions start at 0 (the reset that
    transformers reads as a new sequence when no attention mask is given), and the tail of
    a row is a filler sequence of id 0 that nothing else attends to."""
    ids = torch.zeros((len(group), width), dtype=torch.long)
    positions = torch.zeros_like(ids)
    where = []  # (row, first column) of each window
    for r, row in enumerate(group):
        c = 0
        for k in row:
            x = windows[k].input_ids
            ids[r, c : c + len(x)] = torch.tensor(x)
            positions[r, c : c + len(x)] = torch.arange(len(x))
            where.append((k, r, c))
            c += len(x)
        positions[r, c:] = torch.arange(width - c)
    return ids, positions, where


def packing(args) -> None:
    """The model body over the short case's sentences (bos: none), right-padded in lmeval's
    batches (`pack_batches`, sorted by length, with a mask) against packed rows of 64, 128
    and 256 tokens (position ids restart at each window, no mask: transformers' packed
    sequence masks), the same token budget per batch, interleaved ``--repeat`` times in this
    process; wall and CPU seconds, and the largest difference of a scored token's log q_y
    between the two layouts on 64 of the longest windows."""
    import os

    import bench
    from lmeval.core.windows import make_windows
    from lmeval.model.scorer import _pad, pack_batches

    torch.set_num_threads(args.threads)
    model, tokenizer = bench.build_model("demo", torch.float32, "cpu")
    ids = tokenizer(sentences(tokenizer, args.sentences), add_special_tokens=False)["input_ids"]
    windows = [w for i, t in enumerate(ids) for w in make_windows(i, t, [], 256, 256)]
    lengths = [len(w.input_ids) for w in windows]
    budget, body = 16384, model.base_model
    print(
        f"\n== packing: {len(windows)} sentences, {sum(lengths)} tokens, model demo ({model.config._attn_implementation})"
    )
    print(f"threads = {args.threads}, repeat = {args.repeat}, load {os.getloadavg()[0]:.2f}")

    def padded():
        for batch in pack_batches(windows, budget):
            x, mask = _pad([windows[k] for k in batch], torch.device("cpu"))
            body(input_ids=x, attention_mask=mask, use_cache=False)

    def packed(width):
        rows = _packed_rows(lengths, width)
        per = max(1, budget // width)
        for s in range(0, len(rows), per):
            x, positions, _ = _packed_batch(windows, rows[s : s + per], width)
            body(input_ids=x, position_ids=positions, attention_mask=None, use_cache=False)

    layouts = {"padded": padded, **{f"packed {w}": (lambda w=w: packed(w)) for w in (64, 128, 256)}}
    best: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for name, run in layouts.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = min(best.get(name, (wall, cpu)), (wall, cpu))
        first = pack_batches(windows, budget)[0][:64]  # 64 of the longest windows: the check, not a timing
        x, mask = _pad([windows[k] for k in first], torch.device("cpu"))
        alone = torch.log_softmax(
            model.lm_head(body(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state), -1
        )
        rows = _packed_rows([lengths[k] for k in first], 128)
        x2, positions, where = _packed_batch([windows[k] for k in first], rows, 128)
        together = torch.log_softmax(
            model.lm_head(
                body(input_ids=x2, position_ids=positions, attention_mask=None, use_cache=False).last_hidden_state
            ),
            -1,
        )
        worst = 0.0
        for k, r, c in where:
            n = lengths[first[k]]
            worst = max(worst, float((alone[k, :n] - together[r, c : c + n]).abs().max()))
    print(f"{'layout':<12} {'wall s':>8} {'CPU s':>8} {'CPU vs padded':>14}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<12} {wall:>8.2f} {cpu:>8.2f} {best['padded'][1] / cpu:>13.2f}x")
    print(f"packed (128) vs padded: max |log q difference| {worst:.2e} nats over 64 of the longest windows")


def agreement(ra: dict, rb: dict) -> None:
    if "per_token" in ra and "per_token" in rb:
        # lmeval with bos: none scores exactly the tokens minicons scores (all but each first)
        pairs = [
            (x, y) for xs, ys in zip(ra["per_token"], rb["per_token"]) if len(xs) == len(ys) for x, y in zip(xs, ys)
        ]
        mismatched = sum(len(xs) != len(ys) for xs, ys in zip(ra["per_token"], rb["per_token"]))
        diff = max(abs(x - y) for x, y in pairs) if pairs else float("nan")
        print(
            f"per-token agreement: max |log p difference| {diff:.2e} nats over {len(pairs)} tokens "
            f"({mismatched} sentences with a different token count)"
        )
    elif "doc_nll" in ra and "doc_nll" in rb:
        rel = [abs(x - y) / abs(y) for x, y in zip(ra["doc_nll"], rb["doc_nll"]) if y]
        print(f"per-document agreement: max relative difference in sum NLL {max(rel):.2e} over {len(rel)} documents")


if __name__ == "__main__":
    sys.exit("run through bench.py --case short|strided|e2e")
