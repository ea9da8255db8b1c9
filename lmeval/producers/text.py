"""Texts as the producers see them: documents, their tokenization with offsets and the BOS
policy, the normalisers' counts, and the joined stream of concatenated scoring.

The tokenizer's own special tokens are never added (``add_special_tokens=False``): the one
conditioning token comes from the BOS policy alone, so there is never a double BOS, and
nothing is truncated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from ..errors import DataError, ModelError

_WORD_SPLIT = re.compile(r"\s+")
ROLES_SCORED = "assistant"  # the role whose turns a conversation scores
# The roles a conversation may hold: what chat templates are written for. Another name (a typo,
# 'robot') renders as whatever a template does with an unknown role, often silently nothing.
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Document:
    """One text to score. ``doc_id`` is the user's id (or the row number)."""

    doc_id: str | int
    text: str
    source: str | None = None  # the text before `data.detokenizer` rewrote it (None: not rewritten)
    context: str | None = None  # conditions the text, never scored (data.context_field)


def check_messages(messages, where: str) -> list[dict]:
    """A list of ``{"role": str, "content": str}`` mappings with at least one assistant turn."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: must be a list of {{role, content}} messages (got a string that is not JSON)."
            ) from None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(
            f"{where}: must be a non-empty list of {{role, content}} messages (got {type(messages).__name__})."
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}]: must be a mapping with string `role` and `content` (got {m!r}).")
        if m["role"] not in KNOWN_ROLES:
            raise DataError(
                f"{where}[{i}]: role must be one of {', '.join(KNOWN_ROLES)} (got {m['role']!r}). "
                "Rename that role; a chat template may render a role it does not know as nothing."
            )
        if m["role"] == ROLES_SCORED and not m["content"].strip():
            raise DataError(
                f"{where}[{i}]: an assistant turn must have content (got {m['content']!r}): only its "
                "end-of-turn token would be scored. Drop that turn, or the conversation."
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == ROLES_SCORED for m in out):
        raise DataError(
            f"{where}: must hold at least one assistant message (roles: {sorted({m['role'] for m in out})}). Nothing to score."
        )
    return out


@dataclass(frozen=True)
class TokenizedDocument:
    """A document's token ids, their character spans ``[char_start, char_end)`` into
    ``text``, and the conditioning prefix (``[bos_id]`` or ``[]``)."""

    doc_id: str | int  # as the Document has it: the API's texts are numbered
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
    ``"eos"``: the tokenizer's EOS, even where it has a BOS (OLMo-Eval / catwalk's prefix token).
    ``"none"``: no prefix; each document's first token only conditions.
    ``"tokenizer"``: what ``tokenizer(text)`` puts before the text's tokens (Llama's BOS,
    nothing for GPT-2): the GPTQ and llama.cpp presets' rule, the one exception to never
    letting the tokenizer add its own special tokens.
    an int: that token id.
    """
    if bos == "none" or bos is None:
        return ()
    if bos == "tokenizer":
        return tokenizer_prefix(tokenizer)
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
    if bos == "eos":
        token_id = getattr(tokenizer, "eos_token_id", None)
        if token_id is None:
            raise ModelError(
                "scoring.bos: `eos` needs a tokenizer with an EOS token, and this one has none. "
                "Set `bos` to auto or to a token id to condition on."
            )
        return (int(token_id),)
    if isinstance(bos, bool) or not isinstance(bos, int) or bos < 0:
        raise ModelError(f"scoring.bos: must be auto, eos, none or a token id >= 0 (got {bos!r}).")
    size = len(tokenizer)
    if bos >= size:
        named = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelError(
            f"scoring.bos: a token id must be in the vocabulary of the tokenizer {named} (0..{size - 1}) (got {bos}). "
            "Use auto (its BOS, else EOS), none, or an id it has."
        )
    return (bos,)


def tokenizer_prefix(tokenizer) -> tuple[int, ...]:
    """The ids ``tokenizer(text)`` adds before a text's own tokens (at most one is allowed)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    n = len(special) - len(plain)
    lead = tuple(int(i) for i in special[: special.index(plain[0])]) if n > 0 and plain else ()
    if len(lead) > 1:
        named = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelError(
            f"scoring.bos: `tokenizer` takes the one id the tokenizer {named} puts before a text, and it puts "
            f"{len(lead)} ({list(lead)}). Set `bos` to the id to condition on instead."
        )
    return lead


# Characters per batched call of the tokenizer. Its output is Python lists (an int per id, a
# tuple per offset) until converted to arrays: tokenizing a part of 262,144 characters (106k
# tokens) in one call raised the resident set by 31 MB, beside scoring; calls of this size, by
# 7 MB, the arrays kept included, at the same speed (the fast tokenizer's work is per text).
TOKENIZE_CHARS = 32768


def tokenize_documents(documents: list[Document], tokenizer, bos="auto") -> list[TokenizedDocument]:
    """Tokenize every document with offsets, in batched calls of the fast tokenizer."""
    prefix = resolve_prefix(tokenizer, bos)
    out: list[TokenizedDocument] = []
    start = 0
    while start < len(documents):
        stop, chars = start + 1, len(documents[start].text)
        while stop < len(documents) and chars + len(documents[stop].text) <= TOKENIZE_CHARS:
            chars += len(documents[stop].text)
            stop += 1
        out.extend(_tokenize_batch(documents[start:stop], tokenizer, prefix))
        start = stop
    return out


def _tokenize_batch(documents: list[Document], tokenizer, prefix: tuple[int, ...]) -> list[TokenizedDocument]:
    encoded = tokenizer(
        [d.text for d in documents],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        truncation=False,
        verbose=False,
    )
    out = []
    for doc, ids, offsets in zip(documents, encoded["input_ids"], encoded["offset_mapping"]):
        if not ids and doc.text.strip():
            _refuse_tokenless(doc, tokenizer)
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


def _refuse_tokenless(doc: Document, tokenizer) -> None:
    """A text with visible characters that the tokenizer turns into no token would count its
    bytes and words with no loss (a perfect score): refuse it by name."""
    named = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise DataError(
        f"document {doc.doc_id!r}: a non-empty text must tokenize to at least one token, and the tokenizer "
        f"{named} gives none for it (got {doc.text[:40]!r}{'...' if len(doc.text) > 40 else ''}): its vocabulary "
        "covers none of these characters and it has no unknown token. Use the model's own tokenizer, or drop "
        "that document."
    )


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


SEPARATOR_ID = "<separator>"


@dataclass(frozen=True)
class Stream:
    """Documents joined into one text for concatenated scoring, with each document's span."""

    document: Document
    starts: np.ndarray  # (D,) char offset of each document in the joined text
    ends: np.ndarray  # (D,)


def join_documents(documents: list[Document], separator: str) -> Stream:
    """Join documents with ``separator`` into one stream, as papers score wikitext."""
    starts, ends, cursor = [], [], 0
    for i, doc in enumerate(documents):
        if i:
            cursor += len(separator)
        starts.append(cursor)
        cursor += len(doc.text)
        ends.append(cursor)
    text = separator.join(d.text for d in documents)
    return Stream(Document("<stream>", text), np.array(starts, np.int64), np.array(ends, np.int64))


def split_stream(stream: Stream, char_start: np.ndarray, char_end: np.ndarray):
    """Give each stream token back to the document its first character comes from.

    Returns ``(doc_index, char_start, char_end, position)`` per token: tokens in a separator
    go to index ``D`` (reported as `SEPARATOR_ID`); spans become relative to the document;
    ``position`` counts tokens within their document (or the separator group).
    """
    n_docs = len(stream.starts)
    # A token belongs to the last document starting at or before its first character...
    doc = np.searchsorted(stream.starts, char_start, side="right") - 1
    # ...unless that character lies past the document's end, i.e. in a separator.
    inside = (doc >= 0) & (char_start < stream.ends[np.clip(doc, 0, None)])
    doc_index = np.where(inside, doc, n_docs)
    base = np.where(inside, stream.starts[np.clip(doc, 0, None)], 0)
    position = np.zeros(len(doc_index), dtype=np.int64)
    order = np.argsort(doc_index, kind="stable")
    sorted_docs = doc_index[order]
    first = np.searchsorted(sorted_docs, sorted_docs, side="left")
    position[order] = np.arange(len(order)) - first
    return doc_index, char_start - base, char_end - base, position


def require_whole(piece, documents, needs: str = "data.context_field or data.messages_field") -> None:
    """Modes that need each document in one part (contexts, chat turns, membership scores)."""
    if piece is not None and piece.n_pieces > 1:
        raise DataError(
            f"document {documents[0].doc_id!r}: with {needs} a document must fit in one part "
            f"(got {piece.n_chars} characters > output.part_chars). Raise output.part_chars above it."
        )
