"""`divergence_statistics` on synthetic logits, against float64 log-softmax oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmeval.core.divergence import PAIR_FIELDS, divergence_statistics
from lmeval.core.losses import Workspace


def oracle(z: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """KL both ways, Δp, top-1 agreement and both nlls from a float64 log-softmax of each."""
    log_q, log_p = torch.log_softmax(z.double(), 1), torch.log_softmax(w.double(), 1)
    q_y, p_y = log_q.gather(1, y[:, None]).squeeze(1).exp(), log_p.gather(1, y[:, None]).squeeze(1).exp()
    return {
        "kl": (log_p.exp() * (log_p - log_q)).sum(1).numpy(),
        "kl_reverse": (log_q.exp() * (log_q - log_p)).sum(1).numpy(),
        "delta_p": (q_y - p_y).numpy(),
        "same_top1": (z.argmax(1) == w.argmax(1)).numpy(),
        "nll": -log_q.gather(1, y[:, None]).squeeze(1).numpy(),
        "nll_baseline": -log_p.gather(1, y[:, None]).squeeze(1).numpy(),
    }


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
    for key in ("kl", "kl_reverse", "delta_p"):
        np.testing.assert_allclose(getattr(got, key).double().numpy(), want[key], atol=1e-6, rtol=0, err_msg=key)
    for key in ("nll", "nll_baseline"):
        np.testing.assert_allclose(getattr(got, key).double().numpy(), want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(got.same_top1.numpy(), want["same_top1"])
    assert got.kl.dtype == torch.float32 and got.same_top1.dtype == torch.bool


def test_identical_logits_give_exactly_zero():
    z, _, y = logits(32, 2000, 5.0, 0.0, seed=2)
    got = divergence_statistics(z, z.clone(), y)
    assert got.kl.abs().max() == 0 and got.kl_reverse.abs().max() == 0 and got.delta_p.abs().max() == 0
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
