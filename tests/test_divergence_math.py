"""`divergence_statistics` on synthetic logits, against float64 log-softmax oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmeval.core.divergence import PAIR_FIELDS, divergence_statistics
from lmeval.core.losses import Workspace


def top_set(x: np.ndarray, k: int) -> np.ndarray:
    """(N, k) ids of each row's k largest values, a tie to the lower id (a lexicographic sort)."""
    ids = np.arange(x.shape[1])
    return np.stack([np.lexsort((ids, -row))[:k] for row in x])


def oracle(z: torch.Tensor, w: torch.Tensor, y: torch.Tensor, k: int = 10, big_k: int = 100) -> dict[str, np.ndarray]:
    """Every statistic from a float64 log-softmax of each chunk's full logits."""
    log_q, log_p = torch.log_softmax(z.double(), 1), torch.log_softmax(w.double(), 1)
    q_y, p_y = log_q.gather(1, y[:, None]).squeeze(1).exp(), log_p.gather(1, y[:, None]).squeeze(1).exp()
    zn, wn = z.double().numpy(), w.double().numpy()
    top_q, top_p = top_set(zn, k), top_set(wn, big_k)
    overlap = np.array([len(set(a) & set(b)) for a, b in zip(top_q, top_p[:, :k])]) / k
    kl_topk = []
    for row, s in enumerate(top_p):
        lp = torch.log_softmax(w.double()[row, s], 0)  # P restricted to S, renormalised
        lq = torch.log_softmax(z.double()[row, s], 0)
        kl_topk.append(float((lp.exp() * (lp - lq)).sum()))
    return {
        "kl": (log_p.exp() * (log_p - log_q)).sum(1).numpy(),
        "kl_reverse": (log_q.exp() * (log_q - log_p)).sum(1).numpy(),
        "delta_p": (q_y - p_y).numpy(),
        "same_top1": top_q[:, 0] == top_p[:, 0],
        "nll": -log_q.gather(1, y[:, None]).squeeze(1).numpy(),
        "nll_baseline": -log_p.gather(1, y[:, None]).squeeze(1).numpy(),
        "acceptance": torch.minimum(log_p.exp(), log_q.exp()).sum(1).numpy(),
        "topk_overlap": overlap,
        "kl_topk": np.array(kl_topk),
    }


ABSOLUTE = ("kl", "kl_reverse", "delta_p", "acceptance", "topk_overlap", "kl_topk")


def logits(n: int, vocab: int, scale: float, shift: float, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * scale
    w = z + torch.randn(n, vocab, generator=g) * shift * scale
    return z.to(dtype), w.to(dtype), torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale, shift", [(1.0, 0.05), (3.0, 0.3), (2.0, 1.0)])
def test_matches_float64(dtype, scale, shift):
    z, w, y = logits(48, 3000, scale, shift, seed=1, dtype=dtype)
    got = divergence_statistics(z, w, y, Workspace())
    want = oracle(z, w, y)  # the oracle sees the same (possibly bf16-rounded) logits
    for key in ABSOLUTE:
        np.testing.assert_allclose(getattr(got, key).double().numpy(), want[key], atol=1e-6, rtol=0, err_msg=key)
    for key in ("nll", "nll_baseline"):
        np.testing.assert_allclose(getattr(got, key).double().numpy(), want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(got.same_top1.numpy(), want["same_top1"])
    assert got.kl.dtype == torch.float32 and got.same_top1.dtype == torch.bool


def test_identical_logits_give_exactly_zero():
    z, _, y = logits(32, 2000, 5.0, 0.0, seed=2)
    got = divergence_statistics(z, z.clone(), y)
    assert got.kl.abs().max() == 0 and got.kl_reverse.abs().max() == 0 and got.delta_p.abs().max() == 0
    assert bool((got.acceptance == 1).all()) and bool((got.topk_overlap == 1).all()) and got.kl_topk.abs().max() == 0
    assert bool(got.same_top1.all())
    np.testing.assert_array_equal(got.nll.numpy(), got.nll_baseline.numpy())


def test_kl_is_never_negative_and_agrees_with_a_closed_form():
    # Two-token vocabularies: KL(Bern(a) || Bern(b)) in closed form.
    a, b = torch.tensor([0.5, 0.9, 0.01, 0.3]), torch.tensor([0.5, 0.8, 0.02, 0.7])
    w = torch.stack([torch.log(a), torch.log1p(-a)], 1)
    z = torch.stack([torch.log(b), torch.log1p(-b)], 1)
    got = divergence_statistics(z, w, torch.zeros(4, dtype=torch.long))
    a64, b64 = a.double().numpy(), b.double().numpy()
    closed = a64 * np.log(a64 / b64) + (1 - a64) * np.log((1 - a64) / (1 - b64))
    np.testing.assert_allclose(got.kl.numpy(), closed, atol=1e-7)
    np.testing.assert_allclose(got.delta_p.numpy(), b64 - a64, atol=1e-7)
    assert got.kl[0] == 0 and (got.kl >= 0).all() and (got.kl_reverse >= 0).all()


def test_inputs_survive_unless_overwrite_and_a_tensor_given_twice_is_safe():
    z, w, y = logits(16, 500, 2.0, 0.2, seed=3)
    z0, w0 = z.clone(), w.clone()
    reference = divergence_statistics(z, w, y)
    assert torch.equal(z, z0) and torch.equal(w, w0)  # not overwritten by default
    workspace = Workspace()
    for _ in range(2):  # reused buffers give the same numbers
        again = divergence_statistics(z, w, y, workspace)
        for key in PAIR_FIELDS:
            assert torch.equal(getattr(again, key), getattr(reference, key)), key
    scratch = z.clone()
    same = divergence_statistics(scratch, scratch, y, workspace, overwrite=True)
    assert same.kl.abs().max() == 0  # the aliased baseline was copied before the model was overwritten
    overwritten = divergence_statistics(z.clone(), w.clone(), y, workspace, overwrite=True)
    for key in PAIR_FIELDS:
        assert torch.equal(getattr(overwritten, key), getattr(reference, key)), key


def test_rows_are_independent_of_chunking():
    z, w, y = logits(40, 700, 2.0, 0.5, seed=4)
    whole = divergence_statistics(z, w, y)
    pieces = [divergence_statistics(z[i : i + 7], w[i : i + 7], y[i : i + 7]) for i in range(0, 40, 7)]
    for key in PAIR_FIELDS:
        np.testing.assert_allclose(
            torch.cat([getattr(p, key) for p in pieces]).numpy(), getattr(whole, key).numpy(), atol=1e-7
        )


def test_empty_and_mismatched_shapes():
    empty = divergence_statistics(torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0, dtype=torch.long))
    assert all(getattr(empty, k).shape == (0,) for k in PAIR_FIELDS)
    with pytest.raises(ValueError, match="one shape"):
        divergence_statistics(torch.zeros(2, 9), torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))


def test_kl_of_a_good_quantization_is_accurate_to_1e_8():
    """An int8-like copy (every logit +- 0.004, mean KL ~1e-5 nats at V = 32k): a float32
    E_p[r] sum is ~2e-7 nats off per token (3% of the KL); the term-wise sums are not."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 32000, generator=g) * 2.5
    w[:, :50] += 6.0  # a peaked head, as a language model's
    z = w + torch.randn(48, 32000, generator=g) * 0.004 + 0.3  # noise and a constant offset
    y = torch.randint(0, 32000, (48,), generator=g)
    got, want = divergence_statistics(z, w, y), oracle(z, w, y)
    assert 1e-6 < want["kl"].mean() < 1e-4
    for key, bound in (("kl", 1e-8), ("kl_reverse", 1e-8), ("acceptance", 1.5e-7)):  # acceptance: float32 near 1
        error = np.abs(getattr(got, key).double().numpy() - want[key]).max()
        assert error < bound, (key, error)


@pytest.mark.parametrize("k, big_k", [(1, 1), (3, 7), (10, 100), (64, 64), (200, 500)])
def test_top_sets_break_ties_by_the_lower_id(k, big_k):
    """Logits drawn from a few values (every top set crosses a tie): overlap and top-K KL
    equal the oracle's lexicographic sets; k and K beyond V use all V."""
    g = torch.Generator().manual_seed(6)
    z = torch.randint(0, 4, (24, 150), generator=g).float()
    w = torch.randint(0, 4, (24, 150), generator=g).float()
    y = torch.zeros(24, dtype=torch.long)
    got = divergence_statistics(z, w, y, overlap_k=k, kl_top_k=big_k)
    want = oracle(z, w, y, min(k, 150), min(big_k, 150))
    np.testing.assert_allclose(got.topk_overlap.double().numpy(), want["topk_overlap"], atol=1e-7)
    np.testing.assert_allclose(got.kl_topk.double().numpy(), want["kl_topk"], atol=1e-6)
    np.testing.assert_array_equal(got.same_top1.numpy(), want["same_top1"])
    assert np.isin(got.topk_overlap.numpy() * min(k, 150), np.arange(min(k, 150) + 1)).all()


def test_top_k_kl_over_the_whole_vocabulary_is_the_kl():
    z, w, y = logits(16, 300, 2.0, 0.5, seed=8)
    got = divergence_statistics(z, w, y, kl_top_k=300)
    np.testing.assert_allclose(got.kl_topk.numpy(), got.kl.numpy(), atol=1e-6)


def test_far_apart_tokens_stay_finite():
    """q/p beyond float32's range on some tokens (logits 100 apart): the q - p of those
    tokens is a subtraction, and every statistic is finite and matches the oracle (within
    float32's spacing at r ~ 100: 100 * 6e-8 per term)."""
    z, w, y = logits(8, 400, 1.0, 0.0, seed=9)
    w[:, :5] += 100.0  # the base is sure of tokens the model finds e^-100 unlikely
    got, want = divergence_statistics(z, w, y), oracle(z, w, y)
    for key in ABSOLUTE:
        value = getattr(got, key).double().numpy()
        assert np.isfinite(value).all(), key
        np.testing.assert_allclose(value, want[key], atol=1e-6, rtol=1e-5, err_msg=key)
