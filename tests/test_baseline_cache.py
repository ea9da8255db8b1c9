"""A baseline kept as its top-K (`cached_divergence_statistics`, ``lmeval.divergence(...,
baseline_cache="topk")``): the documented bounds hold on every token against the exact
lockstep numbers, the other statistics are exact, and K = V gives the exact values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmeval
from conftest import CORPUS
from helpers import finetuned, rounded
from lmeval.core.divergence import cached_divergence_statistics, divergence_statistics, topk_cache

EXACT = ("topk_overlap", "kl_topk", "delta_p", "nll", "nll_baseline")
TOL = 1e-6  # float32 rounding of the stored log-probabilities


def assert_bounds(cached, exact, exact_at_full: bool = False):
    assert (cached["kl"] <= exact["kl"] + TOL).all()  # LOWER bounds
    assert (cached["kl_reverse"] <= exact["kl_reverse"] + TOL).all()
    assert (cached["acceptance"] >= exact["acceptance"] - TOL).all()  # an UPPER bound
    for key in EXACT + (("kl", "kl_reverse", "acceptance") if exact_at_full else ()):
        np.testing.assert_allclose(cached[key], exact[key], atol=TOL, rtol=1e-6, err_msg=key)
    assert (np.asarray(cached["same_top1"]) == np.asarray(exact["same_top1"])).all()


@pytest.mark.parametrize("k", [10, 100, 299, 300])
def test_bounds_on_synthetic_logits(k):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(80, 300, generator=g) * 2.0
    z = w + torch.randn(80, 300, generator=g) * 0.4
    y = torch.randint(0, 300, (80,), generator=g)
    exact = divergence_statistics(z, w, y, overlap_k=min(k, 10), kl_top_k=k)
    cached = cached_divergence_statistics(z, topk_cache(w, k), exact.nll_baseline, y, min(k, 10), k)
    as_dict = lambda s: {f: getattr(s, f).double().numpy() for f in s.__dataclass_fields__}  # noqa: E731
    assert_bounds(as_dict(cached), as_dict(exact), exact_at_full=k >= 299)  # a tail of one token: exact
    if k <= 100:
        assert (as_dict(exact)["kl"] - as_dict(cached)["kl"]).max() > 1e-4  # a real gap, not equality


def test_cache_k_below_the_statistics_k_is_refused():
    w = torch.randn(4, 50)
    with pytest.raises(ValueError, match="<= the cache's K"):
        cached_divergence_statistics(w, topk_cache(w, 5), torch.zeros(4), torch.zeros(4, dtype=torch.long), 10, 5)


@pytest.mark.parametrize("variant", [lambda m: rounded(m, 4), finetuned])
def test_through_the_scorer_the_bound_holds_on_every_token(variant, tiny_models, bpe_tokenizer):
    base = tiny_models["llama"]
    model = variant(base)
    pair = ((model, bpe_tokenizer), (base, bpe_tokenizer))
    exact = lmeval.divergence(CORPUS, *pair, kl_top_k=20, batch_tokens=64)
    cached = lmeval.divergence(CORPUS, *pair, kl_top_k=20, batch_tokens=64, baseline_cache="topk")
    assert cached[["doc_id", "position", "token_id"]].equals(exact[["doc_id", "position", "token_id"]])
    keys = ("kl", "kl_reverse", "acceptance", "same_top1", *EXACT)
    assert_bounds({k: cached[k].to_numpy(np.float64) for k in keys}, {k: exact[k].to_numpy(np.float64) for k in keys})
    full = lmeval.divergence(CORPUS, *pair, kl_top_k=len(bpe_tokenizer), batch_tokens=64, baseline_cache="topk")
    everything = lmeval.divergence(CORPUS, *pair, kl_top_k=len(bpe_tokenizer), batch_tokens=64)
    for key in ("kl", "kl_reverse", "acceptance"):  # K = V: no tail, the exact values
        np.testing.assert_allclose(full[key], everything[key], atol=TOL, err_msg=key)
