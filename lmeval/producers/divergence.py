"""How far has a checkpoint's next-token distribution moved from its base, and where?

Comparing perplexities says whether a model is better; quantizing, pruning, distilling or
fine-tuning asks how far each prediction moved. Per scored token (nats, see
`lmeval.core.divergence`): ``kl`` = KL(P_base || P_model), ``kl_reverse``, ``delta_p`` =
q_y - p_y, ``same_top1``, ``nll`` and ``nll_baseline``; both models' logits meet a chunk at
a time (`lmeval.model.pair_scorer`) and no distribution is stored.

The summary pools tokens as the rest of lmeval does: means are sums over all tokens divided
once (never a mean of per-document means), percentiles are over all tokens, and every mean
gets a paired document-bootstrap 95% interval: documents, not tokens, are resampled (tokens
of one document share its topic and style), and both models' numbers of a resampled
document travel together, since they are computed on the same tokens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.bootstrap import bootstrap_interval, resampled_sums
from ..core.divergence import PAIR_FIELDS
from ..core.windows import make_windows
from ..errors import ModelError
from ..model.pair_scorer import score_pair_windows
from ..model.scorer import check_vocabulary, resolve_window
from ..engine.config import ScoringConfig
from .text import Document, check_texts, join_documents, split_stream, tokenize_documents
from ..model.fingerprint import tokenizer_fingerprint
from .score import as_loaded_model, check_batch_tokens
from .tables import char_spans, token_strings

DIVERGENCE_COLUMNS = [
    "model", "baseline", "doc_id", "position", "kl", "kl_reverse", "delta_p", "same_top1", "nll", "nll_baseline",
    "token_id", "token", "char_start", "char_end", "context_len",
]  # fmt: skip
# Per-document sums the bootstrap resamples; column 0 counts the tokens.
SUMS = ("n_tokens", "kl", "kl_reverse", "delta_p", "delta_p_sq", "same_top1", "nll", "nll_baseline")
KL_PERCENTILES = {"kl_median": 50.0, "kl_p90": 90.0, "kl_p99": 99.0, "kl_p999": 99.9}
DELTA_P_PERCENTILES = {
    "delta_p_p001": 0.1, "delta_p_p01": 1.0, "delta_p_p05": 5.0, "delta_p_p10": 10.0, "delta_p_p25": 25.0,
    "delta_p_median": 50.0, "delta_p_p75": 75.0, "delta_p_p90": 90.0, "delta_p_p95": 95.0, "delta_p_p99": 99.0,
    "delta_p_p999": 99.9,
}  # fmt: skip
TOP_TOKEN_COLUMNS = [
    "model", "baseline", "doc_id", "position", "token", "token_text", "context", "kl", "kl_reverse", "delta_p",
    "same_top1", "nll", "nll_baseline", "char_start", "char_end",
]  # fmt: skip
CONTEXT_CHARS = 40  # characters of text before a top token, in divergence_tokens.csv


class TokenizerMismatchError(ModelError):
    """Divergence needs one vocabulary: the two models' tokenizers differ."""


def check_same_tokenizer(lm, baseline) -> None:
    """Refuse a pair whose tokenizers differ (sha256 of the vocabulary, as run.json records it)."""
    mine, theirs = tokenizer_fingerprint(lm.tokenizer), tokenizer_fingerprint(baseline.tokenizer)
    if mine != theirs:
        raise TokenizerMismatchError(
            f"compare.divergence: model {lm.name} must share the baseline {baseline.name}'s tokenizer "
            f"(got sha256 {mine[:12]}… vs {theirs[:12]}…). Divergence compares two distributions over the same "
            "tokens, so it needs identical tokenizers; compare these models in bits_per_byte instead "
            "(`compare:` without `divergence: true`, or `lmeval compare`)."
        )


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


def score_pair_documents(lm, baseline, documents: list[Document], scoring: ScoringConfig, progress=None) -> dict:
    """Per-token divergence columns of ``documents`` (scored independently, or joined into one
    stream under ``scoring.documents: concatenated``); ``doc_index`` indexes ``documents``,
    and in a stream index ``len(documents)`` marks separator tokens."""
    check_same_tokenizer(lm, baseline)
    length, stride = resolve_pair_window(lm, baseline, scoring.max_length, scoring.stride)
    batch_tokens = check_batch_tokens(scoring.batch_tokens)
    stream = join_documents(documents, scoring.separator) if scoring.documents == "concatenated" else None
    docs = tokenize_documents([stream.document] if stream else documents, lm.tokenizer, scoring.bos)
    top = max((int(d.token_ids.max()) for d in docs if len(d.token_ids)), default=0)
    check_vocabulary(lm, top)
    check_vocabulary(baseline, top)
    windows = [w for i, d in enumerate(docs) for w in make_windows(i, d.token_ids.tolist(), d.prefix, length, stride)]
    columns = score_pair_windows(lm, baseline, windows, batch_tokens, progress, [d.doc_id for d in docs])
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    if stream is not None:
        index, start, end, position = split_stream(stream, columns["char_start"], columns["char_end"])
        columns.update(doc_index=index, char_start=start, char_end=end, position=position)
    return columns


def pair_frame(model: str, baseline: str, doc_ids: list, columns: dict) -> pd.DataFrame:
    """One row per scored token (`DIVERGENCE_COLUMNS`), in document then position order."""
    doc_index = columns["doc_index"]
    frame = pd.DataFrame({
        "model": model, "baseline": baseline,
        "doc_id": np.array(doc_ids, dtype=object)[doc_index] if len(doc_index) else np.array([], dtype=object),
        **{key: columns[key] for key in DIVERGENCE_COLUMNS[3:]},
    })  # fmt: skip
    order = np.lexsort((columns["position"], doc_index))
    return frame.iloc[order].reset_index(drop=True)


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
) -> pd.DataFrame:
    """Per-token divergence of ``model`` from ``baseline`` on each text, one row per scored token.

    ``model`` and ``baseline`` are anything `score_texts` takes (a path, a hub id, a
    ``(model, tokenizer)`` pair or a `LoadedModel`) and must share one tokenizer
    (`TokenizerMismatchError` otherwise). ``doc_id`` is the text's index. Columns
    (`DIVERGENCE_COLUMNS`, all in nats): ``kl`` = KL(P_baseline || P_model), ``kl_reverse`` =
    KL(P_model || P_baseline), ``delta_p`` = q_y - p_y (the true token's probability under
    the model minus under the baseline), ``same_top1`` (both argmaxes equal), ``nll`` (the
    model's) and ``nll_baseline``, beside the token's id, piece, character span and context
    length. `divergence_summary` pools the table with document-bootstrap intervals.
    """
    texts = check_texts(texts)
    scoring = ScoringConfig(max_length=max_length, stride=stride, bos=bos, batch_tokens=check_batch_tokens(batch_tokens))
    lm, base = as_loaded_model(model, name), as_loaded_model(baseline, baseline_name)
    columns = score_pair_documents(lm, base, [Document(i, t) for i, t in enumerate(texts)], scoring)
    frame = pair_frame(lm.name, base.name, list(range(len(texts))), columns)
    frame.attrs["n_documents"] = len(texts)
    return frame


# --------------------------------------------------------------------------------------
# Pooled summaries
# --------------------------------------------------------------------------------------


def document_sums(doc_index: np.ndarray, columns: dict, n_docs: int) -> np.ndarray:
    """(n_docs, len(SUMS)) float64 per-document sums of the per-token columns (see `SUMS`)."""
    def total(values):
        return np.bincount(doc_index, weights=np.asarray(values, dtype=np.float64), minlength=n_docs)

    delta_p = columns["delta_p"].astype(np.float64)
    return np.column_stack([
        np.bincount(doc_index, minlength=n_docs).astype(np.float64), total(columns["kl"]), total(columns["kl_reverse"]),
        total(delta_p), total(delta_p * delta_p), total(columns["same_top1"]), total(columns["nll"]),
        total(columns["nll_baseline"]),
    ]).reshape(n_docs, len(SUMS))  # fmt: skip


# Each pooled mean from a vector (or (B, k) matrix) of `SUMS`; ratios divide once at the end.
MEANS = {
    "kl_mean": lambda s: s[..., 1] / s[..., 0],
    "kl_reverse_mean": lambda s: s[..., 2] / s[..., 0],
    "same_top1": lambda s: s[..., 5] / s[..., 0],
    "delta_p_mean": lambda s: s[..., 3] / s[..., 0],
    "delta_p_rms": lambda s: np.sqrt(s[..., 4] / s[..., 0]),
    "ln_ppl_ratio": lambda s: (s[..., 6] - s[..., 7]) / s[..., 0],
}
WITH_P_VALUE = ("delta_p_mean", "ln_ppl_ratio")  # the means whose sign is a question


def summarize(sums: np.ndarray, kl: np.ndarray, delta_p: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """The pooled figures of one model against its baseline.

    ``sums`` holds one row of `SUMS` per document (documents without scored tokens are
    dropped: they carry nothing and would only change how many documents a resample
    draws); ``kl`` and ``delta_p`` are every token's values, for the percentiles (numpy's
    linear interpolation). Each of `MEANS` comes with ``_ci_low``/``_ci_high``, the 95%
    percentile interval over ``n_resamples`` document resamples (`resampled_sums`, so the
    draw is ``default_rng(seed).integers(0, D, (B, D))``), and `WITH_P_VALUE` with a
    two-sided ``_p_value`` (`bootstrap_interval`). ``ppl_ratio`` = exp(ln_ppl_ratio).
    """
    sums = np.asarray(sums, dtype=np.float64)
    sums = sums[sums[:, 0] > 0]
    total = sums.sum(axis=0)
    row: dict = {"n_documents": len(sums), "n_tokens": int(total[0]) if len(sums) else 0}
    boot = resampled_sums(sums, n_resamples, seed) if len(sums) else np.zeros((0, len(SUMS)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, mean in MEANS.items():
            row[name] = float(mean(total)) if row["n_tokens"] else float("nan")
            low, high, p = bootstrap_interval(mean(boot))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
            if name in WITH_P_VALUE:
                row[f"{name}_p_value"] = p
    kl, delta_p = np.asarray(kl, dtype=np.float64), np.asarray(delta_p, dtype=np.float64)
    for name, q in KL_PERCENTILES.items():
        row[name] = float(np.percentile(kl, q)) if len(kl) else float("nan")
    row["kl_max"] = float(kl.max()) if len(kl) else float("nan")
    row["delta_p_min"] = float(delta_p.min()) if len(delta_p) else float("nan")
    for name, q in DELTA_P_PERCENTILES.items():
        row[name] = float(np.percentile(delta_p, q)) if len(delta_p) else float("nan")
    row["delta_p_max"] = float(delta_p.max()) if len(delta_p) else float("nan")
    row["ppl_ratio"] = float(np.exp(row["ln_ppl_ratio"]))
    row["ppl_ratio_ci_low"], row["ppl_ratio_ci_high"] = np.exp(row["ln_ppl_ratio_ci_low"]), np.exp(row["ln_ppl_ratio_ci_high"])
    with np.errstate(divide="ignore", invalid="ignore"):
        row["nll_mean"], row["nll_baseline_mean"] = total[6] / total[0], total[7] / total[0]
    row["n_resamples"] = n_resamples
    return row


SUMMARY_COLUMNS = [
    "model", "baseline", "n_documents", "n_tokens",
    "kl_mean", "kl_mean_ci_low", "kl_mean_ci_high", *KL_PERCENTILES, "kl_max",
    "kl_reverse_mean", "kl_reverse_mean_ci_low", "kl_reverse_mean_ci_high",
    "same_top1", "same_top1_ci_low", "same_top1_ci_high",
    "delta_p_mean", "delta_p_mean_ci_low", "delta_p_mean_ci_high", "delta_p_mean_p_value",
    "delta_p_rms", "delta_p_rms_ci_low", "delta_p_rms_ci_high", "delta_p_min", *DELTA_P_PERCENTILES, "delta_p_max",
    "ln_ppl_ratio", "ln_ppl_ratio_ci_low", "ln_ppl_ratio_ci_high", "ln_ppl_ratio_p_value",
    "ppl_ratio", "ppl_ratio_ci_low", "ppl_ratio_ci_high", "nll_mean", "nll_baseline_mean", "n_resamples",
]  # fmt: skip


def divergence_summary(tokens: pd.DataFrame, bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, baseline) pair of a `divergence` table: `SUMMARY_COLUMNS`.

    Documents are the table's doc_ids in order of first appearance, each pair resampled with
    its own ``default_rng(seed)`` (see `summarize`)."""
    rows = []
    for (model, baseline), frame in tokens.groupby(["model", "baseline"], sort=False):
        doc_index, doc_ids = pd.factorize(frame["doc_id"], sort=False)
        columns = {key: frame[key].to_numpy() for key in PAIR_FIELDS}
        sums = document_sums(doc_index, columns, len(doc_ids))
        row = summarize(sums, columns["kl"], columns["delta_p"], bootstrap, seed)
        rows.append({"model": model, "baseline": baseline, **row})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def top_tokens(frame: pd.DataFrame, top_k: int, text_of) -> pd.DataFrame:
    """The ``top_k`` tokens with the largest ``kl`` (first in table order among ties), with
    their text and up to `CONTEXT_CHARS` characters before it; ``text_of(doc_id)`` is the text."""
    top = frame.loc[frame["kl"].nlargest(top_k, keep="first").index] if top_k else frame.iloc[:0]
    texts = [text_of(d) for d in top["doc_id"]]
    starts, ends = top["char_start"].to_numpy(), top["char_end"].to_numpy()
    top = top.assign(
        token_text=[t[s:e] for t, s, e in zip(texts, starts, ends)],
        context=[t[max(0, s - CONTEXT_CHARS) : s] for t, s in zip(texts, starts)],
    )
    return top[TOP_TOKEN_COLUMNS].reset_index(drop=True)
