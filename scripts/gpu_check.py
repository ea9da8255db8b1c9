"""One command that checks lmeval on a GPU: speed and memory at scale, exactness, no recompiles.

    python scripts/gpu_check.py                  # on one large GPU, < 8 minutes, no network
    python scripts/gpu_check.py --smoke          # the same code paths on CPU, tiny, ~1 minute

1. Scale: a random Llama-style model of about 1.2B parameters with a 128k vocabulary, built
   from a config (Llama-3.2-1B's shape, bf16), scores the demo's held-out books (through
   the demo tokenizer; ids index the first rows of the 128k embedding) at L = S = 2048:
     bare     model(input_ids).logits over lmeval's batches (the physical floor)
     lmeval   lmeval.score_texts (compile: auto, i.e. compiled reductions on CUDA)
     lm-eval  HFLM.loglikelihood_rolling, if lm-evaluation-harness is installed
   tokens/second, peak CUDA memory above the weights, and the per-document agreement of sum NLL.
2. Exactness: tiny GPT-2, Llama and GPT-NeoX models in float32 and bfloat16 on the device;
   lmeval's per-token nll against a float64 log-softmax of the model's own full logits.
3. Compile: scoring batches of different shapes with compiled reductions adds no graph after
   the first (dynamo's counters).
Prints one table and writes it as JSON (--out). Targets (GPU): lmeval >= 1.0x bare, >= 2x
lm-eval, peak memory <= 0.5x lm-eval's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (load_texts, the demo tokenizer)

BIG = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=8192,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def big_model(shape: dict, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def timed(fn, device) -> tuple[object, float, float]:
    """(result, seconds, peak memory in MiB above what was allocated before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else float("nan")
    return out, seconds, peak


def scale(args, device) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bench.DEMO / "final")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = big_model(SMOKE if args.smoke else BIG, dtype, device)
    length = 64 if args.smoke else 2048
    batch_tokens = 1024 if args.smoke else 16384
    texts = bench.load_texts(args.tokens, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    runners = {
        "bare": lambda t: bench.run_bare(model, tokenizer, t, length, batch_tokens),
        "lmeval": lambda t: bench.run_lmeval(model, tokenizer, t, length, batch_tokens),
    }
    try:
        import lm_eval  # noqa: F401

        runners["lm-eval"] = lambda t: bench.run_lm_eval(model, tokenizer, t, length, batch_tokens)
    except ImportError:
        print("lm-eval is not installed: skipping it")
    n_tokens = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    rows, sums = [], {}
    for name, run in runners.items():
        run(texts[:1])  # untimed warm-up: kernels, allocator, the compile of lmeval's reductions
        sums[name], seconds, peak = timed(functools.partial(run, texts), device)
        rows.append(
            {
                "check": f"scale/{name}",
                "tokens": n_tokens,
                "seconds": round(seconds, 3),
                "tokens_per_second": round(n_tokens / seconds),
                "peak_mib": round(peak, 1),
            }
        )
    by = {r["check"].split("/")[1]: r for r in rows}
    for other in ("bare", "lm-eval"):
        if other in by:
            r = {
                "check": f"scale/lmeval vs {other}",
                "throughput_x": round(by[other]["seconds"] / by["lmeval"]["seconds"], 2),
                "peak_x": round(by["lmeval"]["peak_mib"] / by[other]["peak_mib"], 3) if by[other]["peak_mib"] else None,
            }
            if other == "lm-eval":
                rel = [abs(a - b) / abs(b) for a, b in zip(sums["lmeval"], sums["lm-eval"]) if b]
                r["max_rel_doc_nll_diff"] = float(f"{max(rel):.2e}")
            rows.append(r)
    rows.insert(
        0,
        {
            "check": "scale/model",
            "parameters": n_params,
            "vocab": model.config.vocab_size,
            "dtype": str(dtype).replace("torch.", ""),
            "max_length": length,
        },
    )
    return rows


def exactness(device) -> list[dict]:
    """lmeval's nll against a float64 log-softmax of the full logits of the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig

    import lmeval
    from lmeval.core.windows import make_windows
    from lmeval.model.loading import prepare_model

    tokenizer = AutoTokenizer.from_pretrained(bench.DEMO / "final")
    texts = [t[:600] for t in bench.load_texts(3000, tokenizer)[:3]] + ["In the beginning."]
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    configs = {
        "gpt2": GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2),
        "llama": LlamaConfig(num_key_value_heads=1, **common),
        "gpt_neox": GPTNeoXConfig(**common),
    }
    rows = []
    for arch, config in configs.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            config.tie_word_embeddings = False
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device, dtype).eval()
            with torch.no_grad():
                model.get_output_embeddings().weight.normal_(0, 0.5)
            lm = prepare_model(model, tokenizer, name=arch)
            frame = lmeval.score_texts(texts, lm, max_length=32, stride=16)
            ours = frame.sort_values(["doc_id", "position"]).nll.to_numpy(np.float64)
            expected = []
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                for i, t in enumerate(ids):
                    for w in make_windows(i, t, [tokenizer.eos_token_id], 32, 16):
                        logits = model(torch.tensor([w.input_ids], device=device)).logits[0, w.first_scored :]
                        log_q = torch.log_softmax(logits.double(), dim=-1)
                        expected += (-log_q[torch.arange(w.n_scored), torch.tensor(w.targets)]).tolist()
            diff = float(np.max(np.abs(ours - np.asarray(expected))))
            # bf16: the fast head path and the full forward round their bf16 logits apart
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            rows.append(
                {
                    "check": f"exact/{arch}/{str(dtype).replace('torch.', '')}",
                    "tokens": len(ours),
                    "max_abs_nll_diff": float(f"{diff:.2e}"),
                    "tolerance": tol,
                    "ok": diff <= tol,
                    "reductions": frame.attrs["reductions"],
                }
            )
    return rows


def recompiles(device) -> list[dict]:
    """Batches of several shapes through compiled reductions: one graph, however many lengths."""
    from torch._dynamo.utils import counters

    from lmeval.core.windows import make_windows
    from lmeval.model.loading import prepare_model
    from lmeval.model.scorer import ScoreOptions, score_windows

    model = big_model(SMOKE, torch.float32, device)
    from transformers import AutoTokenizer

    lm = prepare_model(model, AutoTokenizer.from_pretrained(bench.DEMO / "final"), name="compile-check")
    rng = np.random.default_rng(0)
    options = ScoreOptions(batch_tokens=256, compile=True, chunk_bytes=8 * 4 * SMOKE["vocab_size"] * 6)
    first = [w for i in range(3) for w in make_windows(i, rng.integers(1, 4000, 40).tolist(), [0], 32, 32)]
    score_windows(lm, first, options)
    graphs = counters["stats"]["unique_graphs"]
    lengths = [3, 7, 19, 33, 50, 64, 90]
    windows = [
        w for i, n in enumerate(lengths) for w in make_windows(i, rng.integers(1, 4000, n).tolist(), [0], 32, 32)
    ]
    calls = dict(lm.workspace.calls)
    score_windows(lm, windows, options)
    added = counters["stats"]["unique_graphs"] - graphs
    return [
        {
            "check": "compile/no recompiles",
            "windows": len(windows),
            "graphs_added": added,
            "ok": added == 0,
            "reductions": lm.workspace.mode_since(calls),
        }
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: check the code paths, not the GPU")
    parser.add_argument("--tokens", type=int, default=None, help="tokens for the scale check (default 400k; smoke 3k)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device. Run it on a GPU machine, or pass --smoke to check the code paths on CPU.")
        return 2
    args.tokens = args.tokens or (3000 if args.smoke else 400_000)
    device = torch.device("cpu" if args.smoke else "cuda")
    started = time.perf_counter()
    rows = scale(args, device) + exactness(device) + recompiles(device)
    record = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    for row in rows:
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
    print(f"device {record['device']}, {record['seconds']} s")
    Path(args.out).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
