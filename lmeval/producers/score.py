"""Score texts held in memory: the public `score_texts`, and the step `lmeval run` shares with it.

``model`` may be anything `as_loaded_model` accepts; a `LoadedModel` from `load_model` is
reused as it is (no reload, no second probe), and a ``(model, tokenizer)`` pair is scored in
eval mode and handed back in the train/eval mode it came in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.continuation import range_windows
from ..core.windows import Chunks, make_chunk_windows, make_windows
from ..errors import ConfigError, DataError
from ..model.loading import LoadedModel, load_model, prepare_model
from ..model.lockstep import score_windows_lockstep
from ..model.scorer import ScoreOptions, check_vocabulary, resolve_window, score_windows
from ..model.spec import ModelSpec
from .continuation import check_contexts, score_continuations
from .tables import char_spans, token_strings, tokens_frame
from .text import (
    Document,
    TokenizedDocument,
    check_texts,
    join_documents,
    resolve_prefix,
    split_stream,
    tokenize_documents,
)
from .words import run_end_id, split_end_rows


def as_loaded_model(model, name: str | None = None) -> LoadedModel:
    """Accept a path or hub id, a `ModelSpec`, a ``(model, tokenizer)`` pair or a `LoadedModel`."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path, ModelSpec)):
        return load_model(model, name=name or "")
    if isinstance(model, tuple) and len(model) == 2:
        return prepare_model(model[0], model[1], name=name or type(model[0]).__name__)
    raise DataError(f"model: must be a path, a hub id or a (model, tokenizer) pair (got {type(model).__name__}).")


def check_batch_tokens(batch_tokens) -> int:
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise DataError(
            f"scoring.batch_tokens: must be an integer >= 1 (got {batch_tokens!r}). "
            "It is the token budget of one batch, e.g. 16384."
        )
    return batch_tokens


def document_windows(
    lm: LoadedModel,
    docs: list[TokenizedDocument],
    max_length: int | None,
    stride: int | None,
    baseline: LoadedModel | None = None,
    chunks: Chunks | None = None,
    end_id: int | None = None,
):
    """Every window of every document under the protocol (rolling windows, or ``chunks``);
    ``doc_id`` indexes ``docs``. With ``end_id``, also each document's END position (one more
    target after its last token, `lmeval.core.continuation`), for word masses."""
    length, step = resolve_window(lm, max_length, None if chunks is not None else stride)
    if docs:
        top = int(np.concatenate([d.token_ids for d in docs] + [np.zeros(1, np.int64)]).max())
        for model in (lm, baseline) if baseline is not None else (lm,):
            check_vocabulary(model, top)
    if chunks is not None:
        try:
            return [
                w
                for i, d in enumerate(docs)
                for w in make_chunk_windows(i, d.token_ids.tolist(), d.prefix, length, chunks)
            ]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if end_id is not None:  # the same windows (range_windows of every token is make_windows), plus END
        return [
            w
            for i, d in enumerate(docs)
            for w in range_windows(i, d.token_ids.tolist(), d.prefix, length, step, None, end_id)
        ]
    return [w for i, d in enumerate(docs) for w in make_windows(i, d.token_ids.tolist(), d.prefix, length, step)]


def chunks_of(lm: LoadedModel, scoring) -> Chunks | None:
    """The `Chunks` of ``scoring.windows: chunks`` (None for rolling windows); ``chunk_bos``
    puts the BOS prefix first in each chunk when there is one (llama.cpp: when the
    tokenizer adds a BOS)."""
    if getattr(scoring, "windows", "rolling") != "chunks":
        return None
    prefix = resolve_prefix(lm.tokenizer, scoring.bos) if scoring.chunk_bos else ()
    return Chunks(context=scoring.chunk_context, bos=prefix[0] if prefix else None)


def score_documents(
    lm: LoadedModel,
    docs: list[TokenizedDocument],
    max_length: int | None,
    stride: int | None,
    options: ScoreOptions,
    progress=None,
    piece=None,
    baseline: LoadedModel | None = None,
    chunks: Chunks | None = None,
    variants: tuple = (),
    end_id: int | None = None,
):
    """Window every document and score the windows; columns carry ``doc_index`` into ``docs``
    (with ``variants``, a list: ``lm``'s columns, then each variant's against ``lm``).

    ``piece`` (a `PartPlan` of one document or stream) keeps only the windows it owns, by
    the character offset of each window's first scored token (an END window of its own goes
    with the window before it, which scores the document's last token)."""
    windows = document_windows(lm, docs, max_length, stride, baseline, chunks, end_id)
    if piece is not None and piece.n_pieces > 1:
        windows = [w for w, char in zip(windows, _owner_chars(windows, docs)) if piece.owns(char)]
    names = [d.doc_id for d in docs]
    if variants:  # lockstep: ``lm`` is the baseline; [its columns, then each variant's]
        return score_windows_lockstep(lm, list(variants), windows, options, progress, names)
    return score_windows(lm, windows, options, progress=progress, doc_names=names, baseline=baseline)


def _owner_chars(windows, docs: list[TokenizedDocument]) -> list[int]:
    """The character offset that decides each window's piece: its first scored token's; an
    END window of its own (its only position is the document's length) takes the previous
    window's, so that the END row lands in the part holding the document's last token."""
    chars, previous = [], 0
    for w in windows:
        doc = docs[w.doc_id]
        if w.positions[0] < len(doc.token_ids):
            previous = int(doc.offsets[w.positions[0], 0])
        chars.append(previous)
    return chars


def score_texts(
    texts,
    model,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos="auto",
    batch_tokens: int = 16384,
    top_k: int = 0,
    temperatures: tuple[float, ...] = (),
    name: str | None = None,
    compile: str | bool = "auto",
    contexts=None,
) -> pd.DataFrame:
    """Score each text with a causal LM; return one row per scored token.

    ``model`` is a local path, a hub id, or an already loaded ``(model, tokenizer)`` pair.
    ``doc_id`` is the text's index in ``texts``. Columns (``nll`` in nats, ``surprisal_bits``
    in bits): model, doc_id, position, token_id, token, char_start, char_end, context_len,
    nll, surprisal_bits, entropy, max_prob, is_top1, rank, sum_q2, mean_neg_logq, and with
    ``top_k`` > 0 also topk_token_ids, topk_probs. An empty or whitespace-only text yields no
    rows, as `lmeval run` skips such a document; the frame's ``attrs["n_documents"]`` still
    counts it and ``attrs["n_empty"]`` counts the texts with no row, ``attrs["reductions"]`` says how the per-token
    reductions ran (``"compiled"``, ``"kernel"``: the CPU kernel of `core.kernels`, or ``"eager"``), and ``attrs``
    also record the load-time probes' findings (``causal``, ``allow_noncausal``, ``batching``). ``compile`` fuses the
    per-token reductions with torch.compile (``"auto"``: on CUDA, or on CPU without the kernel when tokens x vocabulary
    >= 2.5e9).

    ``contexts`` (one string per text) scores each text GIVEN its context: ``context +
    text`` is tokenized as one string, the context's tokens condition and get no row, and
    positions and character spans are relative to the text. A token straddling the boundary
    is scored with the text and flagged in the extra column ``crosses_context``; see
    `lmeval.producers.continuation`.
    """
    texts = check_texts(texts)
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(batch_tokens), top_k=top_k, temperatures=tuple(temperatures), compile=compile
    )
    lm = as_loaded_model(model, name)
    if contexts is not None:
        return _score_given_contexts(lm, texts, check_contexts(contexts, len(texts)), max_length, stride, bos, options)
    # A text of whitespace alone is not scored (no rows), as `lmeval run` skips such a document.
    docs = tokenize_documents([Document(i, t if t.strip() else "") for i, t in enumerate(texts)], lm.tokenizer, bos)
    calls = dict(lm.workspace.calls)
    columns = score_documents(lm, docs, max_length, stride, options)
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    frame = tokens_frame(lm.name, [d.doc_id for d in docs], columns)
    frame.attrs["n_documents"] = len(texts)
    frame.attrs["n_empty"] = sum(d.n_scored == 0 for d in docs)
    frame.attrs["reductions"] = lm.workspace.mode_since(calls)  # "compiled", "kernel", "eager", "mixed" or "none"
    frame.attrs.update(lm.probes.protocol())  # causal, allow_noncausal, batching
    return frame


def _score_given_contexts(lm, texts, contexts, max_length, stride, bos, options) -> pd.DataFrame:
    scored = score_continuations(lm, texts, contexts, bos=bos, max_length=max_length, stride=stride, options=options)
    frame = tokens_frame(lm.name, list(range(len(texts))), scored.columns)
    order = np.lexsort((scored.columns["position"], scored.columns["doc_index"]))
    frame["crosses_context"] = scored.columns["crosses_context"][order]
    frame.attrs.update(
        n_documents=len(texts),
        n_empty=len(texts) - frame["doc_id"].nunique(),
        n_crossing=int(frame["crosses_context"].sum()),
    )
    return frame


# --------------------------------------------------------------------------------------
# The scoring step of `lmeval run`: a group of documents -> per-token columns
# --------------------------------------------------------------------------------------


def finish_columns(lm, columns: dict, docs: list[TokenizedDocument]) -> dict:
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    del columns["topk_ids"], columns["topk_probs"]
    return columns


def score_group(
    lm,
    documents: list[Document],
    config,
    options,
    progress,
    piece=None,
    cache=None,
    docs=None,
    baseline=None,
    variants: tuple = (),
):
    """Score documents independently; columns' ``doc_index`` indexes ``documents``. For a
    piece, only its windows are scored and only piece 0 counts the documents' bytes and words
    (so the pieces of a document add up to it once). ``docs`` are the documents already
    tokenized (a run does it in the background)."""
    docs = _tokenized(cache, documents, lambda: tokenize_documents(documents, lm.tokenizer, config.scoring.bos), docs)
    s = config.scoring
    chunks = chunks_of(lm, s)
    end_id = run_end_id(options) if not variants and chunks is None else None  # analysis.words
    columns = score_documents(
        lm, docs, s.max_length, s.stride, options, progress, piece, baseline, chunks, variants, end_id
    )
    if end_id is not None:  # the END rows leave their masses on each document's last token
        columns = split_end_rows(columns, np.array([len(d.token_ids) for d in docs]), options.mass_masks)
    if chunks is not None:  # no byte or word count matches chunks' scored tokens: NaN normalisers
        texts = ["" for _ in documents]
    elif getattr(config.data, "count_on", "scored") == "source":  # lm-eval's wikitext: the text before detokenizing
        texts = [d.text if d.source is None else d.source for d in documents]
    else:
        texts = [d.scored_text() for d in docs]
    if variants:  # lockstep: each model's columns, the baseline's first
        return [finish_columns(m, c, docs) for m, c in zip((lm, *variants), columns)], _counted(texts, piece)
    return finish_columns(lm, columns, docs), _counted(texts, piece)


def score_stream(
    lm, documents: list[Document], config, options, progress, piece=None, cache=None, baseline=None, variants=()
):
    """Score documents joined into one stream; ``doc_index`` D marks separator tokens (with
    ``variants``, a list of columns: ``lm``'s, then each variant's against it)."""
    stream = join_documents(documents, config.scoring.separator)
    (doc,) = _tokenized(
        cache, documents, lambda: tokenize_documents([stream.document], lm.tokenizer, config.scoring.bos)
    )
    s = config.scoring
    chunks = chunks_of(lm, s)
    scored = score_documents(lm, [doc], s.max_length, s.stride, options, progress, piece, baseline, chunks, variants)
    models = (lm, *variants) if variants else (lm,)
    each = [finish_columns(m, c, [doc]) for m, c in zip(models, scored if variants else [scored])]
    for one in each:
        index, start, end, position = split_stream(stream, one["char_start"], one["char_end"])
        one.update(doc_index=index, char_start=start, char_end=end, position=position)
    count_on = getattr(config.data, "count_on", "scored")
    texts = [d.text if d.source is None or count_on == "scored" else d.source for d in documents]
    if not doc.prefix and len(doc.token_ids):  # the stream's first token only conditions
        texts[0] = texts[0][int(doc.offsets[0, 1]) :]
    counted = texts + [config.scoring.separator * (len(texts) - 1)]
    if chunks is not None:  # a dropped remainder and unscored chunk heads: no byte or word count fits (NaN)
        counted = ["" for _ in counted]
    return (each if variants else each[0]), _counted(counted, piece)


def _tokenized(cache: dict | None, documents: list[Document], tokenize, ready=None):
    """Tokenize once for all pieces of a document: ``cache`` keeps the latest documents'
    tokens; ``ready`` are tokens computed ahead (kept for the pieces that follow)."""
    if cache is None:
        return tokenize() if ready is None else ready
    key = tuple(id(d) for d in documents)
    if ready is not None or cache.get("key") != key:
        cache.clear()
        cache.update(key=key, value=tokenize() if ready is None else ready)
    return cache["value"]


def _counted(texts: list[str], piece) -> list[str]:
    """The texts whose bytes and words this part counts: all of them, except in pieces past the first."""
    return texts if piece is None or piece.piece == 0 else ["" for _ in texts]
