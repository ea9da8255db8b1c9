"""Score windows with a model and its baseline at once: per-token divergence, one lean pass.

Both models see the same padded batch of windows. Their bodies run once per batch, and
their output heads are applied to the SAME chunk of scored positions, one chunk at a time,
so the two (n, V) chunks of logits meet in `divergence_statistics` and are dropped; neither
a full (B, T, V) tensor (on the fast head path) nor any distribution is ever kept. Batches,
padding, chunk sizes, the out-of-memory retry and the non-finite check are the single-model
scorer's (`scorer`), so the two passes window and batch identically.

Devices: each model may live on its own device (``device: cuda:1``) or be spread over
several with ``device_map``. The ids go to each model's input device; the baseline's chunk
of logits is copied to the model's output-head device, where the reductions run and whose
type sizes the chunk. The copy is one chunk (bounded by the chunk budget), never a batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.divergence import PAIR_FIELDS, divergence_statistics
from ..core.losses import Workspace
from ..core.windows import Window
from ..errors import ModelError
from .head import evaluating
from .loading import LoadedModel
from .scorer import _check_finite, _chunk_rows, _pad, _scored_index, _split_after_oom, _window_columns, pack_batches


def check_pair(lm: LoadedModel, baseline: LoadedModel) -> None:
    """Both heads must score the same vocabulary: KL is a sum over one set of tokens."""
    if lm.vocab_size != baseline.vocab_size:
        raise ModelError(
            f"model {lm.name}: its logits must be as wide as the baseline {baseline.name}'s for divergence "
            f"(got {lm.vocab_size} vs {baseline.vocab_size} columns). The checkpoints pad their vocabularies "
            "differently; compare them in bits_per_byte (`compare:` without `divergence`) instead."
        )


def _logit_source(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, rows, cols, workspace: Workspace):
    """A function slice -> (n, V) logits of the scored positions ``rows[slice], cols[slice]``.

    Every call returns a tensor the caller may overwrite: the head's reused buffer, or a
    fresh gather from the plain path's (B, T, V) logits."""
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    if lm.head.fast:
        hidden = lm.head.body(ids, mask)  # (B, T, H), on the last layer's device under a device_map
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)
        return lambda sl: lm.head.project(hidden[rows[sl], cols[sl]], workspace)  # (n, V)
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    rows, cols = rows.to(logits.device), cols.to(logits.device)
    return lambda sl: logits[rows[sl], cols[sl]]


@torch.inference_mode()
def score_pair_batch(
    lm: LoadedModel, baseline: LoadedModel, windows: list[Window], chunk_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """`PAIR_FIELDS` for the scored outputs of ``windows``, in window order."""
    ids, mask = _pad(windows, lm.device)
    rows, cols, targets = _scored_index(windows)
    # One model given twice shares one workspace; its two heads' outputs must not share a buffer.
    base_workspace = baseline.workspace if baseline.workspace is not lm.workspace else Workspace()
    model_logits = _logit_source(lm, ids, mask, rows, cols, lm.workspace)
    base_logits = _logit_source(baseline, ids, mask, rows, cols, base_workspace)
    # The same rows per chunk as scoring one model: the pair holds fewer (N, V) float32 buffers
    # (both heads' outputs and d = w - z, see core.divergence) than the single-model reductions.
    step = _chunk_rows(lm, chunk_bytes)
    parts = []
    for begin in range(0, len(targets), step):
        sl = slice(begin, begin + step)
        z = model_logits(sl)  # (n, V), on the model's head device
        w = base_logits(sl).to(z.device)  # (n, V), copied there when the baseline lives elsewhere
        parts.append(divergence_statistics(z, w, targets[sl].to(z.device), lm.workspace, overwrite=True))
    return {key: torch.cat([getattr(p, key) for p in parts]).cpu().numpy() for key in PAIR_FIELDS}


def score_pair_windows(
    lm: LoadedModel, baseline: LoadedModel, windows: list[Window], batch_tokens: int,
    progress=None, doc_names=None, chunk_bytes: int | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Score every window with both models; per-token columns in window order.

    Columns: ``doc_index, position, token_id, context_len`` and `PAIR_FIELDS` (zero rows when
    nothing is scored). ``progress(tokens_in_batch, tokens_in_total)`` is called after each
    batch; ``doc_names[w.doc_id]`` names a window's document in errors. Both models are
    scored in eval mode and left in the modes they had.
    """
    check_pair(lm, baseline)
    counts = np.array([w.n_scored for w in windows], dtype=np.int64)
    with evaluating(lm.model), evaluating(baseline.model):
        out = _score_all(lm, baseline, windows, counts, batch_tokens, progress, doc_names, chunk_bytes)
    out.update(_window_columns(windows, counts, int(counts.sum())))
    return out


def _score_all(lm, baseline, windows, counts, batch_tokens, progress, doc_names, chunk_bytes) -> dict[str, np.ndarray]:
    """The single scorer's loop: batches by token budget, halved and retried on OOM, each
    batch's rows put back in window order."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    out = {key: np.empty(total, dtype=bool if key == "same_top1" else np.float32) for key in PAIR_FIELDS}
    pending = [(batch, batch_tokens) for batch in pack_batches(windows, batch_tokens)]
    while pending:
        batch, budget = pending.pop(0)
        batch_windows = [windows[i] for i in batch]
        try:
            stats = score_pair_batch(lm, baseline, batch_windows, chunk_bytes)
        except torch.OutOfMemoryError:
            if baseline.device.type == "cuda":
                torch.cuda.empty_cache()
            pending[:0] = _split_after_oom(lm, windows, batch, budget, doc_names)
            continue
        _check_pair_finite(lm, baseline, batch_windows, stats, doc_names)
        offset = 0
        for i, w in zip(batch, batch_windows):
            for key, values in stats.items():
                out[key][starts[i] : starts[i + 1]] = values[offset : offset + w.n_scored]
            offset += w.n_scored
        if progress is not None:
            progress(offset, total)
    return out


def _check_pair_finite(lm, baseline, windows, stats, doc_names) -> None:
    """A NaN or inf logit in either model stops the run naming that model and the document."""
    _check_finite(lm, windows, {"nll": stats["nll"], "entropy": stats["nll"]}, doc_names)
    _check_finite(baseline, windows, {"nll": stats["nll_baseline"], "entropy": stats["nll_baseline"]}, doc_names)
    # Finite nlls but a NaN KL: both heads put -inf on the same tokens (their difference is NaN).
    _check_finite(lm, windows, {"nll": stats["kl"], "entropy": stats["kl_reverse"]}, doc_names)
