"""Score texts held in memory: the public `score_texts`, and the step `lmeval run` shares with it.

``model`` may be anything `as_loaded_model` accepts; a `LoadedModel` from `load_model` is
reused as it is (no reload, no second probe), and a ``(model, tokenizer)`` pair is scored in
eval mode and handed back in the train/eval mode it came in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.windows import make_windows
from ..errors import DataError
from ..model.loading import LoadedModel, load_model, prepare_model
from ..model.scorer import ScoreOptions, check_vocabulary, resolve_window, score_windows
from ..model.spec import ModelSpec
from .data import Document, TokenizedDocument, check_texts, join_documents, split_stream, tokenize_documents
from .tables import char_spans, token_strings, tokens_frame


def as_loaded_model(model, name: str | None = None) -> LoadedModel:
    """Accept a path or hub id, a `ModelSpec`, a ``(model, tokenizer)`` pair or a `LoadedModel`."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path, ModelSpec)):
        return load_model(model, **({"name": name} if name else {}))
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
    return score_windows(lm, windows, options, progress=progress, doc_names=[d.doc_id for d in docs])


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
) -> pd.DataFrame:
    """Score each text with a causal LM; return one row per scored token.

    ``model`` is a local path, a hub id, or an already loaded ``(model, tokenizer)`` pair.
    ``doc_id`` is the text's index in ``texts``. Columns (``nll`` in nats, ``surprisal_bits``
    in bits): model, doc_id, position, token_id, token, char_start, char_end, context_len,
    nll, surprisal_bits, entropy, max_prob, is_top1, rank, sum_q2, mean_neg_logq, and with
    ``top_k`` > 0 also topk_token_ids, topk_probs. An empty text yields no rows; the frame's
    ``attrs["n_documents"]`` still counts it; ``attrs`` also record the load-time probes'
    findings (``causal``, ``allow_noncausal``, ``batching``). ``compile`` fuses the per-token reductions with
    torch.compile (``"auto"``: on CUDA, or when tokens x vocabulary >= 4e9 on CPU).
    """
    texts = check_texts(texts)
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(batch_tokens), top_k=top_k, temperatures=tuple(temperatures), compile=compile
    )
    lm = as_loaded_model(model, name)
    docs = tokenize_documents([Document(i, t) for i, t in enumerate(texts)], lm.tokenizer, bos)
    columns = score_documents(lm, docs, max_length, stride, options)
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    frame = tokens_frame(lm.name, [d.doc_id for d in docs], columns)
    frame.attrs["n_documents"] = len(texts)
    frame.attrs["n_empty"] = sum(d.n_scored == 0 for d in docs)
    frame.attrs.update(lm.probes.protocol())  # causal, allow_noncausal, batching
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


def score_group(lm, documents: list[Document], config, options, progress):
    """Score documents independently; columns' ``doc_index`` indexes ``documents``."""
    docs = tokenize_documents(documents, lm.tokenizer, config.scoring.bos)
    columns = score_documents(lm, docs, config.scoring.max_length, config.scoring.stride, options, progress)
    return finish_columns(lm, columns, docs), [d.scored_text() for d in docs]


def score_stream(lm, documents: list[Document], config, options, progress):
    """Score documents joined into one stream; ``doc_index`` D marks separator tokens."""
    stream = join_documents(documents, config.scoring.separator)
    (doc,) = tokenize_documents([stream.document], lm.tokenizer, config.scoring.bos)
    columns = finish_columns(lm, score_documents(lm, [doc], config.scoring.max_length, config.scoring.stride, options, progress), [doc])
    index, start, end, position = split_stream(stream, columns["char_start"], columns["char_end"])
    columns.update(doc_index=index, char_start=start, char_end=end, position=position)
    texts = [d.text for d in documents]
    if not doc.prefix and len(doc.token_ids):  # the stream's first token only conditions
        texts[0] = texts[0][int(doc.offsets[0, 1]) :]
    return columns, texts + [config.scoring.separator * (len(texts) - 1)]
