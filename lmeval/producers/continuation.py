"""Score a continuation given its context: the context conditions, and is never scored.

Each ``context + text`` is tokenized as ONE string, with offsets, so the tokens are exactly
those the model would see for the whole string (never two separately tokenized pieces glued
together). The two are joined verbatim, with no separator added, everywhere a context is
taken (``data.context_field``, ``score_texts(contexts=...)``, ``lmeval surprisal --context``,
``lmeval pairs``): the data says where a space goes, so that a continuation may also go on
mid-word. The boundary is the character ``c = len(context)``: the first scored token is
the first whose span ends past ``c``, and every token after it is scored. A token that
STRADDLES the boundary (it starts inside the context and ends inside the text, e.g. 'cats'
for context 'The cat' and text 's sat', or a SentencePiece '▁sat' whose space ends the
context) is scored as part of the continuation, so that no character of the text goes
unscored; its ``crosses_context`` is True and its span is clipped to the text. The BOS
policy's one conditioning token comes first, once.

Windows follow the protocol for the scored range alone (`lmeval.core.continuation`): a
context longer than ``max_length`` keeps its last tokens.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np

from ..core.continuation import range_windows
from ..errors import DataError
from ..model.loading import LoadedModel
from ..model.scorer import ScoreOptions, check_vocabulary, resolve_window, score_windows
from .tables import char_spans, token_strings
from .text import Document, TokenizedDocument, require_whole, tokenize_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Boundary:
    """Where one text starts inside its tokenized ``context + text``."""

    char: int  # len(context)
    first_token: int  # index of the first scored token (len(tokens) if the text has none)
    crosses: bool  # that token starts inside the context


def check_contexts(contexts, n_texts: int) -> list[str]:
    """One string per text (an empty string means no context)."""
    if isinstance(contexts, str):
        raise DataError("contexts: must be a list of strings, one per text (got a single str). Wrap it: [context].")
    contexts = list(contexts)
    if len(contexts) != n_texts:
        raise DataError(f"contexts: must hold one string per text ({n_texts}) (got {len(contexts)}). Pair them up.")
    for i, context in enumerate(contexts):
        if not isinstance(context, str):
            raise DataError(f"contexts[{i}]: must be a str (got {type(context).__name__}). Use '' for no context.")
    return contexts


def find_boundary(offsets: np.ndarray, char: int) -> Boundary:
    """The first token whose span ends past ``char`` starts the scored text."""
    ends = offsets[:, 1] if len(offsets) else np.zeros(0, dtype=np.int64)
    first = int(np.searchsorted(np.maximum.accumulate(ends) if len(ends) else ends, char, side="right"))
    crosses = first < len(offsets) and int(offsets[first, 0]) < char
    return Boundary(char, first, bool(crosses))


def tokenize_continuations(texts: list[str], contexts: list[str] | None, tokenizer, bos):
    """``(docs, boundaries)``: each ``context + text`` tokenized whole, and where its text starts."""
    contexts = [""] * len(texts) if contexts is None else contexts
    docs = tokenize_documents([Document(i, c + t) for i, (c, t) in enumerate(zip(contexts, texts))], tokenizer, bos)
    return docs, [find_boundary(d.offsets, len(c)) if c else Boundary(0, 0, False) for d, c in zip(docs, contexts)]


@dataclass
class ScoredContinuations:
    """The scorer's per-token columns of the scored texts (positions and spans relative to
    each text), and those of the END rows (the output after each text's last token), which
    exist only when an ``end_id`` was scored."""

    columns: dict[str, np.ndarray]
    end: dict[str, np.ndarray] | None
    docs: list[TokenizedDocument]
    boundaries: list[Boundary]


def score_continuations(
    lm: LoadedModel,
    texts: list[str],
    contexts: list[str] | None,
    *,
    bos,
    max_length,
    stride,
    options: ScoreOptions,
    end_id: int | None = None,
    progress=None,
    baseline=None,
) -> ScoredContinuations:
    """Score every text given its context (or alone when ``contexts`` is None)."""
    docs, bounds = tokenize_continuations(texts, contexts, lm.tokenizer, bos)
    length, step = resolve_window(lm, max_length, stride)
    if docs:
        check_vocabulary(lm, max((int(d.token_ids.max()) for d in docs if len(d.token_ids)), default=0))
    # A text of whitespace alone has no rows (no END row either), as `lmeval run` skips such a document.
    windows = [
        w
        for i, (d, b) in enumerate(zip(docs, bounds))
        if texts[i].strip()
        for w in range_windows(
            i, d.token_ids.tolist(), d.prefix, length, step, [(b.first_token, len(d.token_ids))], end_id
        )
    ]
    columns = score_windows(
        lm, windows, options, progress=progress, doc_names=[d.doc_id for d in docs], baseline=baseline
    )
    n_tokens = np.array([len(d.token_ids) for d in docs], dtype=np.int64)
    is_end = columns["position"] == n_tokens[columns["doc_index"]] if docs else np.zeros(0, dtype=bool)
    end = {k: v[is_end] for k, v in columns.items()} if end_id is not None else None
    columns = {k: v[~is_end] for k, v in columns.items()}
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    char = np.array([b.char for b in bounds], dtype=np.int64)[columns["doc_index"]] if docs else np.zeros(0, np.int64)
    first = np.array([b.first_token for b in bounds], dtype=np.int64)[columns["doc_index"]] if docs else char
    columns["crosses_context"] = spans[:, 0] < char
    columns["char_start"] = np.maximum(spans[:, 0] - char, 0)
    columns["char_end"] = np.maximum(spans[:, 1] - char, 0)
    columns["joint_position"] = columns["position"]
    columns["position"] = columns["position"] - first
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    return ScoredContinuations(columns, end, docs, bounds)


def score_context_group(lm, documents, config, options, progress, piece=None, cache=None, baseline=None):
    """`lmeval run` with ``data.context_field``: each document's text scored given its
    context. Returns the part's columns and the scored texts (for bytes and words)."""
    require_whole(piece, documents)
    s = config.scoring
    texts, contexts = [d.text for d in documents], [d.context or "" for d in documents]
    scored = score_continuations(
        lm,
        texts,
        contexts,
        bos=s.bos,
        max_length=s.max_length,
        stride=s.stride,
        options=options,
        progress=progress,
        baseline=baseline,
    )
    columns = scored.columns
    del columns["topk_ids"], columns["topk_probs"]
    crossing = [i for i, (d, b) in enumerate(zip(scored.docs, scored.boundaries)) if straddles(d, b)]
    if crossing and _first_time(config):  # the tokens table has no column for it: say so here, once per run
        i = crossing[0]
        d, b = scored.docs[i], scored.boundaries[i]
        piece = d.text[int(d.offsets[b.first_token, 0]) : int(d.offsets[b.first_token, 1])]
        log.warning(
            "document %r has a token straddling the context boundary (%r: its first characters end the "
            "context); it is scored with the text, as score_texts(contexts=...) flags in crosses_context. "
            "Said once per run: other documents may have one too.",
            documents[i].doc_id,
            piece,
        )
    return columns, texts


def straddles(doc: TokenizedDocument, boundary: Boundary) -> bool:
    """Whether the first scored token takes visible characters from the context. A token that
    takes only the context's trailing whitespace (GPT-2's 'Ġmat' after 'on the ') is the
    ordinary case, flagged in ``crosses_context`` but worth no warning."""
    if not boundary.crosses:
        return False
    start = int(doc.offsets[boundary.first_token, 0])
    return bool(doc.text[start : boundary.char].strip())


# id(config) -> a weak reference to it: the runs already warned (a run's parts share its Config).
_WARNED: dict[int, weakref.ref] = {}


def _first_time(config) -> bool:
    """True once per run (per `Config` object), however many parts and passes it has."""
    key = id(config)
    known = _WARNED.get(key)
    if known is not None and known() is config:
        return False

    def forget(_: weakref.ref) -> None:
        _WARNED.pop(key, None)

    _WARNED[key] = weakref.ref(config, forget)
    return True
