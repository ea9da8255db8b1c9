"""Score windows with a loaded model. The ONLY code that runs a model forward.

Windows are batched by a token budget (sorted by length to cut padding), right-padded with
an attention mask, run through the body, and only their scored positions reach the output
head, a chunk of rows at a time (`OutputHead`); per-token statistics come from one pass
over each chunk of logits (`token_statistics`). Out of memory halves the budget and retries
the same windows; a non-finite logit stops the run naming the document.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..core.losses import token_statistics
from ..core.words import log_mass
from ..core.windows import Window
from ..errors import ModelError
from .head import evaluating
from .loading import LoadedModel

log = logging.getLogger(__name__)

# float32 bytes of one logit row are multiplied by this to budget a chunk: logits, log q,
# q, and the temporaries of the reductions.
_CHUNK_COPIES = 6




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


# Below this many logits (tokens x vocabulary) a CPU run does not repay the compile time.
# Measured on 2 threads at V = 50k: compiling costs 6-7 s with Inductor's on-disk cache warm
# and 18 s cold, and saves ~2.7 ns per logit (eager 4.5, compiled 1.8), so a warm process
# pays back from ~2.4e9 logits (a cold one from ~7e9).
_COMPILE_MIN_LOGITS_CPU = 2.5e9


def use_compiled(lm: LoadedModel, options: ScoreOptions, n_tokens: int) -> bool:
    """Whether to fuse the reductions: always on request, by size under ``auto``."""
    if options.compile == "auto":
        return lm.device.type == "cuda" or n_tokens * lm.vocab_size >= _COMPILE_MIN_LOGITS_CPU
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


def _pack(lm: LoadedModel, windows: list[Window], batch_tokens: int) -> list[list[int]]:
    """`pack_batches` under the batching the load-time padding probe chose."""
    if lm.probes.batching == "one_window":
        return [[i] for i in range(len(windows))]
    return pack_batches(windows, batch_tokens, equal_length=lm.probes.equal_length)


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
    return tuple(torch.from_numpy(a) for a in (rows, cols, targets))


# The default budget of one chunk: ~16 MiB of float32 logits on CPU, where the reductions
# cost the same per logit from 4 to 64 MiB; on CUDA larger chunks keep the kernels busy.
_CHUNK_BYTES = {"cpu": 96 * 2**20, "cuda": 1536 * 2**20}
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


@torch.inference_mode()
def score_batch(lm: LoadedModel, windows: list[Window], options: ScoreOptions, compiled: bool = False) -> dict[str, np.ndarray]:
    """Per-token statistics for the scored outputs of ``windows``, in window order."""
    ids, mask = _pad(windows, lm.device)
    if not lm.probes.mask:  # a model that fails when given a mask: unpadded rows, no mask
        mask = None
    rows, cols, targets = (t.to(lm.device) for t in _scored_index(windows))
    if lm.head.fast:
        hidden = lm.head.body(ids, mask)  # (B, T, H), on the last layer's device under a device_map
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)

        def source(sl):  # (n, V) logits, and their row sums when the head gives them for free
            states = hidden[rows[sl], cols[sl]]
            return lm.head.project(states, lm.workspace), (None if compiled else lm.head.logit_sums(states))
    else:
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        rows, cols = rows.to(logits.device), cols.to(logits.device)
        source = lambda sl: (logits[rows[sl], cols[sl]], None)  # noqa: E731
    step = _chunk_rows(lm, options.chunk_bytes)
    parts, masses = [], []
    masks = None if options.mass_masks is None else torch.from_numpy(options.mass_masks.T.astype(np.float32))
    for begin in range(0, len(targets), step):
        sl = slice(begin, begin + step)
        chunk, sums = source(sl)  # (n, V), on the output head's device
        parts.append(
            token_statistics(
                chunk, targets[sl].to(chunk.device), options.temperatures, options.top_k, compiled, lm.workspace,
                options.moments, logit_sums=sums,
            )
        )
        if masks is not None:  # the same chunk of logits, one more reduction
            scratch = lm.workspace.get("mass_e", tuple(chunk.shape), torch.float32, chunk.device) \
                if chunk.dtype != torch.float64 else None  # fmt: skip
            masses.append(log_mass(chunk, masks.to(chunk.device), scratch).float())
    # One device-to-host copy per batch, not one per chunk and statistic.
    fields = parts[0].__dataclass_fields__
    out = {key: torch.cat([getattr(p, key) for p in parts]).cpu().numpy() for key in fields}
    if masses:
        out["log_mass"] = torch.cat(masses).cpu().numpy()
    return out


def score_windows(
    lm: LoadedModel, windows: list[Window], options: ScoreOptions, progress=None, doc_names=None
) -> dict[str, np.ndarray]:
    """Score every window; return per-token columns in window order (not batch order).

    Columns: ``doc_index, position, token_id, context_len`` and the `TokenStats` fields
    (present, with zero rows, when nothing is scored). ``progress``, if given, is called as
    ``progress(tokens_in_batch, tokens_in_total)`` after each batch. ``doc_names[w.doc_id]``
    is the user's id of a window's document, for error messages. The model is scored in
    eval mode and left in the mode it had.
    """
    with evaluating(lm.model):
        return _score_all(lm, windows, options, progress, doc_names)


def _score_all(lm: LoadedModel, windows: list[Window], options: ScoreOptions, progress, doc_names) -> dict[str, np.ndarray]:
    counts = np.array([w.n_scored for w in windows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    out: dict[str, np.ndarray] = {}
    compiled = use_compiled(lm, options, total)
    pending = [(batch, options.batch_tokens) for batch in _pack(lm, windows, options.batch_tokens)]
    while pending:
        batch, budget = pending.pop(0)
        batch_windows = [windows[i] for i in batch]
        try:
            stats, compiled = _score_batch_safely(lm, batch_windows, options, compiled)
        except torch.OutOfMemoryError:
            pending[:0] = _split_after_oom(lm, windows, batch, budget, doc_names)
            continue
        _check_finite(lm, batch_windows, stats, doc_names)
        # Where each of the batch's rows goes in window order: one scatter per column.
        b = np.asarray(batch)
        where = np.repeat(starts[b] - (np.cumsum(counts[b]) - counts[b]), counts[b]) + np.arange(counts[b].sum())
        for key, values in stats.items():
            if key not in out:
                out[key] = np.empty((total,) + values.shape[1:], dtype=values.dtype)
            out[key][where] = values
        offset = len(where)
        if progress is not None:
            progress(offset, total)
    if total == 0:  # nothing to score: the same columns, with zero rows
        out = _empty_stats(lm, options)
    out.update(_window_columns(windows, counts, total))
    return out


def _empty_stats(lm: LoadedModel, options: ScoreOptions) -> dict[str, np.ndarray]:
    logits = torch.zeros((0, lm.vocab_size))
    stats = token_statistics(logits, torch.zeros(0, dtype=torch.long), options.temperatures, options.top_k,
                             moments=options.moments)
    out = {key: getattr(stats, key).numpy() for key in stats.__dataclass_fields__}
    if options.mass_masks is not None:
        out["log_mass"] = np.zeros((0, len(options.mass_masks)), dtype=np.float32)
    return out


def _doc_name(window: Window, doc_names) -> object:
    return window.doc_id if doc_names is None else doc_names[window.doc_id]


def _split_after_oom(lm: LoadedModel, windows: list[Window], batch: list[int], budget: int, doc_names=None):
    """Out of memory: halve the batch's token budget and re-pack the same windows, so the
    batch is retried in smaller pieces and nothing is lost or scored twice."""
    if lm.device.type == "cuda":
        torch.cuda.empty_cache()
    if len(batch) == 1:
        w = windows[batch[0]]
        raise ModelError(
            f"model {lm.name}: out of memory on a single window of {len(w.input_ids)} tokens "
            f"(document {_doc_name(w, doc_names)!r}). Lower `scoring.max_length`, or use a smaller dtype or a larger device."
        )
    half = max(1, budget // 2)
    log.warning("out of memory at batch_tokens=%d; retrying this batch at %d", budget, half)
    sub = _pack(lm, [windows[i] for i in batch], half)
    if len(sub) == 1:  # the budget allows them all in one row group: split by rows instead
        sub = [list(range(len(batch) // 2)), list(range(len(batch) // 2, len(batch)))]
    return [([batch[j] for j in group], half) for group in sub]


def _score_batch_safely(lm, windows, options, compiled):
    """Score a batch, dropping to the eager reductions if compiling fails (no C++ compiler,
    an unsupported backend). Returns the stats and whether to keep compiling."""
    if not compiled:
        return score_batch(lm, windows, options), False
    try:
        return score_batch(lm, windows, options, compiled=True), True
    except Exception as exc:  # torch.compile raises backend-specific errors
        log.warning("torch.compile of the token statistics failed (%s); using eager mode.", type(exc).__name__)
        return score_batch(lm, windows, options), False


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
            raise ModelError(
                f"model {lm.name}: its config declares no context size. Set `scoring.max_length`."
            )
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
