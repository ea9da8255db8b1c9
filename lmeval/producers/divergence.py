"""How far has a checkpoint's next-token distribution moved from its base, and where?

Comparing perplexities says whether a model is better; quantizing, pruning, distilling or
fine-tuning asks how far each prediction moved. Per scored token (nats, see
`lmeval.core.divergence`): ``kl`` = KL(P_base || P_model), ``kl_reverse``, ``delta_p`` =
q_y - p_y, ``same_top1``, ``nll``, ``nll_baseline``, ``acceptance``, ``topk_overlap`` and
``kl_topk``; both models' logits meet a chunk at
a time (`lmeval.model.pair_scorer`) and no distribution is stored.

The summary pools tokens as the rest of lmeval does: means are sums over all tokens divided
once (never a mean of per-document means), percentiles are over all tokens, and every mean
gets a paired document-bootstrap 95% interval: documents, not tokens, are resampled (tokens
of one document share its topic and style), and both models' numbers of a resampled
document travel together, since they are computed on the same tokens.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd

from ..analyses.divergence import DIVERGENCE_COLUMNS, pair_frame  # noqa: F401  (DIVERGENCE_COLUMNS: re-exported)
from ..core.divergence import KL_TOP_K, OVERLAP_K
from ..engine.config import ScoringConfig
from ..errors import ConfigError, ModelError
from ..model.fingerprint import tokenizer_fingerprint
from ..model.lockstep import score_windows_lockstep
from ..model.scorer import CACHE_COLUMNS, ScoreOptions, resolve_window, score_windows
from .score import as_loaded_model, check_batch_tokens, document_windows, finish_columns, score_group, score_stream
from .text import Document, check_texts, tokenize_documents


class TokenizerMismatchError(ModelError):
    """Divergence needs one vocabulary: the two models' tokenizers differ. ``names`` and
    ``fingerprints`` are the (model, baseline) pair's; `mismatch_message` words it for a caller."""

    def __init__(self, message: str, names: tuple = (), fingerprints: tuple = ()):
        super().__init__(message)
        self.names, self.fingerprints = names, fingerprints


# What each caller changes to compare two models with different tokenizers.
MISMATCH_FIXES = {
    "compare.divergence": "compare these models in bits_per_byte instead (`compare:` without `divergence: true`, "
    "or `lmeval compare`)",
    "divergence": "compare these models in bits_per_byte instead (`lmeval.run` of both models, without "
    "compare.divergence)",
    "--baseline": "give a --baseline with the same tokenizer, or compare these models in bits_per_byte instead "
    "(`lmeval run --model A --model B --data FILE`)",
}


def mismatch_message(names: tuple, fingerprints: tuple, where: str) -> str:
    """The refusal of a pair with different tokenizers, for the caller ``where`` (`MISMATCH_FIXES`)."""
    (model, base), (mine, theirs) = names, fingerprints
    return (
        f"{where}: model {model} must share the baseline {base}'s tokenizer (got sha256 {mine[:12]}… vs "
        f"{theirs[:12]}…). Divergence compares two distributions over the same tokens, so it needs identical "
        f"tokenizers; {MISMATCH_FIXES[where]}."
    )


def check_same_tokenizer(lm, baseline, where: str = "compare.divergence") -> None:
    """Refuse a pair whose tokenizers differ (sha256 of the vocabulary, as run.json records it);
    ``where`` names the caller's setting in the message (`MISMATCH_FIXES`)."""
    mine, theirs = tokenizer_fingerprint(lm.tokenizer), tokenizer_fingerprint(baseline.tokenizer)
    if mine != theirs:
        names, fingerprints = (lm.name, baseline.name), (mine, theirs)
        raise TokenizerMismatchError(mismatch_message(names, fingerprints, where), names, fingerprints)


def resolve_pair_window(lm, baseline, max_length, stride) -> tuple[int, int]:
    """The one (L, S) both models are scored with; refuses a pair whose defaults differ."""
    mine, theirs = resolve_window(lm, max_length, stride), resolve_window(baseline, max_length, stride)
    if mine != theirs:
        raise ModelError(
            f"scoring.max_length: model {lm.name} and the baseline {baseline.name} must be scored with the same "
            f"windows for divergence (got max_length, stride {mine} vs {theirs} from their context sizes). "
            "Set `scoring.max_length` (and `stride`) explicitly."
        )
    return mine


# --------------------------------------------------------------------------------------
# Scoring documents with a pair
# --------------------------------------------------------------------------------------


def score_pair_documents(
    lm,
    baseline,
    documents: list[Document],
    scoring: ScoringConfig,
    progress=None,
    where: str = "compare.divergence",
    overlap_k: int = OVERLAP_K,
    kl_top_k: int = KL_TOP_K,
) -> dict:
    """Per-token divergence columns of ``documents`` (scored independently, or joined into one
    stream under ``scoring.documents: concatenated``); ``doc_index`` indexes ``documents``,
    and in a stream index ``len(documents)`` marks separator tokens."""
    check_same_tokenizer(lm, baseline, where)
    resolve_pair_window(lm, baseline, scoring.max_length, scoring.stride)
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(scoring.batch_tokens), overlap_k=overlap_k, kl_top_k=kl_top_k
    )
    produce = score_stream if scoring.documents == "concatenated" else score_group
    # The same producers as every other entry point, with the baseline beside the model.
    columns, _ = produce(
        lm, documents, SimpleNamespace(scoring=scoring, data=None), options, progress, baseline=baseline
    )
    return columns


def divergence(
    texts,
    model,
    baseline,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos="auto",
    batch_tokens: int = 16384,
    name: str | None = None,
    baseline_name: str | None = None,
    overlap_k: int = OVERLAP_K,
    kl_top_k: int = KL_TOP_K,
    baseline_cache: str = "none",
) -> pd.DataFrame:
    """Per-token divergence of ``model`` from ``baseline`` on each text, one row per scored token.

    ``baseline_cache="topk"`` scores the baseline first and keeps, per token, only its
    ``kl_top_k`` likeliest ids with their log-probabilities, the log of the rest's mass and
    its nll; the model is then scored alone against that (the two never share memory). ``kl``
    and ``kl_reverse`` are then LOWER bounds and ``acceptance`` an UPPER bound
    (`lmeval.core.divergence.cached_divergence_statistics`); the other columns are exact.

    ``model`` and ``baseline`` are anything `score_texts` takes (a path, a hub id, a
    ``(model, tokenizer)`` pair or a `LoadedModel`) and must share one tokenizer. ``model``
    may also be a list of them, variants of one base: they are scored in lockstep (the
    baseline's body once per batch, its head once per chunk, for all of them) and the table
    holds each variant's rows in list order. They must share one tokenizer
    (`TokenizerMismatchError` otherwise). ``doc_id`` is the text's index. Columns
    (`DIVERGENCE_COLUMNS`, all in nats): ``kl`` = KL(P_baseline || P_model), ``kl_reverse`` =
    KL(P_model || P_baseline), ``delta_p`` = q_y - p_y (the true token's probability under
    the model minus under the baseline), ``same_top1`` (both argmaxes equal), ``nll`` (the
    model's), ``nll_baseline``, ``acceptance`` = sum_v min(p_v, q_v), ``topk_overlap`` (the
    share of the baseline's ``overlap_k`` likeliest tokens among the model's) and ``kl_topk``
    (KL over the baseline's ``kl_top_k`` likeliest tokens, both renormalised), beside the token's id, piece, character span and context
    length. `divergence_summary` pools the table with document-bootstrap intervals.
    """
    texts = check_texts(texts)
    scoring = ScoringConfig(
        max_length=max_length, stride=stride, bos=bos, batch_tokens=check_batch_tokens(batch_tokens)
    )
    if overlap_k < 1 or kl_top_k < 1:
        raise ConfigError(f"divergence: overlap_k and kl_top_k must be >= 1 (got {overlap_k}, {kl_top_k}).")
    base = as_loaded_model(baseline, baseline_name)
    documents = [Document(i, t) for i, t in enumerate(texts)]
    if baseline_cache not in ("none", "topk"):
        raise ConfigError(f"divergence: baseline_cache must be none or topk (got {baseline_cache!r}).")
    if baseline_cache == "topk":
        lm = as_loaded_model(model, name)
        columns = score_cached_documents(lm, base, documents, scoring, overlap_k, kl_top_k)
        frame = pair_frame(lm.name, base.name, list(range(len(texts))), columns)
    elif isinstance(model, list):  # several variants of one base: in lockstep, the base scored once
        variants = [as_loaded_model(m, name if len(model) == 1 else None) for m in model]
        frames = score_lockstep_documents(variants, base, documents, scoring, overlap_k, kl_top_k)
        frame = pd.concat(frames, ignore_index=True)
    else:
        lm = as_loaded_model(model, name)
        columns = score_pair_documents(lm, base, documents, scoring, None, "divergence", overlap_k, kl_top_k)
        frame = pair_frame(lm.name, base.name, list(range(len(texts))), columns)
    frame.attrs["n_documents"] = len(texts)
    return frame


def score_cached_documents(
    lm, baseline, documents: list[Document], scoring: ScoringConfig, overlap_k: int, kl_top_k: int
) -> dict:
    """The pair's columns with the baseline scored first and kept as its top-``kl_top_k``
    (``baseline_cache: topk``): the two models are never in one batch."""
    check_same_tokenizer(lm, baseline, "divergence")
    resolve_pair_window(lm, baseline, scoring.max_length, scoring.stride)
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(scoring.batch_tokens), overlap_k=overlap_k, kl_top_k=kl_top_k
    )
    docs = tokenize_documents(documents, baseline.tokenizer, scoring.bos)
    windows = document_windows(lm, docs, scoring.max_length, scoring.stride, baseline)
    names = [d.doc_id for d in docs]
    kept = score_windows(baseline, windows, dataclasses.replace(options, cache_k=kl_top_k), doc_names=names)
    cache = {key: kept[key] for key in CACHE_COLUMNS} | {"nll_baseline": kept["nll"]}
    columns = score_windows(lm, windows, dataclasses.replace(options, baseline_cache=cache), doc_names=names)
    return finish_columns(lm, columns, docs)


def score_lockstep_documents(
    variants: list, baseline, documents: list[Document], scoring: ScoringConfig, overlap_k: int, kl_top_k: int
) -> list[pd.DataFrame]:
    """Each variant's `pair_frame` from one lockstep pass over independent documents: the
    baseline's body and head run once per batch and chunk for all of them."""
    for variant in variants:
        check_same_tokenizer(variant, baseline, "divergence")
        resolve_pair_window(variant, baseline, scoring.max_length, scoring.stride)
    if len({v.name for v in variants}) < len(variants):
        raise ConfigError(
            "divergence: the models of a list must have distinct names (pass `LoadedModel`s named apart)."
        )
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(scoring.batch_tokens), overlap_k=overlap_k, kl_top_k=kl_top_k
    )
    docs = tokenize_documents(documents, baseline.tokenizer, scoring.bos)
    windows = document_windows(baseline, docs, scoring.max_length, scoring.stride)
    names = [d.doc_id for d in docs]
    _, *per_variant = score_windows_lockstep(baseline, variants, windows, options, doc_names=names)
    doc_ids = [d.doc_id for d in documents]
    return [
        pair_frame(v.name, baseline.name, doc_ids, finish_columns(v, columns, docs))
        for v, columns in zip(variants, per_variant)
    ]
