"""A tokenizer's identity: which token ids mean which pieces (no torch)."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (piece -> id): equal exactly when two models share token ids,
    so that per-token comparisons between them are meaningful."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
