"""A tokenizer's identity: which token ids mean which pieces (no torch)."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (piece -> id): equal exactly when two models share token ids,
    so that per-token comparisons between them are meaningful."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def chat_template_fingerprint(tokenizer) -> str | None:
    """sha256 of the tokenizer's chat template (a Jinja string, or a dict of named templates),
    None without one. A conversation's tokens depend on the template as much as on the
    vocabulary: two models that share token ids but render conversations differently (Llama-3
    against Llama-3.1 Instruct) score different token sequences of the same conversation."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    return hashlib.sha256(json.dumps(template, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
