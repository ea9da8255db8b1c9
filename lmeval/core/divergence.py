"""How far one model's next-token distribution has moved from another's, per token. Pure math.

For a checkpoint Q (the model) and its base P (the baseline), both predicting the same token
y after the same context, from two (N, V) chunks of logits:

- ``kl`` = KL(P || Q) = sum_v p_v (log p_v - log q_v), nats: the extra cost of coding the
  base's predictions with the model's code. 0 exactly when the two distributions agree;
  what llama.cpp's ``--kl-divergence`` reports.
- ``kl_reverse`` = KL(Q || P), nats: the same with the roles swapped (KL is not symmetric:
  the forward direction weighs the tokens the base finds likely, the reverse those the
  model does).
- ``delta_p`` = q_y - p_y: how much probability the true next token gained (> 0) or lost.
- ``same_top1``: both models' most likely token is the same (the first index among ties).
- ``nll`` = -log q_y and ``nll_baseline`` = -log p_y, nats.

Numerics. Everything is float32, from log-probabilities ``z - logsumexp(z)``, never
``softmax().log()``. With ``d = w - z`` (base minus model logits) and
``c = lse(w) - lse(z)``, ``log p - log q = d - c``, so ``KL(P || Q) = E_p[d] - c`` and
``KL(Q || P) = c - E_q[d]``; ``c`` is taken as ``(max w - max z) + log(s_w / s_z)`` from
the shifted sums, so no large log-sum-exp is subtracted from another. Two identical chunks
give exactly 0 (``d = 0``, ``s_w = s_z``). A tiny negative KL can only be rounding and is
clamped to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import Workspace

PAIR_FIELDS = ("kl", "kl_reverse", "delta_p", "same_top1", "nll", "nll_baseline")


@dataclass(frozen=True)
class PairStats:
    """Per-token divergence of a model from its baseline; every field is (N,), float32 unless
    noted (see the module docstring for the definitions and units)."""

    kl: torch.Tensor
    kl_reverse: torch.Tensor
    delta_p: torch.Tensor
    same_top1: torch.Tensor  # bool
    nll: torch.Tensor
    nll_baseline: torch.Tensor


def _float32(logits: torch.Tensor, name: str, workspace: Workspace | None, overwrite: bool) -> torch.Tensor:
    """A float32 (N, V) working copy of ``logits``, or ``logits`` itself when it is float32 and
    the caller allows it to be overwritten (the scorer's own scratch)."""
    if overwrite and logits.dtype == torch.float32:
        return logits
    if workspace is None:
        return logits.to(torch.float32, copy=True)
    return workspace.get(name, tuple(logits.shape), torch.float32, logits.device).copy_(logits)


def divergence_statistics(
    logits: torch.Tensor,
    logits_baseline: torch.Tensor,
    targets: torch.Tensor,
    workspace: Workspace | None = None,
    overwrite: bool = False,
) -> PairStats:
    """Per-token KL both ways, Δp, top-1 agreement and both nlls, in one pass over a chunk.

    ``logits`` are the model's (N, V), ``logits_baseline`` the baseline's (N, V) for the same
    positions (any float dtype, one device), ``targets`` the (N,) true next tokens. With a
    ``workspace`` the scratch buffers are reused across calls; with ``overwrite`` float32
    inputs are used as scratch (their values are destroyed). Three float32 (N, V) buffers
    are held at once: the two upcast logits (their exponentials are written over them) and
    d = w - z.
    """
    if logits.shape != logits_baseline.shape or logits.ndim != 2:
        raise ValueError(
            f"divergence_statistics: logits must both be (N, V) of one shape "
            f"(got {tuple(logits.shape)} and {tuple(logits_baseline.shape)})."
        )
    targets = targets.long()
    z = _float32(logits, "pair_z", workspace, overwrite)  # (N, V) model
    # The same tensor passed twice must not be overwritten twice: the baseline gets a copy.
    aliased = overwrite and logits_baseline.data_ptr() == logits.data_ptr()
    w = _float32(logits_baseline, "pair_w", workspace, overwrite and not aliased)  # (N, V) baseline
    if z.shape[0] == 0:
        empty = z.new_empty(0)
        return PairStats(empty, empty, empty, torch.zeros(0, dtype=torch.bool, device=z.device), empty, empty)
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    w_y = w.gather(1, targets[:, None]).squeeze(1)
    z_max, z_arg = z.max(dim=1)
    w_max, w_arg = w.max(dim=1)
    if workspace is None:
        d = w - z  # (N, V): log p - log q up to a per-row constant
    else:
        d = torch.sub(w, z, out=workspace.get("pair_d", tuple(z.shape), torch.float32, z.device))
    e_z = z.sub_(z_max[:, None]).exp_()  # (N, V) over z: q * s_z
    e_w = w.sub_(w_max[:, None]).exp_()  # (N, V) over w: p * s_w
    s_z, s_w = e_z.sum(dim=1), e_w.sum(dim=1)
    lse_z, lse_w = z_max + torch.log(s_z), w_max + torch.log(s_w)
    c = (w_max - z_max) + torch.log(s_w / s_z)  # lse(w) - lse(z)
    # E_p[d] and E_q[d]: each exponential is multiplied by d in place (it is not needed after
    # its sum), so no fourth (N, V) buffer; torch's cascaded sum keeps the float32 error small.
    kl = (e_w.mul_(d).sum(dim=1) / s_w - c).clamp_min_(0.0)
    kl_reverse = (c - e_z.mul_(d).sum(dim=1) / s_z).clamp_min_(0.0)
    nll, nll_baseline = lse_z - z_y, lse_w - w_y
    delta_p = torch.exp(-nll) - torch.exp(-nll_baseline)
    return PairStats(kl, kl_reverse, delta_p, z_arg == w_arg, nll, nll_baseline)
