"""The output head: logits for selected positions only, from the final hidden states.

The head turns hidden states (N, H) into logits (N, V); with V = 128k that is the largest
tensor of a forward pass. So the scorer runs the model body, keeps the final hidden states,
and applies the head only to the positions it scores, a chunk at a time. Models whose logits
are post-processed after the head (Gemma-2's soft-capping, Cohere's logit scale, Granite's
logit divisor) are handled explicitly; anything else that does not reproduce
``model(...).logits`` falls back to that plain path. A probe at load time decides which, so
the fast path is never wrong.
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
    scored positions reach the head. Otherwise the plain forward is used.
    """

    def __init__(self, model, fast: bool, softcap: float | None, scale: float | None, divisor: float | None):
        self.model = model
        self.fast = fast
        self.softcap = softcap
        self.scale = scale
        self.divisor = divisor

    @classmethod
    def for_model(cls, model) -> "OutputHead":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head = cls(
            model,
            fast=model.get_output_embeddings() is not None and model.base_model is not model,
            softcap=getattr(config, "final_logit_softcapping", None),
            scale=getattr(config, "logit_scale", None),
            divisor=getattr(config, "logits_scaling", None),
        )
        with evaluating(model):
            reproduces = head.fast and head.reproduces_forward()
        if head.fast and not reproduces:
            log.warning(
                "%s post-processes its logits in a way lmeval does not know; "
                "using the plain model(...).logits path (slower, more memory).",
                type(model).__name__,
            )
            head.fast = False
        return head

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

    def body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) final hidden states (after the final norm)."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    @torch.inference_mode()
    def reproduces_forward(self) -> bool:
        """Probe: does body + project equal ``model(...).logits`` on a short input?"""
        device = next(self.model.parameters()).device
        vocab = self.model.get_input_embeddings().weight.shape[0]
        ids = (torch.arange(8, device=device) * 7919 % vocab)[None, :]
        mask = torch.ones_like(ids)
        try:
            reference = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            ours = self.project(self.body(ids, mask)).float()
        except Exception as exc:  # any model whose body cannot be called alone
            log.debug("fast head path unavailable: %s", exc)
            return False
        if ours.shape != reference.shape:
            return False
        tolerance = 1e-4 if self.model.dtype == torch.float32 else 2e-2
        scale = reference.abs().max().clamp_min(1.0)
        return bool(((ours - reference).abs().max() / scale) <= tolerance)


