"""The output head: logits for selected positions only, from the final hidden states.

The head turns hidden states (N, H) into logits (N, V); with V = 128k that is the largest
tensor of a forward pass. So the scorer runs the model body, keeps the final hidden states,
and applies the head only to the positions it scores, a chunk at a time. Models whose logits
are post-processed after the head (soft-capping: Gemma-2, RecurrentGemma, xLSTM; a scale:
Cohere, Falcon-H1, HyperCLOVA X; Granite's logit divisor) are handled explicitly, as are
bodies not found at ``base_model`` (Llama-4 text); anything else that does not reproduce
``model(...).logits`` falls back to that plain path. A probe at load time decides which, so
the fast path is never wrong: a config key only proposes a reading, the probe confirms it.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..core.losses import Workspace

log = logging.getLogger(__name__)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode (no dropout) for the duration, then the caller's train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class OutputHead:
    """Logits for selected positions, from the final hidden states.

    ``fast`` is True when the body + head path reproduces ``model(...).logits``; then only
    scored positions reach the head. Otherwise the plain forward is used. ``body_module``
    is the module that returns the final hidden states (usually ``model.base_model``);
    ``scale`` multiplies the head's logits, ``divisor`` divides them and ``softcap`` caps
    them as ``softcap * tanh(z / softcap)``, in that order.
    """

    def __init__(
        self, model, fast: bool, softcap: float | None, scale: float | None, divisor: float | None, body_module=None
    ):
        self.model = model
        self.fast = fast
        self.softcap = softcap
        self.scale = scale
        self.divisor = divisor
        self.body_module = body_module if body_module is not None else getattr(model, "base_model", model)
        # (weight key, sum_v w_v, sum_v b_v), for `logit_sums`
        self._column_sums: tuple[tuple, torch.Tensor, float] | None = None

    @classmethod
    def for_model(cls, model) -> OutputHead:
        """The fast path of the first known (body, transform) reading of ``model`` that the
        probe confirms, else the plain path. Config keys only propose; the probe decides."""
        candidates = list(_candidates(model)) if model.get_output_embeddings() is not None else []
        with evaluating(model):
            reference = _reference_logits(model) if candidates else None
            for head in candidates:
                if reference is not None and head._matches(reference):
                    return head
        if candidates:
            log.warning(
                "%s post-processes its logits in a way lmeval does not know; "
                "using the plain model(...).logits path (slower, more memory).",
                type(model).__name__,
            )
        return cls(model, fast=False, softcap=None, scale=None, divisor=None)

    def project(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """(N, H) final hidden states -> (N, V) logits, with the model's post-processing.

        With a workspace, a plain linear head writes into a reused buffer (no page faults
        for a fresh (N, V) tensor on every chunk), and the post-processing works in place.
        """
        head = self.model.get_output_embeddings()
        if workspace is not None and type(head) is torch.nn.Linear:
            shape = (hidden.shape[0], head.weight.shape[0])
            out = workspace.get("logits", shape, head.weight.dtype, hidden.device)
            logits = torch.matmul(hidden, head.weight.t(), out=out)
            if head.bias is not None:
                logits.add_(head.bias)
        else:
            logits = head(hidden)
        if self.scale is not None:
            logits = logits.mul_(self.scale)
        if self.divisor is not None:
            logits = logits.div_(self.divisor)
        if self.softcap is not None:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def logit_sums(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, H) final hidden states -> (N,) float64 sums of each row's logits, sum_v z_v,
        without the logits: the head is linear, so sum_v (h . w_v + b_v) = h . sum_v w_v +
        sum_v b_v. It spares the reductions one pass over the (N, V) chunk. None where the
        post-processing is not linear (soft-capping), the head is not a plain Linear, or its
        logits are rounded to half precision (the sum is then the rounded logits')."""
        head = self.model.get_output_embeddings()
        if self.softcap is not None or type(head) is not torch.nn.Linear:
            return None
        if head.weight.dtype not in (torch.float32, torch.float64):
            return None
        weight = head.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._column_sums is None or self._column_sums[0] != key:  # recomputed when training moves the weights
            total = weight.sum(dim=0, dtype=torch.float64)  # (H,)
            bias = 0.0 if head.bias is None else float(head.bias.sum(dtype=torch.float64))
            self._column_sums = (key, total, bias)
        _, total, bias = self._column_sums
        sums = hidden.to(torch.float64) @ total.to(hidden.device) + bias
        if self.scale is not None:
            sums = sums * self.scale
        if self.divisor is not None:
            sums = sums / self.divisor
        return sums

    def body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) final hidden states (after the final norm)."""
        out = self.body_module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def reproduces_forward(self) -> bool:
        """Probe: does body + project equal ``model(...).logits`` on a short input?"""
        reference = _reference_logits(self.model)
        return reference is not None and self._matches(reference)

    @torch.inference_mode()
    def _matches(self, reference: torch.Tensor) -> bool:
        ids = _probe_ids(self.model)
        try:
            ours = self.project(self.body(ids, torch.ones_like(ids))).float()
        except Exception as exc:  # any model whose body cannot be called alone
            log.debug("fast head path unavailable: %s", exc)
            return False
        if ours.shape != reference.shape:
            return False
        tolerance = 1e-4 if self.model.dtype == torch.float32 else 2e-2
        scale = reference.abs().max().clamp_min(1.0)
        return bool(((ours - reference).abs().max() / scale) <= tolerance)


def _probe_ids(model) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    return (torch.arange(8, device=device) * 7919 % vocab)[None, :]


@torch.inference_mode()
def _reference_logits(model) -> torch.Tensor | None:
    ids = _probe_ids(model)
    try:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    except Exception as exc:
        log.debug("the model cannot be called on a probe input: %s", exc)
        return None


# Config keys of logit transforms after the head, by what they do. The config names a
# number; which operation it is differs between models (Granite divides by
# ``logits_scaling``, HyperCLOVA X multiplies), so each reading is proposed and probed.
_MULTIPLIERS = ("logit_scale", "lm_head_multiplier")  # Cohere, Falcon-H1
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")  # Gemma-2, RecurrentGemma, xLSTM
_BODY_NAMES = ("model", "transformer", "backbone", "language_model", "decoder")


def _candidates(model):
    """(body, transform) readings of a model, most likely first, as OutputHeads to probe."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    for key in _MULTIPLIERS:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            scale *= value
    softcap = next((v for k in _SOFTCAPS if (v := getattr(config, k, None))), None)
    scaling = getattr(config, "logits_scaling", None)
    # (multiplier, divisor) pairs
    readings: list[tuple[float | None, float | None]] = (
        [(None, scaling)] if isinstance(scaling, (int, float)) and scaling != 1 else [(None, None)]
    )
    if readings[0][1] is not None:
        readings.append((scaling, None))  # the multiplying reading (HyperCLOVA X)
    for body in _bodies(model):
        for multiplier, divisor in readings:
            factor = scale * (multiplier or 1.0)
            yield OutputHead(model, True, softcap, None if factor == 1.0 else factor, divisor, body)


def _bodies(model):
    """Modules that may return the final hidden states: ``base_model`` first, then the
    usual attribute names (Llama-4 text keeps its body at ``model`` although its
    ``base_model_prefix`` says ``language_model``)."""
    seen: list[torch.nn.Module] = []
    for module in [getattr(model, "base_model", None)] + [getattr(model, n, None) for n in _BODY_NAMES]:
        if isinstance(module, torch.nn.Module) and module is not model and all(module is not m for m in seen):
            seen.append(module)
    return seen
