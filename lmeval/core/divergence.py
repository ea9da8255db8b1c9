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
- ``same_top1``: both models' most likely token is the same (the lower token id among ties).
- ``nll`` = -log q_y and ``nll_baseline`` = -log p_y, nats.
- ``acceptance`` = sum_v min(p_v, q_v) = 1 - TV(P, Q): the probability that a token drawn
  from Q is accepted by speculative decoding's rejection rule against P (Leviathan et al.
  2023), 1 exactly when the distributions agree.
- ``topk_overlap`` = |top-k(P) ∩ top-k(Q)| / k, k = ``overlap_k``: the share of the base's k
  likeliest tokens that the model also ranks among its k likeliest.
- ``kl_topk``: brevitas' top-K-normalised KL. S is the base's K likeliest tokens
  (K = ``kl_top_k``), P_S and Q_S are P and Q restricted to S and each renormalised to sum
  to 1 over S, and ``kl_topk`` = KL(P_S || Q_S), nats. It ignores how the mass outside S
  moved; with K = V it is ``kl``.

Top sets are ranked on the logits as given (the order of the probabilities, without the
rounding of an exponential), and a tie at the k-th place goes to the lower token id, so a
set never depends on the kernel's order.

Numerics. Log-probabilities come from ``z - logsumexp(z)`` on float32 logits, never
``softmax().log()``. With ``r = log p - log q = (w - z) - c`` per token (``c = lse(w) -
lse(z)``, taken as ``(max w - max z) + log(s_w / s_z)`` from the shifted sums, so no large
log-sum-exp is subtracted from another), the KLs are summed term by term as

    KL(P || Q) = sum_v [p_v r_v + (q_v - p_v)],    KL(Q || P) = sum_v [(p_v - q_v) - q_v r_v],

the same sums (sum q = sum p = 1), but every term is >= 0 and of the size of the KL's own
share, so nothing large cancels; ``q - p`` is ``p * expm1(-r)``, accurate where the two
are close. The float32 rounding of ``c`` (~1e-7) shifts every r alike; ``sum (q - p)``,
which must be 0, measures that shift, and it is folded back into r and q - p. Summing
``E_p[w - z] - c`` in float32, as lmeval did before, loses ~3e-7 nats a token when the
mean KL is 1e-5 (a good quantization at V = 32k); the term-wise sums are within ~1e-9
(``python scripts/bench_kl_accuracy.py``). Summing in float64 instead would upcast a copy
of each (N, V) chunk: twice the memory, and 12x slower on CPU. ``acceptance`` is ``1 -
sum |q - p| / 2`` from the same ``q - p`` (exactly 1 for identical chunks). The top-K KL is
float64 over the K gathered logits. Two identical chunks give exactly 0 for both KLs
(``r = 0``). A tiny negative KL can only be rounding and is clamped to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import Workspace

PAIR_FIELDS = (
    "kl",
    "kl_reverse",
    "delta_p",
    "same_top1",
    "nll",
    "nll_baseline",
    "acceptance",
    "topk_overlap",
    "kl_topk",
)
OVERLAP_K = 10  # compare.overlap_k's default
KL_TOP_K = 100  # compare.kl_top_k's default
# expm1(-r) is taken for r >= -20 (e^20 = 4.9e8, far from float32's overflow); below, q >> p
# and q - p is exact enough as a subtraction.
_EXPM1_LIMIT = 20.0


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
    acceptance: torch.Tensor
    topk_overlap: torch.Tensor
    kl_topk: torch.Tensor


def _float32(logits: torch.Tensor, name: str, workspace: Workspace | None, overwrite: bool) -> torch.Tensor:
    """A float32 (N, V) working copy of ``logits``, or ``logits`` itself when it is float32 and
    the caller allows it to be overwritten (the scorer's own scratch)."""
    if overwrite and logits.dtype == torch.float32:
        return logits
    if workspace is None:
        return logits.to(torch.float32, copy=True)
    return workspace.get(name, tuple(logits.shape), torch.float32, logits.device).copy_(logits)


def top_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) ids of the k largest entries of each row of ``x`` (N, V), ordered by value
    (largest first), a tie broken by the lower id, at the k-th place as anywhere else.

    ``torch.topk`` leaves the order of ties to the kernel; rows whose k-th value is shared
    beyond the k-th place (rare with real logits, common with rounded ones) are redone
    exactly: every id above the k-th value, then the lowest ids equal to it."""
    vocab = x.shape[1]
    values, ids = x.topk(min(k + 1, vocab), dim=1)  # (N, k + 1), ties in any order
    kth = values[:, k - 1 : k]  # (N, 1)
    # a tie across the k-th place: the (k+1)-th value equals the k-th (more candidates than places)
    ambiguous = (
        values[:, k] == values[:, k - 1] if k < vocab else torch.zeros(len(x), dtype=torch.bool, device=x.device)
    )
    ids = ids[:, :k]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        sub, sub_kth = x[rows], kth[rows]  # (n, V), (n, 1)
        above, equal = sub > sub_kth, sub == sub_kth
        places = k - above.sum(dim=1, keepdim=True)  # (n, 1) places left for the ties
        chosen = above | (equal & (equal.cumsum(dim=1) <= places))  # lowest ids first
        ids[rows] = chosen.nonzero()[:, 1].view(len(rows), k)  # exactly k per row, ascending ids
    ids = ids.sort(dim=1).values  # ascending id, then a stable sort by value keeps it among ties
    order = x.gather(1, ids).sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def divergence_statistics(
    logits: torch.Tensor,
    logits_baseline: torch.Tensor,
    targets: torch.Tensor,
    workspace: Workspace | None = None,
    overwrite: bool = False,
    overlap_k: int = OVERLAP_K,
    kl_top_k: int = KL_TOP_K,
) -> PairStats:
    """Per-token KL both ways, Δp, top-1 agreement, both nlls, the acceptance rate, the top-k
    overlap and the top-K KL, in one pass over a chunk.

    ``logits`` are the model's (N, V), ``logits_baseline`` the baseline's (N, V) for the same
    positions (any float dtype, one device), ``targets`` the (N,) true next tokens;
    ``overlap_k`` and ``kl_top_k`` are k and K (at most V is used). With a ``workspace`` the
    scratch buffers are reused across calls; with ``overwrite`` float32 inputs are used as
    scratch (their values are destroyed). Four float32 (N, V) buffers are held at once: the
    two upcast logits (their probabilities are written over them), r = log p - log q and q - p.
    """
    if logits.shape != logits_baseline.shape or logits.ndim != 2:
        raise ValueError(
            f"divergence_statistics: logits must both be (N, V) of one shape "
            f"(got {tuple(logits.shape)} and {tuple(logits_baseline.shape)})."
        )
    if overlap_k < 1 or kl_top_k < 1:
        raise ValueError(f"divergence_statistics: overlap_k and kl_top_k must be >= 1 (got {overlap_k}, {kl_top_k}).")
    targets = targets.long()
    z = _float32(logits, "pair_z", workspace, overwrite)  # (N, V) model
    # The same tensor passed twice must not be overwritten twice: the baseline gets a copy.
    aliased = overwrite and logits_baseline.data_ptr() == logits.data_ptr()
    w = _float32(logits_baseline, "pair_w", workspace, overwrite and not aliased)  # (N, V) baseline
    if z.shape[0] == 0:
        empty = z.new_empty(0)
        none = torch.zeros(0, dtype=torch.bool, device=z.device)
        return PairStats(empty, empty, empty, none, empty, empty, empty, empty, empty)
    vocab = z.shape[1]
    k, big_k = min(overlap_k, vocab), min(kl_top_k, vocab)
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    w_y = w.gather(1, targets[:, None]).squeeze(1)
    # The top sets, from the logits before they are overwritten.
    top_q = top_ids(z, k)  # (N, k)
    top_p = top_ids(w, max(k, big_k))  # (N, max(k, K)): its first k are the base's top-k
    overlap = (top_p[:, :k, None] == top_q[:, None, :]).any(dim=2).sum(dim=1).float() / k
    kl_topk = _kl_top(z, w, top_p[:, :big_k])
    z_max, w_max = z.gather(1, top_q[:, :1]).squeeze(1), w.gather(1, top_p[:, :1]).squeeze(1)
    same_top1 = top_q[:, 0] == top_p[:, 0]
    r = _buffer(workspace, "pair_d", z)
    torch.sub(w, z, out=r)  # (N, V): log p - log q up to a per-row constant
    e_z = z.sub_(z_max[:, None]).exp_()  # (N, V) over z: q * s_z
    e_w = w.sub_(w_max[:, None]).exp_()  # (N, V) over w: p * s_w
    s_z, s_w = e_z.sum(dim=1), e_w.sum(dim=1)
    # the nlls exactly as the single-model scorer takes them (a model against itself: equal)
    nll, nll_baseline = z_max + torch.log(s_z) - z_y, w_max + torch.log(s_w) - w_y
    c = (w_max - z_max) + torch.log(s_w / s_z)  # lse(w) - lse(z)
    r.sub_(c[:, None])  # (N, V): r = log p - log q
    q, p = e_z.div_(s_z[:, None]), e_w.div_(s_w[:, None])  # (N, V) each, in place
    # a = q - p, as p * expm1(-r): accurate where the two are close (a subtraction would
    # leave float32's rounding of p and q); q - p itself where expm1 would overflow.
    a = torch.neg(r, out=_buffer(workspace, "pair_m", z)).clamp_(max=_EXPM1_LIMIT).expm1_().mul_(p)
    far = r < -_EXPM1_LIMIT
    if bool(far.any()):
        a[far] = q[far] - p[far]
    # c carries the rounding of the float32 sums s_w, s_z (~1e-7), which shifts r by that
    # much; sum (q - p) must be 0, so its value measures the shift: fold it back into r and
    # q - p (the KLs are second-order in it, the acceptance first-order).
    shift = a.sum(dim=1, keepdim=True)  # (N, 1)
    r.add_(shift)
    a.addcmul_(q, shift, value=-1.0)
    # KL(P || Q) = sum p r + sum (q - p), term by term: each term p r + q - p >= 0, so
    # nothing large cancels, and an error e in c moves the sum by e (sum q - sum p) only.
    kl = p.mul_(r).add_(a).sum(dim=1).double().clamp_min_(0.0)  # p is not needed again
    kl_reverse = q.mul_(r).add_(a).sum(dim=1).double().neg_().clamp_min_(0.0)  # the same, term by term
    # 1 - TV, the absolute values in place (a is not needed again; a float32 vector_norm is
    # not a cascaded sum: 2e-6 off at V = 32k)
    acceptance = (1.0 - 0.5 * a.abs_().sum(dim=1).double()).clamp_min_(0.0)
    delta_p = torch.exp(-nll) - torch.exp(-nll_baseline)
    return PairStats(
        kl.float(),
        kl_reverse.float(),
        delta_p,
        same_top1,
        nll,
        nll_baseline,
        acceptance.float(),
        overlap,
        kl_topk,
    )


def _buffer(workspace: Workspace | None, name: str, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty_like(like)
    return workspace.get(name, tuple(like.shape), torch.float32, like.device)


def _kl_top(z: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(P_S || Q_S) over the (N, K) ids S, each distribution renormalised over S; float64
    over the K gathered logits (small), returned as float32."""
    zs, ws = z.gather(1, ids).double(), w.gather(1, ids).double()  # (N, K)
    log_q, log_p = zs - torch.logsumexp(zs, dim=1, keepdim=True), ws - torch.logsumexp(ws, dim=1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min_(0.0).float()


# --------------------------------------------------------------------------------------
# A baseline kept as its top-K (compare.baseline_cache: topk)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKCache:
    """What is kept of the baseline's distribution per token: its K likeliest ids (ordered as
    `top_ids`), their log-probabilities and the log of the mass of every other token (the
    tail). (N, K) int64, (N, K) float32, (N,) float32."""

    ids: torch.Tensor
    log_p: torch.Tensor
    log_tail: torch.Tensor


def topk_cache(logits: torch.Tensor, k: int) -> TopKCache:
    """The `TopKCache` of a chunk of the baseline's (N, V) logits; the tail's mass is summed
    over the tail itself (not 1 - the top-K's), so a tiny tail keeps its relative precision."""
    w = logits.double()
    k = min(k, w.shape[1])
    ids = top_ids(w, k)
    lse = torch.logsumexp(w, dim=1, keepdim=True)  # (N, 1)
    log_p = w.gather(1, ids) - lse
    tail = w.scatter(1, ids, float("-inf"))  # (N, V): the tail's logits, the top-K masked out
    log_tail = (torch.logsumexp(tail, dim=1, keepdim=True) - lse).squeeze(1)  # -inf when K = V
    return TopKCache(ids, log_p.float(), log_tail.float())


def cached_divergence_statistics(
    logits: torch.Tensor,
    cache: TopKCache,
    nll_baseline: torch.Tensor,
    targets: torch.Tensor,
    overlap_k: int = OVERLAP_K,
    kl_top_k: int = KL_TOP_K,
) -> PairStats:
    """`divergence_statistics` against a baseline kept as its `TopKCache` (and its nll of the
    true token), for a baseline that does not fit beside the model.

    With S the baseline's K ids and the tail T = V \\ S, P and Q are coarsened to the K + 1
    cells {v} for v in S, and T:

    - ``kl`` = sum_S p log(p/q) + p_T log(p_T / q_T) <= KL(P || Q), and ``kl_reverse`` the
      same with the roles swapped <= KL(Q || P): the KL of the coarsened distributions is a
      LOWER bound (the log-sum inequality on the tail; the data-processing inequality),
      exact when q / p is constant on T (and for K = V).
    - ``acceptance`` = sum_S min(p, q) + min(p_T, q_T) >= sum_v min(p_v, q_v): an UPPER bound
      (sum_T min(p_v, q_v) <= min(p_T, q_T)), exact when one model dominates the other on T.
    - ``topk_overlap``, ``kl_topk``, ``same_top1``, ``delta_p`` and both nlls are exact when
      ``overlap_k`` and ``kl_top_k`` are at most K.
    """
    k_cached = cache.ids.shape[1]
    if overlap_k > k_cached or kl_top_k > k_cached:
        raise ValueError(
            f"cached_divergence_statistics: overlap_k and kl_top_k must be <= the cache's K = {k_cached} "
            f"(got {overlap_k}, {kl_top_k})."
        )
    # float64: with no baseline chunk beside it, the model's chunk can afford the width
    z = logits.double()
    targets = targets.long()
    if z.shape[0] == 0:
        empty = z.new_empty(0, dtype=torch.float32)
        none = torch.zeros(0, dtype=torch.bool, device=z.device)
        return PairStats(empty, empty, empty, none, empty, empty, empty, empty, empty)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    ids = cache.ids.to(z.device)
    log_q = z.gather(1, ids) - lse  # (N, K)
    log_q_tail = torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=1) - lse[:, 0]  # (N,)
    log_p, log_p_tail = cache.log_p.to(z.device).double(), cache.log_tail.to(z.device).double()
    p, q, p_tail, q_tail = log_p.exp(), log_q.exp(), log_p_tail.exp(), log_q_tail.exp()
    kl = (p * (log_p - log_q)).sum(1) + torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), 0.0)
    kl_reverse = (q * (log_q - log_p)).sum(1) + torch.where(q_tail > 0, q_tail * (log_q_tail - log_p_tail), 0.0)
    acceptance = torch.minimum(p, q).sum(1) + torch.minimum(p_tail, q_tail)
    k = min(overlap_k, z.shape[1])
    top_q = top_ids(z, k)
    overlap = (ids[:, :k, None] == top_q[:, None, :]).any(dim=2).sum(dim=1).float() / k
    big_k = min(kl_top_k, z.shape[1])
    lp_s = log_p[:, :big_k] - torch.logsumexp(log_p[:, :big_k], dim=1, keepdim=True)
    lq_s = log_q[:, :big_k] - torch.logsumexp(log_q[:, :big_k], dim=1, keepdim=True)
    kl_topk = (lp_s.exp() * (lp_s - lq_s)).sum(1).clamp_min(0.0)
    nll = (lse[:, 0] - z.gather(1, targets[:, None]).squeeze(1)).float()
    nll_baseline = nll_baseline.to(z.device).float()
    return PairStats(
        kl.clamp_min(0.0).float(),
        kl_reverse.clamp_min(0.0).float(),
        torch.exp(-nll) - torch.exp(-nll_baseline),
        top_q[:, 0] == ids[:, 0],
        nll,
        nll_baseline,
        acceptance.clamp_max(1.0).float(),
        overlap,
        kl_topk.float(),
    )
