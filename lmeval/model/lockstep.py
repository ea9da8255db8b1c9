"""Score N variants of one base in lockstep: the base's body runs once per batch and its head
once per chunk, for all of them (``compare.lockstep``).

`scorer.score_windows` with a baseline runs the baseline beside ONE model, so N quantized
variants of a base cost N baseline forwards over the corpus (plus its own pass). Here the
batch is padded once under the strictest batching of all N + 1 models; the baseline's body
and every variant's body run on it; for each chunk of scored positions the baseline's head
is applied once, its own `TokenStats` are taken, and each variant's chunk meets that same
baseline chunk in `divergence_statistics`. Memory: every model's weights at once, plus one
chunk of logits per model being reduced (the baseline's is kept until the last variant has
read it), so chunks are a little smaller than a pair's.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..core.divergence import divergence_statistics
from ..core.losses import token_statistics
from ..core.windows import Window
from .head import evaluating
from .loading import LoadedModel
from .probes import BATCHINGS, Probes
from .scorer import (
    _CHUNK_COPIES,
    _PAIR_EXTRA,
    ScoreOptions,
    _check_finite,
    _chunk_rows,
    _empty_stats,
    _gather,
    _logit_source,
    _pad,
    _scored_index,
    _window_columns,
    check_pair,
    pack_batches,
)
from .scorer import _base_workspace as _own_workspace


def lockstep_batching(baseline: LoadedModel, variants: list[LoadedModel]) -> str:
    """The strictest load-time batching of all the models (`BATCHINGS` runs from least to most strict)."""
    return max((m.probes.batching for m in [baseline, *variants]), key=BATCHINGS.index)


@torch.inference_mode()
def score_batch_lockstep(
    baseline: LoadedModel, variants: list[LoadedModel], windows: list[Window], options: ScoreOptions
) -> list[dict[str, np.ndarray]]:
    """[baseline's `TokenStats` columns, then each variant's own columns with the pair's]."""
    probes = Probes(batching=lockstep_batching(baseline, variants))
    ids, mask = _pad(windows, baseline.device)
    rows, cols, targets = _scored_index(windows)
    use_mask = mask if probes.mask else None
    base_source = _logit_source(baseline, ids, use_mask, rows, cols, baseline.workspace, sums=True)
    workspaces = [_own_workspace(baseline, v) for v in variants]  # never the baseline's own buffers
    sources = [
        _logit_source(v, ids, use_mask, rows, cols, ws, sums=True) for v, ws in zip(variants, workspaces)
    ]  # every body once per batch
    # The baseline's chunk outlives each variant's reductions: two copies more than a pair.
    step = max(1, _chunk_rows(baseline, options.chunk_bytes) * _CHUNK_COPIES // (_CHUNK_COPIES + 2))
    base_parts: list = []
    parts: list[list] = [[] for _ in variants]
    pairs: list[list] = [[] for _ in variants]
    for begin in range(0, len(targets), step):
        sl = slice(begin, begin + step)
        w, w_sums = base_source(sl)  # (n, V): the baseline's head, once per chunk for every variant
        y = targets[sl].to(w.device)
        base_parts.append(token_statistics(w, y, options.temperatures, options.top_k, False, baseline.workspace,
                                           options.moments, logit_sums=w_sums))  # fmt: skip
        for i, (source, ws) in enumerate(zip(sources, workspaces)):
            z, z_sums = source(sl)
            y_z = y.to(z.device)
            parts[i].append(token_statistics(z, y_z, options.temperatures, options.top_k, False, ws,
                                             options.moments, logit_sums=z_sums))  # fmt: skip
            last = i == len(variants) - 1  # the last variant may overwrite the baseline's chunk
            pairs[i].append(
                divergence_statistics(
                    z, w.to(z.device), y_z, ws, overwrite=last, overlap_k=options.overlap_k, kl_top_k=options.kl_top_k
                )
            )
    keys = base_parts[0].__dataclass_fields__
    out = [_gather(base_parts, keys)]
    for own, pair in zip(parts, pairs):
        out.append({**_gather(own, keys), **_gather(pair, _PAIR_EXTRA)})
    return out


def score_windows_lockstep(
    baseline: LoadedModel,
    variants: list[LoadedModel],
    windows: list[Window],
    options: ScoreOptions,
    progress=None,
    doc_names=None,
) -> list[dict[str, np.ndarray]]:
    """Score every window with the baseline and every variant at once; per-token columns in
    window order: [the baseline's own, then each variant's own with its divergence from the
    baseline] (each as `score_windows` gives it, alone or with ``baseline=``). Out of memory
    is not split here: the caller falls back to pairs (``compare.lockstep: pair``)."""
    for variant in variants:
        check_pair(variant, baseline)
    modes = [evaluating(m.model) for m in [baseline, *variants]]
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        return _score_all_lockstep(baseline, variants, windows, options, progress, doc_names)


def _score_all_lockstep(baseline, variants, windows, options, progress, doc_names) -> list[dict[str, np.ndarray]]:
    counts = np.array([w.n_scored for w in windows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    outs: list[dict[str, np.ndarray]] = [{} for _ in range(len(variants) + 1)]
    batching = Probes(batching=lockstep_batching(baseline, variants))
    if batching.batching == "one_window":
        batches = [[i] for i in range(len(windows))]
    else:
        batches = pack_batches(windows, options.batch_tokens, equal_length=batching.equal_length)
    for batch in batches:
        batch_windows = [windows[i] for i in batch]
        stats = score_batch_lockstep(baseline, variants, batch_windows, options)
        for model, columns in zip([baseline, *variants], stats):
            _check_finite(model, batch_windows, columns, doc_names)
        for columns in stats[1:]:  # both heads put -inf on the same tokens: a NaN KL
            _check_finite(baseline, batch_windows, {"nll": columns["kl"], "entropy": columns["kl_reverse"]}, doc_names)
        b = np.asarray(batch)
        where = np.repeat(starts[b] - (np.cumsum(counts[b]) - counts[b]), counts[b]) + np.arange(counts[b].sum())
        for out, columns in zip(outs, stats):
            for key, values in columns.items():
                if key not in out:
                    out[key] = np.empty((total,) + values.shape[1:], dtype=values.dtype)
                out[key][where] = values
        if progress is not None:
            progress(len(where), total)
    if total == 0:
        outs = [_empty_stats(baseline, options)] + [_empty_stats(v, options, baseline) for v in variants]
    window_columns = _window_columns(windows, counts, total)
    for out in outs:
        out.update(window_columns)
    return outs
