"""The cost of the word-boundary masses (corrected word surprisal) in the scorer.

Scores the same windows of a random GPT-2-shaped model (vocabulary 32k) with and without
``ScoreOptions.mass_masks`` and prints the time ratio, measured side by side in one run.
Usage: python scripts/bench_word_mass.py [--tokens 4096] [--vocab 32000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmeval.core.windows import make_windows
from lmeval.core.words import mass_masks
from lmeval.model.loading import prepare_model
from lmeval.model.scorer import ScoreOptions, score_windows


class _Tok:  # the scorer never tokenizes; prepare_model only stores it
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=512, n_embd=64, n_layer=2, n_head=2)).eval()
    lm = prepare_model(model, _Tok(), name="bench")
    ids = torch.randint(1, args.vocab, (args.tokens,)).tolist()
    windows = [w for i in range(0, args.tokens, 512) for w in make_windows(i, ids[i : i + 512], (0,), 512, 512)]
    start = np.random.default_rng(0).random(args.vocab) < 0.4
    plain = ScoreOptions(compile=False)
    masses = ScoreOptions(compile=False, mass_masks=mass_masks(start, 0))
    times = {"plain": [], "masses": []}
    for _ in range(args.repeats):
        for name, options in (("plain", plain), ("masses", masses)):
            began = time.perf_counter()
            score_windows(lm, windows, options)
            times[name].append(time.perf_counter() - began)
    best = {k: min(v) for k, v in times.items()}
    print(
        f"tokens {args.tokens}, vocab {args.vocab}: plain {best['plain']:.3f} s, with masses {best['masses']:.3f} s, "
        f"ratio {best['masses'] / best['plain']:.3f}"
    )


if __name__ == "__main__":
    main()
