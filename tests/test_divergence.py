"""Divergence from a baseline, per token: against a float64 oracle from both models' full
logits, a model against itself, refused tokenizer mismatches, and summaries that equal a
direct numpy computation over the per-token table."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CORPUS, build_model, train_bpe

import lmeval
from lmeval import TokenizerMismatchError
from lmeval.core.divergence import divergence_statistics
from lmeval.core.losses import Workspace
from lmeval.model.loading import prepare_model

TEXTS = CORPUS[:4] + ["short", "é 猫 😀 mixed scripts and emoji"]


def finetuned(model, scale: float = 0.05, seed: int = 7):
    """A copy of ``model`` with every weight nudged: a stand-in for a fine-tuned checkpoint."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp_min(1e-3))
    return other


def oracle(model, baseline, ids: list[int]) -> dict[str, np.ndarray]:
    """Every statistic for s[1:], from each model's full forward over ``ids``, in float64."""
    with torch.no_grad():
        log_q = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)  # (T-1, V)
        log_p = torch.log_softmax(baseline(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    y = torch.tensor(ids[1:])[:, None]
    q_y, p_y = log_q.gather(1, y).squeeze(1).exp(), log_p.gather(1, y).squeeze(1).exp()
    return {
        "kl": (log_p.exp() * (log_p - log_q)).sum(1).numpy(),
        "kl_reverse": (log_q.exp() * (log_q - log_p)).sum(1).numpy(),
        "delta_p": (q_y - p_y).numpy(),
        "same_top1": (log_q.argmax(1) == log_p.argmax(1)).numpy(),
        "nll": -q_y.log().numpy(),
        "nll_baseline": -p_y.log().numpy(),
    }


@pytest.fixture(scope="module")
def pair(bpe_tokenizer):
    base = build_model("gpt2", len(bpe_tokenizer), seed=0)
    return finetuned(base), base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["finetuned", "unrelated"])
def test_matches_float64_oracle_from_full_logits(dtype, kind, pair, bpe_tokenizer):
    model, base = pair
    if kind == "unrelated":
        model = build_model("gpt2", len(bpe_tokenizer), seed=1)
    model, base = copy.deepcopy(model).to(dtype), copy.deepcopy(base).to(dtype)
    table = lmeval.divergence(TEXTS, (model, bpe_tokenizer), (base, bpe_tokenizer), batch_tokens=1)
    bos = bpe_tokenizer.eos_token_id
    for i, text in enumerate(TEXTS):
        ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = table[table.doc_id == i]
        assert rows.position.tolist() == list(range(len(ids)))
        expected = oracle(model, base, [bos] + ids)
        for key in ("kl", "kl_reverse", "delta_p"):
            print(dtype, kind, key, np.abs(rows[key].to_numpy(np.float64) - expected[key]).max())
            np.testing.assert_allclose(rows[key].to_numpy(np.float64), expected[key], atol=1e-6, rtol=0, err_msg=key)
        for key in ("nll", "nll_baseline"):  # float32 itself is 1e-6 coarse at 10 nats: relative
            np.testing.assert_allclose(rows[key].to_numpy(np.float64), expected[key], rtol=1e-6, atol=1e-6, err_msg=key)
        np.testing.assert_array_equal(rows.same_top1.to_numpy(), expected["same_top1"])
