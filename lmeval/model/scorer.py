"""Score windows with a loaded model, alone or beside a baseline. The ONLY code that runs a
model forward.

Windows are batched by a token budget (sorted by length to cut padding), right-padded with
an attention mask, run through the body, and only their scored positions reach the output
head, a chunk of rows at a time (`OutputHead`); per-token statistics come from one pass
over each chunk of logits (`token_statistics`). Out of memory halves the budget and retries
the same windows; a non-finite logit stops the run naming the model and the document.

With a baseline, both bodies run on the same padded batch under the stricter of the two
models' load-time batchings, and both heads are applied to the same chunk of scored
positions: the model's chunk gets the single-model statistics, then meets the baseline's in
`divergence_statistics`, and both are dropped. Each model may live on its own device; the
baseline's chunk is copied to the model's head device, where the reductions run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..core import kernels
from ..core.divergence import (
    KL_TOP_K,
    OVERLAP_K,
    PAIR_FIELDS,
    TopKCache,
    cached_divergence_statistics,
    divergence_statistics,
    topk_cache,
)
from ..core.losses import Workspace, token_statistics
from ..core.windows import Window
from ..core.words import log_mass
from ..errors import ModelError
from .head import evaluating
from .loading import LoadedModel
from .probes import BATCHINGS, Probes

log = logging.getLogger(__name__)

# float32 bytes of one logit row are multiplied by this to budget a chunk: logits, log q,
# q, and the temporaries of the reductions.
_CHUNK_COPIES = 6

# The divergence columns a pair adds; the model's ``nll`` is token_statistics' own.
_PAIR_EXTRA = tuple(key for key in PAIR_FIELDS if key != "nll")


@dataclass(frozen=True)
class ScoreOptions:
    """What to compute per token, and how much to hold at once."""

    batch_tokens: int = 16384
    temperatures: tuple[float, ...] = ()
    top_k: int = 0
    moments: bool = False  # also Var_q[log q] per token (membership scores)
    chunk_bytes: int | None = None  # budget for one chunk of logits and its scratch; None: by device
    compile: str | bool = "auto"  # fuse the per-token reductions with torch.compile
    # (K, V) bool id sets: also ``log_mass`` (N, K), log q(set) at each scored output (words)
    mass_masks: np.ndarray | None = None
    overlap_k: int = OVERLAP_K  # with a baseline: k of topk_overlap (compare.overlap_k)
    kl_top_k: int = KL_TOP_K  # with a baseline: K of kl_topk (compare.kl_top_k)
    cache_k: int = 0  # > 0: also the TopKCache columns of this model (it is the baseline of a later pass)
    # a baseline kept as its top-K: CACHE_COLUMNS and nll_baseline, one row per scored token in
    # window order; the pair's statistics then come from it (`cached_divergence_statistics`)
    baseline_cache: dict | None = None


CACHE_COLUMNS = ("cache_ids", "cache_log_p", "cache_log_tail")


# Below this many logits (tokens x vocabulary) a CPU run without the reductions kernel does
# not repay the compile time. Measured on 2 threads at V = 50k: compiling costs 6-7 s with
# Inductor's on-disk cache warm and 18 s cold, and saves ~2.7 ns per logit (eager 4.5,
# compiled 1.8), so a warm process pays back from ~2.4e9 logits (a cold one from ~7e9).
_COMPILE_MIN_LOGITS_CPU = 2.5e9


def use_compiled(lm: LoadedModel, options: ScoreOptions, n_tokens: int) -> bool:
    """Whether to fuse the reductions with torch.compile: always on request; under ``auto``
    on CUDA, and on CPU only where the C kernel (`core.kernels`) is unavailable and the job
    is large enough. On CPU the kernel costs no more than the compiled reductions without a
    temperature grid, less with one, and nothing to compile (`bench.py --case reductions`)."""
    if options.compile == "auto":
        if lm.device.type == "cuda":
            return True
        return kernels.library() is None and n_tokens * lm.vocab_size >= _COMPILE_MIN_LOGITS_CPU
    return bool(options.compile)


def decide_compile(lm: LoadedModel, options: ScoreOptions, n_tokens: int) -> ScoreOptions:
    """``options`` with ``compile: auto`` settled for a job of ``n_tokens``, so that a run
    of many parts decides once (each part alone is too small to reach the threshold)."""
    return dataclasses.replace(options, compile=use_compiled(lm, options, n_tokens))


def pack_batches(windows: list[Window], batch_tokens: int, equal_length: bool = False) -> list[list[int]]:
    """Indices of windows grouped so that rows x longest row <= batch_tokens.

    Windows are sorted by length (longest first) to cut padding; a window longer than the
    budget gets a batch of its own. With ``equal_length`` only windows of the same length
    share a batch, so nothing is padded (for models whose logits depend on padding).
    """
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].input_ids), i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(windows[current[0]].input_ids) if current else len(windows[i].input_ids)
        other_length = equal_length and len(windows[i].input_ids) != width
        if current and ((len(current) + 1) * width > batch_tokens or other_length):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def check_pair(lm: LoadedModel, baseline: LoadedModel) -> None:
    """Both heads must score the same vocabulary: KL is a sum over one set of tokens."""
    if lm.vocab_size != baseline.vocab_size:
        raise ModelError(
            f"model {lm.name}: its logits must be as wide as the baseline {baseline.name}'s for divergence "
            f"(got {lm.vocab_size} vs {baseline.vocab_size} columns). The checkpoints pad their vocabularies "
            "differently; compare them in bits_per_byte (`compare:` without `divergence`) instead."
        )


def pair_batching(lm: LoadedModel, baseline: LoadedModel | None) -> str:
    """The stricter of the two models' load-time batchings (`BATCHINGS` runs from the least
    to the most strict), so that the shared batch is exact for both; ``lm``'s own without a
    baseline. No mask is passed when either model's batching forbids one."""
    if baseline is None:
        return lm.probes.batching
    return max(lm.probes.batching, baseline.probes.batching, key=BATCHINGS.index)


def _probes(lm: LoadedModel, baseline: LoadedModel | None) -> Probes:
    """The probes that pack and mask the batches: one batching for every model in them."""
    return Probes(batching=pair_batching(lm, baseline))


def _pack(
    lm: LoadedModel, windows: list[Window], batch_tokens: int, baseline: LoadedModel | None = None
) -> list[list[int]]:
    """`pack_batches` under the batching the load-time padding probes chose."""
    probes = _probes(lm, baseline)
    if probes.batching == "one_window":
        return [[i] for i in range(len(windows))]
    return pack_batches(windows, batch_tokens, equal_length=probes.equal_length)


def _pad(windows: list[Window], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ids into (B, T) with an attention mask. The pad id is never scored and,
    under causal attention with right padding, never attended to by a real token."""
    lengths = np.fromiter((len(w.input_ids) for w in windows), dtype=np.int64, count=len(windows))
    mask = np.arange(lengths.max())[None, :] < lengths[:, None]  # (B, T): one scatter, no loop over rows
    ids = np.zeros(mask.shape, dtype=np.int64)
    ids[mask] = np.fromiter((t for w in windows for t in w.input_ids), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask.astype(np.int64)).to(device)


def _scored_index(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets) of every scored output in a padded batch, window by window."""
    counts = np.fromiter((w.n_scored for w in windows), dtype=np.int64, count=len(windows))
    first = np.fromiter((w.first_scored for w in windows), dtype=np.int64, count=len(windows))
    total = int(counts.sum())
    rows = np.repeat(np.arange(len(windows)), counts)
    cols = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(total)
    targets = np.fromiter((t for w in windows for t in w.targets), dtype=np.int64, count=total)
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(targets)


# The default budget of one chunk and its scratch: ~4 MiB of float32 logits on CPU, the low end
# of the range where the reductions cost the same per logit (4 to 64 MiB). Smaller chunks are
# smaller transients: on a 512-id vocabulary, 16 MiB chunks put a run's steady state 35-45 MB
# higher (6 parts against 1: 741-747 MB against 697-717 MB) at the same speed. On CUDA larger
# chunks keep the kernels busy.
_CHUNK_BYTES = {"cpu": 24 * 2**20, "cuda": 1536 * 2**20}
# ... but never fewer rows than this under the default budget: the head's matmul reads the
# whole (V, H) weight once per chunk, and on CPU it runs at less than half speed below ~128
# rows (V = 128k, H = 64, 2 threads: 4.4 ns per logit at 32 rows, 1.6 at 130;
# `python scripts/bench.py --case models`). A budget the caller passes is a hard limit.
_MIN_CHUNK_ROWS = 128


def _chunk_rows(lm: LoadedModel, chunk_bytes: int | None) -> int:
    if chunk_bytes:
        return max(1, chunk_bytes // (lm.vocab_size * 4 * _CHUNK_COPIES))
    budget = _CHUNK_BYTES.get(lm.device.type, _CHUNK_BYTES["cpu"])
    return max(_MIN_CHUNK_ROWS, budget // (lm.vocab_size * 4 * _CHUNK_COPIES))


def _logit_source(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor | None, rows, cols, workspace: Workspace, sums: bool
):
    """A function slice -> ((n, V) logits of the scored positions ``rows[slice], cols[slice]``,
    their row sums or None). The body runs here, once; each call applies the head to one chunk.

    The logits are the head's reused buffer (in ``workspace``) or a fresh gather from the
    plain path's (B, T, V) logits, so the caller may overwrite them once it has read them."""
    ids = ids.to(lm.device)
    mask = None if mask is None else mask.to(lm.device)
    if lm.head.fast:
        hidden = lm.head.body(ids, mask)  # (B, T, H), on the last layer's device under a device_map
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)

        def source(sl):  # the row sums come from a linear head without a pass over the logits
            states = hidden[rows[sl], cols[sl]]
            return lm.head.project(states, workspace), (lm.head.logit_sums(states) if sums else None)

        return source
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    rows, cols = rows.to(logits.device), cols.to(logits.device)
    return lambda sl: (logits[rows[sl], cols[sl]], None)


def _base_workspace(lm: LoadedModel, baseline: LoadedModel) -> Workspace:
    """The baseline head's scratch. One model given twice shares one workspace, and its two
    heads' outputs must not share a buffer, so the baseline then gets a fresh one."""
    return baseline.workspace if baseline.workspace is not lm.workspace else Workspace()


def _gather(parts: list, keys) -> dict[str, np.ndarray]:
    """One device-to-host copy per batch and key, not one per chunk."""
    return {key: torch.cat([getattr(p, key) for p in parts]).cpu().numpy() for key in keys}


@torch.inference_mode()
def score_batch(
    lm: LoadedModel,
    windows: list[Window],
    options: ScoreOptions,
    compiled: bool = False,
    baseline: LoadedModel | None = None,
) -> dict[str, np.ndarray]:
    """Per-token statistics for the scored outputs of ``windows``, in window order: the
    `TokenStats` fields (and ``log_mass`` under ``options.mass_masks``), and with a
    ``baseline`` also the `PAIR_FIELDS` other than ``nll`` (the model's nll is the
    `TokenStats` one)."""
    mask: torch.Tensor | None
    ids, mask = _pad(windows, lm.device)
    if not _probes(lm, baseline).mask:  # a model that fails when given a mask: unpadded rows, no mask
        mask = None
    rows, cols, targets = _scored_index(windows)
    targets = targets.to(lm.device)
    source = _logit_source(lm, ids, mask, rows, cols, lm.workspace, sums=not compiled)
    base_source = (
        None
        if baseline is None
        else _logit_source(baseline, ids, mask, rows, cols, _base_workspace(lm, baseline), sums=False)
    )
    masks = None if options.mass_masks is None else torch.from_numpy(options.mass_masks.T.astype(np.float32))
    # A pair holds six float32 (n, V) buffers on the model's head device (both heads' logits,
    # the reductions' two scratch, divergence's r and q - p): the single model's budget.
    step = _chunk_rows(lm, options.chunk_bytes)
    parts, masses, pairs = [], [], []
    caches: list[dict[str, torch.Tensor]] = []
    for begin in range(0, len(targets), step):
        sl = slice(begin, begin + step)
        chunk, sums = source(sl)  # (n, V), on the output head's device
        y = targets[sl].to(chunk.device)
        parts.append(
            token_statistics(
                chunk, y, options.temperatures, options.top_k, compiled, lm.workspace, options.moments, logit_sums=sums
            )
        )
        if masks is not None:  # the same chunk of logits, one more reduction
            scratch = (
                lm.workspace.get("mass_e", tuple(chunk.shape), torch.float32, chunk.device)
                if chunk.dtype != torch.float64
                else None
            )
            masses.append(log_mass(chunk, masks.to(chunk.device), scratch).float())
        if options.cache_k:  # the baseline of a later pass keeps its top-K (and tail) per token
            kept = topk_cache(chunk, options.cache_k)
            caches.append(dict(zip(CACHE_COLUMNS, (kept.ids, kept.log_p, kept.log_tail))))
        if options.baseline_cache is not None:  # the baseline, as its top-K: no second model here
            kept_rows = {k: torch.from_numpy(v[sl]) for k, v in options.baseline_cache.items()}
            cache = TopKCache(kept_rows["cache_ids"], kept_rows["cache_log_p"], kept_rows["cache_log_tail"])
            nll_base = kept_rows["nll_baseline"]
            pairs.append(cached_divergence_statistics(chunk, cache, nll_base, y, options.overlap_k, options.kl_top_k))
        if base_source is not None:  # last: it overwrites both chunks, which nothing reads again
            w = base_source(sl)[0].to(chunk.device)  # (n, V), copied there when the baseline lives elsewhere
            pairs.append(
                divergence_statistics(
                    chunk, w, y, lm.workspace, overwrite=True, overlap_k=options.overlap_k, kl_top_k=options.kl_top_k
                )
            )
    out = _gather(parts, parts[0].__dataclass_fields__)
    if masses:
        out["log_mass"] = torch.cat(masses).cpu().numpy()
    if pairs:
        out.update(_gather(pairs, _PAIR_EXTRA))
    if base_source is not None:
        # Both nlls from one arithmetic (`divergence_statistics`), so that a model against
        # itself gets nll == nll_baseline exactly; the CPU kernel's own nll (float64 sums)
        # can differ from it in the last float32 bit.
        out["nll"] = _gather(pairs, ("nll",))["nll"]
    for key in CACHE_COLUMNS if caches else ():
        out[key] = torch.cat([c[key] for c in caches]).cpu().numpy()
    return out


def score_windows(
    lm: LoadedModel,
    windows: list[Window],
    options: ScoreOptions,
    progress=None,
    doc_names=None,
    baseline: LoadedModel | None = None,
) -> dict[str, np.ndarray]:
    """Score every window; return per-token columns in window order (not batch order).

    Columns: ``doc_index, position, token_id, context_len`` and the `TokenStats` fields
    (present, with zero rows, when nothing is scored). ``progress``, if given, is called as
    ``progress(tokens_in_batch, tokens_in_total)`` after each batch. ``doc_names[w.doc_id]``
    is the user's id of a window's document, for error messages.

    With a ``baseline`` (a second `LoadedModel` over the same vocabulary), both models score
    the same batches, packed under the stricter of their batchings (`pair_batching`), and
    the columns also hold ``nll_baseline, kl, kl_reverse, delta_p, same_top1, acceptance,
    topk_overlap, kl_topk``
    (`core.divergence`); the model's own columns are the ones it gets scored alone (its
    ``nll`` to the last float32 bit: it is taken with ``nll_baseline``'s arithmetic).
    Every model is scored in eval mode and left in the mode it had.
    """
    if baseline is not None:
        check_pair(lm, baseline)
    base_mode = evaluating(baseline.model) if baseline is not None else contextlib.nullcontext()
    with evaluating(lm.model), base_mode:
        return _score_all(lm, windows, options, progress, doc_names, baseline)


def _score_all(
    lm: LoadedModel, windows: list[Window], options: ScoreOptions, progress, doc_names, baseline: LoadedModel | None
) -> dict[str, np.ndarray]:
    counts = np.array([w.n_scored for w in windows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    out: dict[str, np.ndarray] = {}
    compiled = use_compiled(lm, options, total)
    pending = [(batch, options.batch_tokens) for batch in _pack(lm, windows, options.batch_tokens, baseline)]
    while pending:
        batch, budget = pending.pop(0)
        batch_windows = [windows[i] for i in batch]
        b = np.asarray(batch)
        where = np.repeat(starts[b] - (np.cumsum(counts[b]) - counts[b]), counts[b]) + np.arange(counts[b].sum())
        batch_options = options
        if options.baseline_cache is not None:  # this batch's rows of the cached baseline, in batch order
            batch_options = dataclasses.replace(
                options, baseline_cache={k: v[where] for k, v in options.baseline_cache.items()}
            )
        try:
            stats, compiled = _score_batch_safely(lm, batch_windows, batch_options, compiled, baseline)
        except torch.OutOfMemoryError:
            pending[:0] = _split_after_oom(lm, windows, batch, budget, doc_names, baseline)
            continue
        _check_batch_finite(lm, baseline, batch_windows, stats, doc_names)
        # Where each of the batch's rows goes in window order (``where``): one scatter per column.
        for key, values in stats.items():
            if key not in out:
                out[key] = np.empty((total,) + values.shape[1:], dtype=values.dtype)
            out[key][where] = values
        offset = len(where)
        if progress is not None:
            progress(offset, total)
    if total == 0:  # nothing to score: the same columns, with zero rows
        out = _empty_stats(lm, options, baseline)
    out.update(_window_columns(windows, counts, total))
    return out


def _empty_stats(lm: LoadedModel, options: ScoreOptions, baseline: LoadedModel | None = None) -> dict[str, np.ndarray]:
    logits = torch.zeros((0, lm.vocab_size))
    stats = token_statistics(
        logits, torch.zeros(0, dtype=torch.long), options.temperatures, options.top_k, moments=options.moments
    )
    out = {key: getattr(stats, key).numpy() for key in stats.__dataclass_fields__}
    if options.mass_masks is not None:
        out["log_mass"] = np.zeros((0, len(options.mass_masks)), dtype=np.float32)
    if baseline is not None:
        out.update({key: np.zeros(0, dtype=bool if key == "same_top1" else np.float32) for key in _PAIR_EXTRA})
    return out


def _doc_name(window: Window, doc_names) -> object:
    return window.doc_id if doc_names is None else doc_names[window.doc_id]


def _split_after_oom(
    lm: LoadedModel,
    windows: list[Window],
    batch: list[int],
    budget: int,
    doc_names=None,
    baseline: LoadedModel | None = None,
):
    """Out of memory: halve the batch's token budget and re-pack the same windows, so the
    batch is retried in smaller pieces and nothing is lost or scored twice."""
    if any(m is not None and m.device.type == "cuda" for m in (lm, baseline)):
        torch.cuda.empty_cache()
    if len(batch) == 1:
        w = windows[batch[0]]
        pair = "" if baseline is None else f" (with its baseline {baseline.name})"
        raise ModelError(
            f"model {lm.name}{pair}: out of memory on a single window of {len(w.input_ids)} tokens "
            f"(document {_doc_name(w, doc_names)!r}). Lower `scoring.max_length`, or use a smaller dtype or a larger device."
        )
    half = max(1, budget // 2)
    log.warning("out of memory at batch_tokens=%d; retrying this batch at %d", budget, half)
    sub = _pack(lm, [windows[i] for i in batch], half, baseline)
    if len(sub) == 1:  # the budget allows them all in one row group: split by rows instead
        sub = [list(range(len(batch) // 2)), list(range(len(batch) // 2, len(batch)))]
    return [([batch[j] for j in group], half) for group in sub]


def _score_batch_safely(lm, windows, options, compiled, baseline=None):
    """Score a batch, dropping to the eager reductions if compiling fails (no C++ compiler,
    an unsupported backend). Returns the stats and whether to keep compiling."""
    # A single model gets the call `score_batch` has always had: wrappers of it rely on that.
    pair = {} if baseline is None else {"baseline": baseline}
    if not compiled:
        return score_batch(lm, windows, options, **pair), False
    try:
        return score_batch(lm, windows, options, compiled=True, **pair), True
    except Exception as exc:  # torch.compile raises backend-specific errors
        log.warning("torch.compile of the token statistics failed (%s); using eager mode.", type(exc).__name__)
        return score_batch(lm, windows, options, **pair), False


def _window_columns(windows: list[Window], counts: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """Per-token document index, position, target id and context length, in window order."""
    if total == 0:
        return {k: np.zeros(0, dtype=np.int64) for k in ("doc_index", "position", "token_id", "context_len")}
    first_position = np.array([w.positions[0] if w.positions else 0 for w in windows], dtype=np.int64)
    first_context = np.array([w.first_scored + 1 for w in windows], dtype=np.int64)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)  # 0.. inside each window
    return {
        "doc_index": np.repeat(np.array([w.doc_id for w in windows], dtype=np.int64), counts),
        "position": np.repeat(first_position, counts) + within,
        "token_id": np.fromiter((t for w in windows for t in w.targets), dtype=np.int64, count=total),
        "context_len": np.repeat(first_context, counts) + within,
    }


def _check_batch_finite(lm, baseline, windows, stats, doc_names) -> None:
    """A NaN or inf logit in either model stops the run naming that model and the document."""
    _check_finite(lm, windows, stats, doc_names)
    if baseline is None:
        return
    _check_finite(baseline, windows, {"nll": stats["nll_baseline"], "entropy": stats["nll_baseline"]}, doc_names)
    # Finite nlls but a NaN KL: both heads put -inf on the same tokens (their difference is NaN).
    _check_finite(lm, windows, {"nll": stats["kl"], "entropy": stats["kl_reverse"]}, doc_names)


def _check_finite(lm: LoadedModel, windows: list[Window], stats: dict[str, np.ndarray], doc_names=None) -> None:
    """A NaN or inf logit (a broken checkpoint, an fp16 overflow) stops the run by name."""
    bad = ~np.isfinite(stats["nll"]) | ~np.isfinite(stats["entropy"])
    if not bad.any():
        return
    first = int(np.argmax(bad))
    for w in windows:
        if first < w.n_scored:
            raise ModelError(
                f"model {lm.name}: non-finite logits at document {_doc_name(w, doc_names)!r}, token position "
                f"{w.positions[first]}. The checkpoint may be broken, or half precision overflowed: "
                "try `dtype: float32`."
            )
        first -= w.n_scored


def check_vocabulary(lm: LoadedModel, max_token_id: int) -> None:
    """Token ids must index the model's embedding rows (a tokenizer/model mismatch otherwise)."""
    if max_token_id >= lm.embedding_rows:
        raise ModelError(
            f"model {lm.name}: the tokenizer produced token id {max_token_id}, but the model has "
            f"only {lm.embedding_rows} embedding rows. The tokenizer does not belong to this model; "
            "load the tokenizer saved with the checkpoint."
        )


def resolve_window(lm: LoadedModel, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """The protocol's (L, S): L defaults to the model's context size, S to L."""
    limit = lm.max_positions
    if max_length is None:
        if limit is None:
            raise ModelError(f"model {lm.name}: its config declares no context size. Set `scoring.max_length`.")
        max_length = limit
    if max_length < 1:
        raise ModelError(f"scoring.max_length: must be >= 1 (got {max_length}).")
    if limit is not None and max_length > limit:
        raise ModelError(
            f"scoring.max_length: must be <= the model's {limit} positions for {lm.name} "
            f"(got {max_length}). Lower max_length, or leave it unset to use {limit}."
        )
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ModelError(
            f"scoring.stride: must be in [1, max_length={max_length}] (got {stride}). "
            "Use stride = max_length for disjoint windows, or less for overlapping context."
        )
    return max_length, stride
