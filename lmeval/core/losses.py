"""Cross-entropy and the per-token statistics built on it. Pure math: no model here.

Cross-entropy H(P, Q) = -sum_x P(x) log Q(x) is the average cost, in nats, of coding
outcomes drawn from the true distribution P with a code built for the model's Q. It splits
as H(P, Q) = H(P) + KL(P || Q): the entropy of the truth, which no model can remove, plus the
divergence, which a better model can. For a language model P is one-hot on the next token,
so H(P) = 0 and the cross-entropy is the token's negative log-likelihood ``nll = -log q_y``.

All logs are natural (nats). `nats_to_bits` converts; perplexity is exp of a pooled mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels
from .units import LN2, bits_per, nats_to_bits, perplexity  # noqa: F401  (the article's units, re-exported)

# --------------------------------------------------------------------------------------
# The article's functions, on probability vectors (numpy, last axis = outcomes)
# --------------------------------------------------------------------------------------


def _log_probabilities(x, name: str) -> np.ndarray:
    """log of a probability vector, normalised to sum to 1 along the last axis.

    Normalising (as `scipy.stats.entropy` does) lets rounded inputs such as
    [0.333, 0.333, 0.333] mean the uniform distribution they stand for.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise ValueError(f"{name}: must be a non-empty probability vector (got shape {arr.shape}).")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}: entries must be finite and >= 0 (got {arr.tolist()}).")
    total = arr.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError(f"{name}: entries must not all be 0. Pass a probability vector.")
    with np.errstate(divide="ignore"):
        return np.log(arr) - np.log(total)


def _p_times_log(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """sum_x P(x) log Q(x), with the convention 0 * log 0 = 0 (terms where P(x) = 0 vanish)."""
    p = np.exp(p_log)
    safe_q = np.where(p > 0, q_log, 0.0)
    return np.sum(p * safe_q, axis=-1)


def cross_entropy(p, q) -> np.ndarray | float:
    """H(P, Q) = -sum_x P(x) log Q(x), in nats.

    The cost of coding P with Q's code. Infinite when Q gives zero probability to an
    outcome P can produce: that is the true value, so it is not clipped away.
    """
    return _as_float(-_p_times_log(_log_probabilities(p, "p"), _log_probabilities(q, "q")))


def entropy(p) -> np.ndarray | float:
    """H(P) = -sum_x P(x) log P(x), in nats: the floor no model of P can beat."""
    p_log = _log_probabilities(p, "p")
    return _as_float(-_p_times_log(p_log, p_log))


def kl_divergence(p, q) -> np.ndarray | float:
    """KL(P || Q) = sum_x P(x) (log P(x) - log Q(x)) >= 0, in nats.

    The part of H(P, Q) that is the model's fault: H(P, Q) = H(P) + KL(P || Q).
    """
    p_log = _log_probabilities(p, "p")
    q_log = _log_probabilities(q, "q")
    return _as_float(_p_times_log(p_log, p_log) - _p_times_log(p_log, q_log))


def binary_cross_entropy(y, y_hat) -> np.ndarray | float:
    """BCE = -(y log y_hat + (1 - y) log(1 - y_hat)), in nats.

    The two-outcome cross-entropy of a label (or soft label) ``y`` in [0, 1] against a
    predicted probability ``y_hat``. ``log1p`` keeps ``log(1 - y_hat)`` exact near 0.
    """
    y = np.asarray(y, dtype=np.float64)
    y_hat = np.asarray(y_hat, dtype=np.float64)
    for name, arr in (("y", y), ("y_hat", y_hat)):
        if not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
            raise ValueError(f"binary_cross_entropy: {name} must be in [0, 1] (got {arr.tolist()}).")
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = np.where(y > 0, y * np.log(y_hat), 0.0)
        neg = np.where(y < 1, (1 - y) * np.log1p(-y_hat), 0.0)
    return _as_float(-(pos + neg))


def _as_float(x: np.ndarray) -> np.ndarray | float:
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------------------
# Per-token statistics from one chunk of logits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStats:
    """Everything lmeval needs per scored token, from one pass over the logits. All (N,)
    float32 unless noted; every log is natural.

    - ``nll``: -log q_y, nats.
    - ``entropy``: H(q) = -sum_v q_v log q_v, nats: the model's own uncertainty.
    - ``max_prob``: max_v q_v, the top-1 confidence.
    - ``is_top1``: bool, the target is the argmax (ties count as top-1).
    - ``rank``: int64, 1 + the number of tokens strictly more likely than the target.
    - ``sum_q2``: sum_v q_v^2, for the Brier score 1 - 2 q_y + sum q^2.
    - ``mean_neg_logq``: mean_v(-log q_v), for label-smoothed CE.
    - ``nll_t`` / ``max_prob_t``: (N, K) the same at each temperature T (logits / T).
    - ``topk_ids`` / ``topk_probs``: (N, k) the k most likely tokens, most likely first.
    - ``var_logq``: Var_q[log q] = sum_v q_v (log q_v + H(q))^2, nats^2, only on request
      (``moments=True``; else shape (N, 0)). With E_q[log q] = -entropy it standardises a
      token's log-probability, as Min-K%++ does.
    """

    nll: torch.Tensor
    entropy: torch.Tensor
    max_prob: torch.Tensor
    is_top1: torch.Tensor
    rank: torch.Tensor
    sum_q2: torch.Tensor
    mean_neg_logq: torch.Tensor
    nll_t: torch.Tensor
    max_prob_t: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    var_logq: torch.Tensor


class Workspace:
    """Reusable scratch buffers, and a count of how each chunk's reductions ran.

    On CPU a fresh (N, V) tensor is paid for in page faults that cost more than the
    arithmetic done on it, so the eager path reuses these. ``calls`` counts the chunks
    reduced ``"compiled"``, by the CPU ``"kernel"`` and ``"eager"``, so callers can record
    which one ran.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {"compiled": 0, "kernel": 0, "eager": 0}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(shape)

    def mode_since(self, before: dict[str, int]) -> str:
        """How the reductions ran since the snapshot ``before`` (a copy of ``calls``):
        ``"compiled"`` (torch.compile), ``"kernel"`` (the CPU kernel, `core.kernels`),
        ``"eager"`` (ATen), ``"mixed"``, or ``"none"`` when nothing was reduced."""
        ran = [k for k in ("compiled", "kernel", "eager") if self.calls[k] > before.get(k, 0)]
        return ran[0] if len(ran) == 1 else ("mixed" if ran else "none")


def _scratch(workspace: Workspace | None, name: str, like: torch.Tensor, dtype=None) -> torch.Tensor:
    if workspace is None:
        return torch.empty_like(like, dtype=dtype or like.dtype)
    return workspace.get(name, tuple(like.shape), dtype or like.dtype, like.device)


def _reductions(
    z: torch.Tensor, targets: torch.Tensor, temperatures: tuple[float, ...], workspace=None, moments=False, z_sum=None
):
    """The per-token reductions over the vocabulary. ``z`` is (N, V) float32; every output is
    (N,) or (N, K). Written with two explicit scratch buffers so that eager mode allocates no
    (N, V) tensor per call, and `torch.compile` can still fuse it into one loop per row.

    With ``e = exp(z - max z)`` and ``s = sum e``: ``lse = max z + log s``, ``q = e / s``,
    ``H(q) = lse - sum(e z) / s`` and ``sum q^2 = sum(e^2) / s^2``; no (N, V) log q is kept.
    The passes that read only ``z`` (max, rank, sum) come first, then the ones over ``e``.
    ``z_sum``, the row sums of ``z`` when the caller has them (a linear head gives them
    without the logits), spares one pass.
    """
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    z_max = z.amax(dim=1)
    z_mean = z.sum(dim=1) / z.shape[1] if z_sum is None else (z_sum / z.shape[1]).to(z.dtype)
    work = _scratch(workspace, "work", z)  # (N, V), reused by every pass below that writes
    # 0/1 as float32: its sum is vectorised (a bool sum is not) and exact below 2^24 ids.
    rank = torch.gt(z, z_y[:, None], out=work).sum(dim=1).to(torch.int32) + 1
    d = torch.sub(z, z_max[:, None], out=_scratch(workspace, "e", z))  # (N, V): z - max z, then e^d in place
    # log-sum-exp of z / T, shifted by max z for stability: exp((z - max z) / T) from one d
    sum_t = {t: torch.mul(d, 1.0 / t, out=work).exp_().sum(dim=1) for t in temperatures if t != 1.0}
    e = d.exp_()
    s = e.sum(dim=1)
    lse = z_max + torch.log(s)
    e_dot_e = torch.linalg.vector_norm(e, dim=1).square()  # a fused reduction, no product
    e_dot_z = torch.mul(e, z, out=work).sum(dim=1)
    nll_t, max_prob_t = [], []
    for t in temperatures:  # the plain distribution (T = 1): its log-sum-exp is already known
        lse_t = lse if t == 1.0 else z_max / t + torch.log(sum_t[t])
        nll_t.append(lse_t - z_y / t)
        max_prob_t.append(torch.exp(z_max / t - lse_t))
    empty = z.new_empty((z.shape[0], 0))
    if moments:  # Var_q[z] = Var_q[log q] (log q = z - lse), centred first: no cancellation
        centred = torch.sub(z, (e_dot_z / s)[:, None], out=work)  # (N, V)
        var_logq = (centred.mul_(centred).mul_(e).sum(dim=1) / s)[:, None]
    else:
        var_logq = empty
    return (
        lse - z_y,
        lse - e_dot_z / s,
        1.0 / s,
        rank,
        e_dot_e / (s * s),
        lse - z_mean,
        torch.stack(nll_t, dim=1) if temperatures else empty,
        torch.stack(max_prob_t, dim=1) if temperatures else empty,
        lse,
        var_logq,
    )


def _kernel_reductions(z: torch.Tensor, targets: torch.Tensor, temperatures: tuple[float, ...], moments, z_sum=None):
    """`_reductions` by the CPU kernel (`core.kernels`): the same outputs, from two reads of
    each row. The kernel's sums are float64; the statistics are formed from them in float64
    and rounded to float32 once. With ``s = sum e^d``, ``d = z - max z``: ``lse = max z + log s``,
    ``H(q) = log s - sum(e^d d) / s``, ``sum q^2 = sum(e^2d) / s^2``, and at temperature T
    ``lse_T = max z / T + log sum e^(d / T)``."""
    z = z.contiguous()
    z_y = z.gather(1, targets[:, None]).squeeze(1)  # (N,): raises on an id outside the vocabulary
    others = tuple(t for t in temperatures if t != 1.0)
    inv_t = torch.tensor([1.0 / t for t in others], dtype=torch.float32)
    sums = kernels.reduce_rows(z, z_y, inv_t, moments)  # (N, 7 + K) float64
    z_max, above, sum_z, s, s2, sd, var = sums[:, : len(kernels.COLUMNS)].unbind(1)
    y = z_y.double()
    log_s = torch.log(s)
    lse = z_max + log_s
    z_mean = (sum_z if z_sum is None else z_sum.to(torch.float64)) / z.shape[1]
    nll_t, max_prob_t = [], []
    for t in temperatures:
        s_t = s if t == 1.0 else sums[:, len(kernels.COLUMNS) + others.index(t)]
        nll_t.append(z_max / t + torch.log(s_t) - y / t)
        max_prob_t.append(1.0 / s_t)
    empty = z.new_empty((z.shape[0], 0))
    f32 = torch.float32
    return (
        (lse - y).to(f32),
        (log_s - sd / s).to(f32),
        (1.0 / s).to(f32),
        above.to(torch.int32) + 1,
        (s2 / (s * s)).to(f32),
        (lse - z_mean).to(f32),
        torch.stack(nll_t, dim=1).to(f32) if temperatures else empty,
        torch.stack(max_prob_t, dim=1).to(f32) if temperatures else empty,
        lse.to(f32),
        (var / s).to(f32)[:, None] if moments else empty,
    )


_COMPILED: dict[str, Callable] = {}  # "fn": the compiled `_reductions`, once per process


def _compiled_reductions():
    """`_reductions` compiled once per process. The vocabulary is static and the chunk
    length dynamic (marked per call), so a new chunk length never recompiles. Inductor's
    on-disk caches (on by default) make a warm process skip code generation."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_reductions, dynamic=False)
    return _COMPILED["fn"]


def _run_compiled(z, targets, temperatures, moments):
    # Dynamo specialises sizes 0 and 1; such a chunk (the tail of a batch) runs eagerly.
    if z.shape[0] < 2:
        return _reductions(z, targets, temperatures, None, moments)
    torch._dynamo.mark_dynamic(z, 0)
    torch._dynamo.mark_dynamic(targets, 0)
    return _compiled_reductions()(z, targets, temperatures, None, moments)


def token_statistics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperatures: tuple[float, ...] = (),
    top_k: int = 0,
    compiled: bool = False,
    workspace: Workspace | None = None,
    moments: bool = False,
    logit_sums: torch.Tensor | None = None,
) -> TokenStats:
    """Per-token statistics for ``logits`` (N, V) and ``targets`` (N,), in one pass.

    The logits are upcast to float32 here, one chunk at a time, and log-probabilities are
    ``z - logsumexp(z)``; never ``softmax().log()``, which underflows to -inf.
    ``logit_sums`` (N,), if given, are the rows' sums of the logits (`OutputHead.logit_sums`),
    used by the eager reductions for ``mean_neg_logq`` instead of a pass over the chunk.
    """
    if logits.dtype == torch.float32 or compiled or workspace is None:
        z = logits.float()  # (N, V)
    else:  # upcast half-precision logits into a reused float32 buffer
        z = _scratch(workspace, "z32", logits, torch.float32).copy_(logits)
    targets = targets.long()
    kernel = not compiled and z.device.type == "cpu" and kernels.library() is not None
    if workspace is not None:
        workspace.calls["compiled" if compiled else "kernel" if kernel else "eager"] += 1
    if compiled:
        reduced = _run_compiled(z, targets, tuple(temperatures), moments)
    elif kernel:
        reduced = _kernel_reductions(z, targets, tuple(temperatures), moments, logit_sums)
    else:
        reduced = _reductions(z, targets, tuple(temperatures), workspace, moments, logit_sums)
    nll, ent, max_prob, rank, sum_q2, mean_neg_logq, nll_t, max_prob_t, lse, var_logq = reduced
    if top_k > 0:
        top = torch.topk(z, min(top_k, z.shape[1]), dim=1)
        topk_ids, topk_probs = top.indices, torch.exp(top.values - lse[:, None])
    else:
        topk_ids = targets.new_empty((z.shape[0], 0))
        topk_probs = z.new_empty((z.shape[0], 0))
    return TokenStats(
        nll=nll,
        entropy=ent,
        max_prob=max_prob,
        is_top1=rank == 1,
        rank=rank.long(),
        sum_q2=sum_q2,
        mean_neg_logq=mean_neg_logq,
        nll_t=nll_t,
        max_prob_t=max_prob_t,
        topk_ids=topk_ids,
        topk_probs=topk_probs,
        var_logq=var_logq.squeeze(1) if moments else var_logq,
    )
