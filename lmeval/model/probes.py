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
(body + head, or the plain forward). They are short inputs: a model whose behaviour
changes only beyond their length (a sparse pattern that starts at 2k tokens) is not seen.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .head import OutputHead, evaluating

log = logging.getLogger(__name__)

BATCHINGS = ("padded", "equal_length", "equal_length_no_mask", "one_window")

# Probe inputs: the rows of the padded batch (padded to the longest; some models, such as
# top-k sparse attention with ties, move only at some lengths and amounts of padding), and
# how many trailing tokens of the longest the causality probe changes.
_LENGTHS, _CHANGED = (19, 16, 12, 9, 7, 4, 2), 6
_LONG = _LENGTHS[0]


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


def probe_model(model, head: OutputHead) -> Probes:
    """Run both probes on ``model`` along ``head``'s path (eval mode, no gradients)."""
    with evaluating(model), torch.inference_mode():
        batching = _batching(model, head)
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


def _agree(model, got: torch.Tensor, reference: torch.Tensor) -> bool:
    scale = reference.abs().max().clamp_min(1.0)
    return got.shape == reference.shape and bool(((got - reference).abs().max() / scale) <= _tolerance(model, True))


def _batching(model, head: OutputHead) -> str:
    """The first batching under which each probe row's logits equal its logits alone."""
    rows = [_inputs(model, n, seed) for seed, n in enumerate(_LENGTHS)]
    long_a, long_b = rows[0], _inputs(model, _LONG, len(rows))
    alone = {id(x): _logits(model, head, x[None], None)[0] for x in rows + [long_b]}
    same = torch.stack([long_a, long_b])
    padded = torch.zeros((len(rows), _LONG), dtype=torch.long, device=same.device)  # the scorer's padding: id 0, right
    pad_mask = torch.zeros_like(padded)
    for i, x in enumerate(rows):
        padded[i, : len(x)], pad_mask[i, : len(x)] = x, 1

    def rows_agree(ids, mask, rows) -> bool:
        try:
            out = _logits(model, head, ids, mask)
        except Exception as exc:  # a model that cannot take this batch (XLNet with a mask)
            log.debug("probe batch failed: %s", exc)
            return False
        return all(_agree(model, out[i, : len(x)], alone[id(x)]) for i, x in enumerate(rows))

    if rows_agree(same, torch.ones_like(same), [long_a, long_b]):
        if rows_agree(padded, pad_mask, rows):
            return "padded"
        batching = "equal_length"
    elif rows_agree(same, None, [long_a, long_b]):
        batching = "equal_length_no_mask"
    else:
        batching = "one_window"
    log.warning(
        "%s: its logits change when rows are %s; scoring with batching=%s, which reproduces the model "
        "on each window alone.",
        type(model).__name__,
        "padded" if batching == "equal_length" else "batched",
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
