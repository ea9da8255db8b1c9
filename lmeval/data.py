"""Documents: loading them with `datasets`, and tokenizing them with offsets and the BOS policy.

The tokenizer's own special tokens are never added (``add_special_tokens=False``): the one
conditioning token comes from the BOS policy alone, so there is never a double BOS, and
nothing is truncated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import DataError, ModelError

_WORD_SPLIT = re.compile(r"\s+")


@dataclass(frozen=True)
class Document:
    """One text to score. ``doc_id`` is the user's id (or the row number)."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class TokenizedDocument:
    """A document's token ids, their character spans ``[char_start, char_end)`` into
    ``text``, and the conditioning prefix (``[bos_id]`` or ``[]``)."""

    doc_id: str
    text: str
    token_ids: np.ndarray  # (n,) int64
    offsets: np.ndarray  # (n, 2) int64
    prefix: tuple[int, ...]

    @property
    def n_scored(self) -> int:
        """Tokens that get a loss: all of them with a prefix, all but the first without."""
        return max(len(self.token_ids) - 1 + len(self.prefix), 0)

    def scored_text(self) -> str:
        """The text whose tokens are scored: without a prefix, the first token only conditions."""
        if self.prefix or len(self.token_ids) == 0:
            return self.text
        return self.text[int(self.offsets[0, 1]) :]


def count_bytes(text: str) -> int:
    """UTF-8 bytes: the tokenizer-agnostic unit for bits per byte."""
    return len(text.encode("utf-8"))


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity: ``len(re.split(r"\\s+", text))``."""
    return len(_WORD_SPLIT.split(text))


def resolve_prefix(tokenizer, bos) -> tuple[int, ...]:
    """The conditioning prefix for a BOS policy.

    ``"auto"``: the tokenizer's BOS, else its EOS (GPT-2's ``<|endoftext|>``).
    ``"none"``: no prefix; each document's first token only conditions.
    an int: that token id.
    """
    if bos == "none" or bos is None:
        return ()
    if bos == "auto":
        for attr in ("bos_token_id", "eos_token_id"):
            token_id = getattr(tokenizer, attr, None)
            if token_id is not None:
                return (int(token_id),)
        raise ModelError(
            "scoring.bos: `auto` needs a tokenizer with a BOS or EOS token, and this one has "
            "neither. Set `bos` to a token id to condition on, or to `none` to leave each "
            "document's first token unscored."
        )
    if isinstance(bos, bool) or not isinstance(bos, int) or bos < 0:
        raise ModelError(f"scoring.bos: must be auto, none or a token id >= 0 (got {bos!r}).")
    return (bos,)


def tokenize_documents(documents: list[Document], tokenizer, bos="auto") -> list[TokenizedDocument]:
    """Tokenize every document with offsets, in one batched call of the fast tokenizer."""
    prefix = resolve_prefix(tokenizer, bos)
    if not documents:
        return []
    texts = [d.text for d in documents]
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        truncation=False,
        verbose=False,
    )
    out = []
    for doc, ids, offsets in zip(documents, encoded["input_ids"], encoded["offset_mapping"]):
        out.append(
            TokenizedDocument(
                doc_id=doc.doc_id,
                text=doc.text,
                token_ids=np.asarray(ids, dtype=np.int64),
                offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
                prefix=prefix,
            )
        )
    return out


def check_texts(texts) -> list[str]:
    """The public API's input check: a non-empty list of strings."""
    if isinstance(texts, str):
        raise DataError("texts: must be a list of strings (got a single str). Wrap it: [text].")
    texts = list(texts)
    if not texts:
        raise DataError("texts: must hold at least one string (got an empty list).")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{i}]: must be a str (got {type(text).__name__}). Convert or drop it.")
    return texts
