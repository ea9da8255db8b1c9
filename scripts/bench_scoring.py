"""Benchmark: lmeval's scorer against a bare ``model(input_ids).logits`` forward.

Both run over the same windows and the same batches, each in its own subprocess so that
peak RSS is its own. Reported as ratios measured side by side in one run:

    python scripts/bench_scoring.py                       # 50k-vocab GPT-2-style model
    python scripts/bench_scoring.py --vocab 128256 --max-length 1024 --n-embd 64

Throughput ratio > 1 means lmeval is faster than the bare forward; peak-memory ratio < 1
means lmeval peaks lower. Peak memory is the rise of peak RSS over the RSS after loading.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


# lmeval-compiled fuses the per-token reductions with torch.compile (compile time excluded:
# one warm-up pass runs before timing, as it does for every variant).
VARIANTS = ("bare", "lmeval", "lmeval-compiled")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.max_length, n_embd=args.n_embd, n_layer=args.n_layer, n_head=4
    )
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    docs = []
    remaining = args.tokens
    while remaining > 0:
        n = min(remaining, int(torch.randint(50, 3 * args.max_length, (1,), generator=gen)))
        docs.append(torch.randint(0, args.vocab, (n,), generator=gen).tolist())
        remaining -= n
    return model, docs


def child(args) -> dict:
    from lmeval.scoring import ScoreOptions, pack_batches, prepare_model, score_windows
    from lmeval.windows import make_windows

    torch.set_num_threads(args.threads)
    model, docs = build(args)
    windows = [w for i, d in enumerate(docs) for w in make_windows(i, d, [0], args.max_length, args.max_length)]
    n_tokens = sum(w.n_scored for w in windows)
    batches = pack_batches(windows, args.batch_tokens)

    class _Tok:  # the scorer needs no tokenizer; prepare_model only stores it
        pass

    lm = prepare_model(model, _Tok(), name="bench")
    options = ScoreOptions(batch_tokens=args.batch_tokens, compile=args.variant == "lmeval-compiled")

    @torch.inference_mode()
    def bare():
        for batch in batches:
            width = max(len(windows[i].input_ids) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(windows[i].input_ids)] = torch.tensor(windows[i].input_ids)
                mask[row, : len(windows[i].input_ids)] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def scorer():
        score_windows(lm, windows, options)

    run = bare if args.variant == "bare" else scorer
    base_rss = current_rss_mb()
    run()  # warm-up: allocator, thread pool, and the compile of lmeval-compiled
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"tokens": n_tokens, "seconds": statistics.median(times), "peak_rise_mb": peak_rss_mb() - base_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    bare = results["bare"]
    print(f"model: GPT-2 style, V={args.vocab}, n_embd={args.n_embd}, n_layer={args.n_layer}, "
          f"L={args.max_length}, batch_tokens={args.batch_tokens}, threads={args.threads}")
    print(f"{'variant':<8} {'tokens':>8} {'seconds':>9} {'tok/s':>10} {'peak rise MB':>13}")
    for name, r in results.items():
        print(f"{name:<8} {r['tokens']:>8} {r['seconds']:>9.3f} {r['tokens'] / r['seconds']:>10.0f} {r['peak_rise_mb']:>13.1f}")
    for name in VARIANTS[1:]:
        ours = results[name]
        print(f"{name}/bare: throughput {bare['seconds'] / ours['seconds']:.2f}x, "
              f"peak memory {ours['peak_rise_mb'] / max(bare['peak_rise_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
