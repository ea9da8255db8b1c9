"""Benchmark: lmeval's scorer against a bare ``model(input_ids).logits`` forward, on a small
GPT-2-style model with a 50k vocabulary, over the same windows, as ratios from one run.

    python scripts/bench_scoring.py [--tokens N] [--threads T]

A thin entry to `scripts/bench.py` (which also measures lm-evaluation-harness and larger
vocabularies): it runs the `gpt2-50k` model with the bare forward and lmeval in auto, eager
and compiled modes, each in its own subprocess so that peak RSS is its own.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

if __name__ == "__main__":
    bench.main(
        ["--models", "gpt2-50k", "--methods", "bare", "lmeval", "lmeval-eager", "lmeval-compiled", *sys.argv[1:]]
    )
