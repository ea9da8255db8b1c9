"""Benchmark: memory and time of the divergence pass (two models, one lean pass) against
scoring one of them, at the same batch_tokens, side by side in one run.

    python scripts/bench_divergence.py [--tokens N] [--threads T] [--batch-tokens B]

Both models are `bench.py`'s ``llama-128k``: a random Llama-style body (hidden 64, 2 layers)
under a 128,256-token vocabulary, so the (N, V) logits, not the body, decide the memory.
The "model" is the base with its weights nudged (so the KL is not 0). Each method runs in
its own subprocess, so its peak RSS is its own:

  single   lmeval.score_texts(model): one model loaded, scored
  pair     lmeval.divergence(model, base): both models loaded, scored together

Reported: the RSS once the weights are loaded, the peak RSS of the process, the peak rise
above the loaded weights (the scoring's working memory), on CUDA the same for allocated
memory, tokens/second, and the pair/single ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

MAX_LENGTH = 1024


def child(args) -> dict:
    import lmeval

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (device == "cuda" and args.bf16) else torch.float32
    model, tokenizer = bench.build_model("llama-128k", dtype, device)
    texts = bench.load_texts(args.tokens, tokenizer)
    if args.method == "pair":
        base, _ = bench.build_model("llama-128k", dtype, device)
        with torch.no_grad():  # a "fine-tune": every weight nudged by 5% of its spread
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05 * p.float().std().clamp_min(1e-3).to(p.dtype))

        def run(docs):
            return lmeval.divergence(
                docs, (model, tokenizer), (base, tokenizer), max_length=MAX_LENGTH, batch_tokens=args.batch_tokens
            )
    else:

        def run(docs):
            return lmeval.score_texts(
                docs, (model, tokenizer), max_length=MAX_LENGTH, batch_tokens=args.batch_tokens, compile=False
            )

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = bench.rss_mb()
    cuda_loaded = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0
    run(texts[:1])  # untimed warm-up
    started = time.perf_counter()
    table = run(texts)
    seconds = time.perf_counter() - started
    out = {
        "tokens": len(table),
        "seconds": seconds,
        "loaded_mb": loaded,
        "peak_mb": bench.peak_rss_mb(),
        "kl_mean": float(table["kl"].mean()) if "kl" in table else None,
    }
    if device == "cuda":
        out["cuda_loaded_mb"], out["cuda_peak_mb"] = cuda_loaded, torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8000, help="tokens to score (default: 8000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per child (default: 2)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="the one batch_tokens of both (default: 8192)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights on CUDA")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=("single", "pair"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for method in ("single", "pair"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--method",
            method,
            "--tokens",
            str(args.tokens),
            "--threads",
            str(args.threads),
            "--batch-tokens",
            str(args.batch_tokens),
        ] + (["--bf16"] if args.bf16 else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    report(results, args)


def report(results: dict, args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"== llama-128k (V = 128256, hidden 64, 2 layers), L = {MAX_LENGTH}, batch_tokens = {args.batch_tokens}, "
        f"threads = {args.threads}, device = {device}"
    )
    print(
        f"{'method':<8} {'tokens':>7} {'tok/s':>8} {'loaded MB':>10} {'peak MB':>9} {'rise MB':>9}"
        + (f" {'CUDA loaded':>12} {'CUDA peak':>10} {'CUDA rise':>10}" if device == "cuda" else "")
    )
    for name, r in results.items():
        line = (
            f"{name:<8} {r['tokens']:>7} {r['tokens'] / r['seconds']:>8.0f} {r['loaded_mb']:>10.0f} "
            f"{r['peak_mb']:>9.0f} {r['peak_mb'] - r['loaded_mb']:>9.0f}"
        )
        if "cuda_peak_mb" in r:
            line += f" {r['cuda_loaded_mb']:>12.0f} {r['cuda_peak_mb']:>10.0f} {r['cuda_peak_mb'] - r['cuda_loaded_mb']:>10.0f}"
        print(line)
    s, p = results["single"], results["pair"]
    print(
        f"pair / single: peak RSS {p['peak_mb'] / s['peak_mb']:.3f}x, working memory (peak rise above the loaded "
        f"weights) {(p['peak_mb'] - p['loaded_mb']) / (s['peak_mb'] - s['loaded_mb']):.3f}x, "
        f"time per token {s['tokens'] / s['seconds'] / (p['tokens'] / p['seconds']):.2f}x (target: memory <= 1.2x)"
    )
    if "cuda_peak_mb" in s:
        print(
            f"pair / single on CUDA: peak allocated {p['cuda_peak_mb'] / s['cuda_peak_mb']:.3f}x, rise "
            f"{(p['cuda_peak_mb'] - p['cuda_loaded_mb']) / (s['cuda_peak_mb'] - s['cuda_loaded_mb']):.3f}x"
        )
    print(f"mean KL of the nudged model from its base: {p['kl_mean']:.4g} nats over {p['tokens']} tokens")


if __name__ == "__main__":
    main()
