"""Load-time probes of the two assumptions batched scoring rests on.

1. **Causality.** The NLL of token t is a language-model probability only if the logits at
   position t see nothing after it. The probe changes the last tokens of an input and
   checks that the logits before them do not move. A model that fails (BERT without
   ``is_decoder``, XLNet with ``attn_type="bi"``, an XLM with ``causal=False``) is refused
   by name unless the user opts in with ``allow_noncausal``.
2. **Padding invariance.** Right-padded batches are exact only if a row's logits do not
   depend on the padding beside it. Some models fail: attention that keeps the top-k keys
   per query breaks ties by row length, some ignore the mask and infer padding from id 0,
   and some crash when given a mask at all. The probe compares each input alone (no mask,
   batch of one: the model as its authors call it) against the same input in a batch.
   The first batching that reproduces it is used:

   - ``padded``: windows of any length share a batch, right-padded with a mask;
   - ``equal_length``: only windows of the same length share a batch (no padding), with
     an all-ones mask;
   - ``equal_length_no_mask``: the same, with no mask at all (the mask itself fails);
   - ``one_window``: every window alone, no mask (rows of one batch interact).

The probes run once, when a model is prepared, on the same path the scorer then uses
(body + head, or the plain forward). A model whose behaviour changes only beyond some length
(a sliding window, a chunk, the ``index_topk`` keys a sparse-attention indexer keeps) is
probed beyond it: the config's declared lengths (`declared_lengths`) below the context size
set the probe rows' lengths, so that rows cross every one of them. Two kinds are decided
from the config instead, with equal-length batching at least:

- a top-k selection of keys (``index_topk``: DeepSeek-V3.2's indexer and its kin): ``topk``
  over a padded row runs over more keys than over the row alone, and breaks ties (ReLU
  zeros) and near-ties by row length, so a probe can pass on its inputs by luck while real
  text differs; and its unit need not be tokens (DeepSeek-V4 ranks compressed keys);
- a span too long to probe within one default scoring batch (`PROBE_TOKENS`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .head import OutputHead, evaluating

log = logging.getLogger(__name__)

BATCHINGS = ("padded", "equal_length", "equal_length_no_mask", "one_window")

# Probe inputs: the rows of the short padded batch (padded to the longest; some models move
# only at some lengths and amounts of padding), and how many trailing tokens of the longest
# the causality probe changes.
_LENGTHS, _CHANGED = (19, 16, 12, 9, 7, 4, 2), 6
_LONG = _LENGTHS[0]
# Rows of the long padded batch: this far beyond the longest declared length, padded by 0,
# 7 and 14 tokens to the first.
_BEYOND = (16, 9, 2)
# Tokens of the long padded batch at most (rows x longest row): the scorer's default
# `batch_tokens`, so the probe needs no more memory than one default scoring batch. A
# declared length whose batch would exceed it is decided from the config.
PROBE_TOKENS = 16384

# Config fields that declare a length beyond which attention changes what it does. A top-k
# selection ranks every key of the row (padding included, then masked), so its choice at a
# tie depends on the row length: decided from the config. A span (window, chunk, block) is
# probed beyond: right padding is harmless unless the implementation is not.
SELECTIONS = ("index_topk", "index_topk_blocks", "indexer_budget", "keep_window_size")
SPANS = (
    "sliding_window",
    "sliding_window_size",
    "attention_window",
    "attention_window_size",
    "attention_chunk_size",
    "local_attention",
    "local_attention_window_len",
    "window_size",
    "chunk_size",
    "mamba_chunk_size",
    "block_size",
    "local_attn_chunk_length",
    "lsh_attn_chunk_length",
    "index_block_size",
    "index_num_local_tokens",
)


@dataclass(frozen=True)
class Probes:
    """What the load-time probes found, and the batching the scorer uses because of it.

    ``causal_change`` is the largest move of a logit before the changed tokens, relative
    to the logit scale (0 for a causal model); ``allow_noncausal`` records the user's
    opt-in to score a model that is not causal.
    """

    causal: bool = True
    batching: str = "padded"
    causal_change: float = 0.0
    allow_noncausal: bool = False

    @property
    def equal_length(self) -> bool:
        """Only windows of one length share a batch (no padding)."""
        return self.batching != "padded"

    @property
    def mask(self) -> bool:
        """Whether the scorer passes an attention mask."""
        return self.batching in ("padded", "equal_length")

    def protocol(self) -> dict:
        """The keys recorded in run.json and in a table's attrs."""
        return {"causal": self.causal, "allow_noncausal": self.allow_noncausal, "batching": self.batching}


def max_positions(config) -> int | None:
    """The model's context size from its config, if it declares one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def declared_lengths(config) -> dict[str, int]:
    """The `SELECTIONS` and `SPANS` fields ``config`` (or its text config) sets, in tokens,
    shorter than its context size: a window is never longer than the context, so a length
    it cannot reach changes nothing. A per-layer list counts by its longest entry; a
    selection counted in blocks or compressed keys is converted to tokens (`_in_tokens`)."""
    if config is None:
        return {}
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    context = max_positions(config)
    found: dict[str, int] = {}
    for name in SELECTIONS + SPANS:
        for cfg in configs:
            value = getattr(cfg, name, None)
            if isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
                value = max(value)
            if type(value) is not int or value <= 0:
                continue
            value = _in_tokens(cfg, name, value)
            if context is None or value < context:
                found[name] = max(value, found.get(name, 0))
    return found


def _in_tokens(config, name: str, value: int) -> int:
    """A selection's size in tokens: MiniMax-M3 keeps ``index_topk_blocks`` (plus
    ``index_local_blocks``) blocks of ``index_block_size`` keys; DeepSeek-V4 ranks keys
    compressed ``compress_rates["compressed_sparse_attention"]`` to one."""
    if name == "index_topk_blocks":
        block = getattr(config, "index_block_size", None)
        local = getattr(config, "index_local_blocks", None)
        if type(block) is int and block > 0:
            return (value + (local if type(local) is int and local > 0 else 0)) * block
    rates = getattr(config, "compress_rates", None)
    if name == "index_topk" and isinstance(rates, dict):
        rate = rates.get("compressed_sparse_attention")
        if type(rate) is int and rate > 0:
            return value * rate
    return value


@dataclass(frozen=True)
class ProbePlan:
    """What the padding probe runs, from the config's declared lengths.

    ``groups`` are the row lengths of each padded probe batch (longest first: the rows are
    padded to it); ``floor`` the loosest batching the config allows before any probe
    (``equal_length`` where it declares a top-k selection, or a span too long to probe) and
    ``reason`` the fields that set it."""

    groups: tuple[tuple[int, ...], ...]
    floor: str = "padded"
    reason: str = ""


def probe_plan(config) -> ProbePlan:
    """Probe rows beyond every declared length within `PROBE_TOKENS`; a floor for the
    top-k selections and for the lengths beyond it."""
    lengths = declared_lengths(config)
    context = max_positions(config) if config is not None else None
    too_long = {k: v for k, v in lengths.items() if len(_BEYOND) * (v + _BEYOND[0]) > PROBE_TOKENS}
    decided = {k: v for k, v in lengths.items() if k in SELECTIONS} | too_long
    groups: list[tuple[int, ...]] = [_LENGTHS]
    longest = max((v for k, v in lengths.items() if k not in too_long), default=0)
    if sum(n >= longest + _BEYOND[-1] for n in _LENGTHS) < len(_BEYOND):  # too few short rows cross it
        # no row beyond the context: the scorer never makes one
        rows = sorted({min(longest + d, context or longest + d) for d in _BEYOND}, reverse=True)
        groups.append(tuple(rows))
    reason = ", ".join(f"{k}={v}" for k, v in sorted(decided.items()))
    return ProbePlan(tuple(groups), "equal_length" if decided else "padded", reason)


def probe_model(model, head: OutputHead) -> Probes:
    """Run both probes on ``model`` along ``head``'s path (eval mode, no gradients)."""
    plan = probe_plan(getattr(model, "config", None))
    with evaluating(model), torch.inference_mode():
        batching = _batching(model, head, plan)
        change = _causal_change(model, head, batching)
    # A model whose probe logits are not finite cannot be judged here; scoring stops on its
    # first non-finite logit with the document named, which is the error that helps.
    causal = not math.isfinite(change) or change <= _tolerance(model)
    return Probes(causal=causal, batching=batching, causal_change=change)


def _tolerance(model, padding: bool = False) -> float:
    """Largest move of a logit, relative to the logit scale, that counts as rounding.

    Rounding moves float32 logits by ~1e-7 of the scale; the failures looked for move them
    by whole units. Padding is held tighter: a false alarm there only costs speed (batches
    of equal length), while a false alarm on causality would refuse a good model (whose
    earlier positions may round differently when a mixture of experts routes the changed
    tokens elsewhere)."""
    if _weights_dtype(model) != torch.float32:
        return 2e-2
    return 2e-6 if padding else 1e-4


def _inputs(model, length: int, seed: int) -> torch.Tensor:
    """Deterministic probe ids in [1, V): never id 0, which the scorer pads with."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    return 1 + (torch.arange(length, device=device) * 7919 + 104729 * seed) % (vocab - 1)


def _logits(model, head: OutputHead, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) float32 logits along the scorer's path."""
    if head.fast:
        return head.project(head.body(ids, mask)).float()
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


_CHUNK = 256  # rows longer than this are compared a chunk of positions at a time


def _outputs(model, head: OutputHead, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) float32 logits, as the short probes always took them; on the
    fast path with T > `_CHUNK`, (B, T, H) final hidden states instead, projected to logits
    a chunk at a time by `_agree` (a long probe row's (T, V) logits need not exist at once)."""
    if head.fast and ids.shape[1] > _CHUNK:
        return head.body(ids, mask)
    return _logits(model, head, ids, mask)


def _agree(model, head: OutputHead, got: torch.Tensor, reference: torch.Tensor, hidden: bool) -> bool:
    """Whether two (T, .) `_outputs` rows give the same logits, relative to the reference's
    logit scale, within the padding tolerance; ``hidden``: they are hidden states."""
    if got.shape != reference.shape:
        return False
    if not hidden:
        scale = reference.abs().max().clamp_min(1.0)
        return bool(((got - reference).abs().max() / scale) <= _tolerance(model, True))
    worst, top = 0.0, 1.0
    for start in range(0, reference.shape[0], _CHUNK):
        a = head.project(got[start : start + _CHUNK]).float()
        b = head.project(reference[start : start + _CHUNK]).float()
        worst = max(worst, float((a - b).abs().max()))
        top = max(top, float(b.abs().max()))
    return worst / top <= _tolerance(model, True)


def _batching(model, head: OutputHead, plan: ProbePlan | None = None) -> str:
    """The first batching, no looser than the plan's floor, under which each probe row's
    logits equal its logits alone. Each group of the plan is one padded batch (rows padded
    to its first), and two rows of its first length make the equal-length batch."""
    plan = plan if plan is not None else ProbePlan((_LENGTHS,))
    device = model.get_input_embeddings().weight.device
    seed = iter(range(10_000))
    checks = []  # per group: (equal-length rows, padded rows), each a list of 1-D ids
    for group in plan.groups:
        rows = [_inputs(model, n, next(seed)) for n in group]
        checks.append(([rows[0], _inputs(model, group[0], next(seed))], rows))  # seeds as before: 0-6, then 7
    alone: dict[tuple[int, bool], torch.Tensor] = {}

    def alone_of(x: torch.Tensor, width: int) -> torch.Tensor:
        """``x`` alone, in the form (logits or hidden states) of a batch ``width`` wide."""
        key = (id(x), head.fast and width > _CHUNK)
        if key not in alone:
            alone[key] = (head.body(x[None], None) if key[1] else _logits(model, head, x[None], None))[0]
        return alone[key]

    def rows_agree(rows: list[torch.Tensor], mask: bool, padded: bool) -> bool:
        width = len(rows[0])
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)  # the scorer's padding: id 0, right
        attention = torch.zeros_like(ids)
        for i, x in enumerate(rows):
            ids[i, : len(x)], attention[i, : len(x)] = x, 1
        try:
            out = _outputs(model, head, ids, attention if mask or padded else None)
        except Exception as exc:  # a model that cannot take this batch (XLNet with a mask)
            log.debug("probe batch failed: %s", exc)
            return False
        hidden = head.fast and width > _CHUNK
        return all(_agree(model, head, out[i, : len(x)], alone_of(x, width), hidden) for i, x in enumerate(rows))

    if all(rows_agree(same, True, False) for same, _ in checks):
        if plan.floor == "padded" and all(rows_agree(padded, True, True) for _, padded in checks):
            return "padded"
        batching = "equal_length"
    elif all(rows_agree(same, False, False) for same, _ in checks):
        batching = "equal_length_no_mask"
    else:
        batching = "one_window"
    if batching == "equal_length" and plan.floor == "equal_length":
        why = f"its config declares {plan.reason} (a top-k selection of keys, or a span too long to probe)"
    else:
        why = f"its logits change when rows are {'padded' if batching == 'equal_length' else 'batched'}"
    log.warning(
        "%s: %s; scoring with batching=%s, which reproduces the model on each window alone.",
        type(model).__name__,
        why,
        batching,
    )
    return batching


def _causal_change(model, head: OutputHead, batching: str) -> float:
    """How far the logits before the last tokens move when those tokens change, relative
    to the logit scale: 0 for a causal model. Run the way the scorer will run it."""
    ids = _inputs(model, _LONG, 3)
    changed = ids.clone()
    changed[-_CHANGED:] = _inputs(model, _CHANGED, 4)
    if batching == "one_window":  # rows of one batch interact in this model: one at a time
        before, after = (_logits(model, head, x[None], None)[0] for x in (ids, changed))
    else:
        batch = torch.stack([ids, changed])
        out = _logits(model, head, batch, torch.ones_like(batch) if batching != "equal_length_no_mask" else None)
        before, after = out[0], out[1]
    keep = _LONG - _CHANGED
    scale = before[:keep].abs().max().clamp_min(1.0)
    return float((after[:keep] - before[:keep]).abs().max() / scale)


def _weights_dtype(model) -> torch.dtype:
    """The weights' dtype: ``model.dtype`` for a transformers model, else its first parameter's."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype
