"""Compose the steps: documents -> tokens -> windows -> scores -> tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import Document, TokenizedDocument, check_texts, tokenize_documents
from .errors import DataError
from .report import tokens_frame
from .scoring import LoadedModel, ModelSpec, ScoreOptions, check_vocabulary, load_model, prepare_model, resolve_window, score_windows
from .windows import make_windows


def as_loaded_model(model, name: str | None = None) -> LoadedModel:
    """Accept a path or hub id, a `ModelSpec`, a ``(model, tokenizer)`` pair or a `LoadedModel`."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(ModelSpec(path=str(model), name=name))
    if isinstance(model, ModelSpec):
        return load_model(model)
    if isinstance(model, tuple) and len(model) == 2:
        return prepare_model(model[0], model[1], name=name or type(model[0]).__name__)
    raise DataError(
        f"model: must be a path, a hub id or a (model, tokenizer) pair (got {type(model).__name__})."
    )


def check_batch_tokens(batch_tokens) -> int:
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise DataError(
            f"scoring.batch_tokens: must be an integer >= 1 (got {batch_tokens!r}). "
            "It is the token budget of one batch, e.g. 16384."
        )
    return batch_tokens


def score_documents(
    lm: LoadedModel,
    docs: list[TokenizedDocument],
    max_length: int | None,
    stride: int | None,
    options: ScoreOptions,
    progress=None,
) -> dict[str, np.ndarray]:
    """Window every document and score the windows; columns carry ``doc_index`` into ``docs``."""
    length, step = resolve_window(lm, max_length, stride)
    if docs:
        check_vocabulary(lm, max((int(d.token_ids.max()) for d in docs if len(d.token_ids)), default=0))
    windows = [w for i, d in enumerate(docs) for w in make_windows(i, d.token_ids.tolist(), d.prefix, length, step)]
    return score_windows(lm, windows, options, progress=progress)


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
) -> pd.DataFrame:
    """Score each text with a causal LM; return one row per scored token.

    ``model`` is a local path, a hub id, or an already loaded ``(model, tokenizer)`` pair.
    ``doc_id`` is the text's index in ``texts``. Columns (``nll`` in nats, ``surprisal_bits``
    in bits): model, doc_id, position, token_id, token, char_start, char_end, context_len,
    nll, surprisal_bits, entropy, max_prob, is_top1, rank, sum_q2, mean_neg_logq, and with
    ``top_k`` > 0 also topk_token_ids, topk_probs. An empty text yields no rows; the frame's
    ``attrs["n_documents"]`` still counts it.
    """
    texts = check_texts(texts)
    options = ScoreOptions(batch_tokens=check_batch_tokens(batch_tokens), top_k=top_k, temperatures=tuple(temperatures))
    lm = as_loaded_model(model, name)
    docs = tokenize_documents([Document(i, t) for i, t in enumerate(texts)], lm.tokenizer, bos)
    columns = score_documents(lm, docs, max_length, stride, options)
    frame = tokens_frame(lm.name, docs, columns, lm.tokenizer)
    frame.attrs["n_documents"] = len(texts)
    frame.attrs["n_empty"] = sum(d.n_scored == 0 for d in docs)
    return frame
