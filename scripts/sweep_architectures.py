"""Sweep every causal-LM architecture of the installed transformers through lmeval.

Each architecture of ``AutoModelForCausalLM``'s mapping is built tiny with random, widened
weights (tests/tiny_arch.py), loaded with `prepare_model` (the load-time probes), scored by
`score_texts` at S = L and S < L and three batch sizes, and compared per token with a
float64 log-softmax of the model's own logits on each window alone. Prints one row per
architecture as it finishes, then the counts and the runtime:

    python scripts/sweep_architectures.py            # all of them (slow on a small CPU)
    python scripts/sweep_architectures.py llama xlnet --quick

Columns: result (pass / FAIL / refused / skipped / error), head (fast: body + head on
scored positions; fallback: plain model(...).logits), batching (padded / equal_length /
equal_length_no_mask / one_window), max_error (nats, over every token and setting);
``--errors`` adds each setting's largest error under its row. Windows are 16 tokens, or 40
for a model whose config declares a top-k selection of keys (``index_topk``).
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import train_bpe
from tiny_arch import causal_lm_types, check_architecture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="model types to sweep (default: the whole mapping)")
    parser.add_argument("--quick", action="store_true", help="two texts and two batch sizes per architecture")
    parser.add_argument(
        "--errors", action="store_true", help="under each row, its largest error per (L, S, batch_tokens)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the probes' warnings would interleave with the table
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    tokenizer = train_bpe(Path(tempfile.mkdtemp()))
    types = args.model_types or causal_lm_types()
    header = f"{'model_type':26} {'result':8} {'head':8} {'batching':21} {'max_error':>9} {'seconds':>7}  note"
    print(header, flush=True)
    rows = []
    for model_type in types:
        row = check_architecture(model_type, tokenizer, quick=args.quick)
        rows.append(row)
        note = row["note"].replace("\n", " ")[:110]
        print(
            f"{row['model_type']:26} {row['result']:8} {row['head']:8} {row['batching']:21} "
            f"{row['max_error']:9.2e} {row['seconds']:7.1f}  {note}",
            flush=True,
        )
        if args.errors and row["errors"]:
            print(
                "    " + ", ".join(f"L={m} S={s} batch_tokens={b}: {e:.2e}" for (m, s, b), e in row["errors"].items())
            )
    print(summary(rows, time.perf_counter() - started), flush=True)
    return 0 if all(r["result"] in ("pass", "refused", "skipped") for r in rows) else 1


def summary(rows: list[dict], seconds: float) -> str:
    """The table's counts: results, and among the passing ones the head path and batching."""
    results = collections.Counter(r["result"] for r in rows)
    passed = [r for r in rows if r["result"] == "pass"]
    heads = collections.Counter(r["head"] for r in passed)
    batchings = collections.Counter(r["batching"] for r in passed)
    worst = max((r["max_error"] for r in passed), default=float("nan"))
    return (
        f"\n{len(rows)} architectures in {seconds:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(results.items()))
        + f"\npassing: fast path {heads.get('fast', 0)}, fallback {heads.get('fallback', 0)}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(batchings.items()))
        + f"; largest error {worst:.2e} nats"
    )


if __name__ == "__main__":
    raise SystemExit(main())
