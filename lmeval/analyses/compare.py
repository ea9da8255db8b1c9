"""Is model B really better than model A? Paired, pooled deltas with bootstrap intervals.

Why: two perplexities side by side do not say whether their difference would survive a
different draw of the corpus. Documents, not tokens, are the independent units (tokens of
one document share its topic and style), so the bootstrap resamples *documents*, and it is
*paired*: both models get the same resampled documents, which cancels the difficulty the
two share. Each resample recomputes the pooled metric from resampled sums and counts, with
one division at the end (``bits_per_token = sum nll_sum / ln 2 / sum n_tokens``), exactly
as the summary pools it; never a mean of per-document ratios.

Per-token metrics (bits per token, token perplexity) are compared only when the two models
share a tokenizer (and, where conversations are scored, a chat template, which decides a
conversation's token sequence as much as the vocabulary does): otherwise a "token" is a
different unit for each, and the delta mixes model quality with segmentation. Bits per byte and word perplexity are pooled over the
identical raw text, so they are always compared.

Units: ``nll`` and ``nll_sum`` are nats; ``bits_per_*`` are base 2; deltas are model minus
baseline in the metric's own unit (negative = the model predicts the text better).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.bootstrap import MIN_DOCUMENTS, bootstrap_interval, resampled_sums
from ..core.units import LN2
from ..engine.config import CompareConfig
from ..errors import ConfigError, DataError

COMPARE_COLUMNS = ["model", "baseline", "metric", "delta", "ci_low", "ci_high", "p_value", "unit"]
EXTRA_COLUMNS = [
    "value",
    "baseline_value",
    "ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "n_documents",
    "n_resamples",
    "note",
]
log = logging.getLogger(__name__)
TOKEN_DIFF_COLUMNS = [
    "model",
    "baseline",
    "doc_id",
    "position",
    "token",
    "delta_nll",
    "nll",
    "nll_baseline",
    "char_start",
    "char_end",
]
# The resolved protocol keys two models must share for their numbers to be comparable.
PROTOCOL_KEYS = ("max_length", "stride", "bos", "documents", "separator")
TOKENIZERS_DIFFER = (
    "tokenizers differ (sha256 {model} vs {baseline}): per-token deltas refused; "
    "compared in bits per byte and word perplexity on the identical raw text"
)
TEMPLATES_DIFFER = (
    "chat templates differ (sha256 {model} vs {baseline}): the same vocabulary, but each conversation is "
    "another token sequence, so per-token deltas are refused; compared in bits per byte and word perplexity "
    "on the identical assistant text"
)


@dataclass(frozen=True)
class Metric:
    """A pooled metric: ``nll_sum`` [nats] over the ``count`` column, as bits or a perplexity."""

    name: str
    count: str
    unit: str
    kind: str  # "bits": sum nll / ln 2 / count;  "ppl": exp(sum nll / count)

    @property
    def per_token(self) -> bool:
        return self.count == "n_tokens"

    def pooled(self, nll_sum, count) -> np.ndarray:
        """The metric from sums and counts (arrays broadcast); NaN where nothing was counted."""
        nll_sum = np.asarray(nll_sum, dtype=np.float64)
        count = np.asarray(count, dtype=np.float64)
        safe = np.where(count > 0, count, 1.0)
        if self.kind == "bits":
            value = nll_sum / LN2 / safe
        else:
            with np.errstate(over="ignore"):
                value = np.exp(nll_sum / safe)
        return np.where(count > 0, value, np.nan)


METRICS = {
    m.name: m
    for m in (
        Metric("bits_per_token", "n_tokens", "bits/token", "bits"),
        Metric("ppl", "n_tokens", "ppl (tokens)", "ppl"),
        Metric("bits_per_byte", "n_bytes", "bits/byte", "bits"),
        Metric("word_ppl", "n_words", "ppl (words)", "ppl"),
    )
}
TOKEN_FREE_METRICS = tuple(name for name, m in METRICS.items() if not m.per_token)


# --------------------------------------------------------------------------------------
# The paired document bootstrap
# --------------------------------------------------------------------------------------


def metric_columns(documents: pd.DataFrame, specs) -> tuple[list[str], np.ndarray]:
    """The per-document sums the ``specs`` pool: their names (``nll_sum``, then each count
    column once) and the ``(D, k)`` float64 columns, in the rows' order."""
    names = ["nll_sum", *dict.fromkeys(s.count for s in specs)]
    return names, np.column_stack([documents[c].to_numpy(np.float64) for c in names])


def paired_bootstrap(
    model: pd.DataFrame, baseline: pd.DataFrame, metrics=tuple(METRICS), n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Pooled metrics of two models on the same documents, their delta and its bootstrap CI.

    ``model`` and ``baseline`` hold per-document sums aligned row by row (same documents,
    same order): ``nll_sum`` [nats] and the counts the metrics need (``n_tokens``,
    ``n_bytes``, ``n_words``). One index matrix (see `resampled_sums`) serves every metric,
    and each resample pools both models over the same documents. Returns one row per metric:
    metric, value, baseline_value, delta (= value - baseline_value), ci_low, ci_high,
    p_value (see `bootstrap_interval`), unit, and ratio (= value / baseline_value) with its
    percentile interval ratio_ci_low, ratio_ci_high from the same resamples.
    """
    specs = [METRICS[name] for name in metrics]
    names, mine_columns = metric_columns(model, specs)
    k = len(names)
    columns = np.column_stack([mine_columns, metric_columns(baseline, specs)[1]])  # (D, 2k)
    total = columns.sum(axis=0)[None]  # (1, 2k)
    boot = resampled_sums(columns, n_resamples, seed)  # (B, 2k)
    rows = []
    for spec in specs:
        j = names.index(spec.count)
        value = spec.pooled(total[:, 0], total[:, j])[0]
        base = spec.pooled(total[:, k], total[:, k + j])[0]
        mine, theirs = spec.pooled(boot[:, 0], boot[:, j]), spec.pooled(boot[:, k], boot[:, k + j])  # (B,)
        low, high, p = bootstrap_interval(mine - theirs)
        ratio_low, ratio_high, _ = bootstrap_interval(mine / theirs)
        rows.append(
            {
                "metric": spec.name,
                "value": value,
                "baseline_value": base,
                "delta": value - base,
                "ci_low": low,
                "ci_high": high,
                "p_value": p,
                "unit": spec.unit,
                "ratio": value / base,
                "ratio_ci_low": ratio_low,
                "ratio_ci_high": ratio_high,
            }
        )
    return pd.DataFrame(rows)


INTERVAL_COLUMNS = ("ci_low", "ci_high", "p_value", "ratio_ci_low", "ratio_ci_high")


def withhold_small_sample(table: pd.DataFrame, n_documents: int, min_documents: int = MIN_DOCUMENTS) -> pd.DataFrame:
    """NaN intervals and p-values when fewer than ``min_documents`` documents were compared:
    a document bootstrap of so few says nothing honest (see `MIN_DOCUMENTS`)."""
    if n_documents >= min_documents:
        return table
    return table.assign(**dict.fromkeys(INTERVAL_COLUMNS, np.nan))


def small_sample_note(n_documents: int, min_documents: int = MIN_DOCUMENTS) -> str:
    if n_documents >= min_documents:
        return ""
    return (
        f"only {n_documents} document(s), fewer than compare.min_documents = {min_documents}: no interval or "
        "p-value, since a bootstrap over so few documents cannot tell a real difference from chance"
    )


# --------------------------------------------------------------------------------------
# Comparing the models of a run
# --------------------------------------------------------------------------------------


def shared_tokenizer(run_record: dict, names=None) -> bool:
    """True when all models (or the ``names`` given) have the same tokenizer_sha256, i.e.
    share one vocabulary, and the same chat_template_sha256 (recorded when conversations
    are scored: the template decides the token sequence of a conversation), so that a token
    is the same unit for each. A missing vocabulary fingerprint counts as different."""
    protocols = run_record["protocol"]["models"]
    shas = [protocols[n].get("tokenizer_sha256") for n in (names if names is not None else protocols)]
    templates = {protocols[n].get("chat_template_sha256") for n in (names if names is not None else protocols)}
    return bool(shas) and None not in shas and len(set(shas)) == 1 and len(templates) == 1


def protocol_differences(protocol: dict, reference: dict) -> list[str]:
    """``"key: value vs reference"`` for each of `PROTOCOL_KEYS` on which two models differ."""
    return [
        f"{key}: {protocol.get(key)!r} vs {reference.get(key)!r}"
        for key in PROTOCOL_KEYS
        if protocol.get(key) != reference.get(key)
    ]


def _model_names(tables: dict) -> list[str]:
    return list(pd.unique(tables["documents"]["model"]))


def _baseline(names: list[str], baseline, where: str) -> str:
    if baseline is None:
        return names[0]
    if baseline not in names:
        raise ConfigError(f"{where}: must name one of the models ({', '.join(names)}) (got {baseline!r}).")
    return baseline


def aligned_documents(documents: pd.DataFrame, model: str, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two models' document rows in the baseline's order; refuses different document sets."""
    base = documents[documents["model"] == baseline].reset_index(drop=True)
    other = documents[documents["model"] == model]
    only_model = set(other["doc_id"]) - set(base["doc_id"])
    only_base = set(base["doc_id"]) - set(other["doc_id"])
    if only_model or only_base:
        example = sorted(map(repr, only_model or only_base))[:3]
        raise DataError(
            f"compare: model {model!r} must be scored on the same documents as the baseline {baseline!r} "
            f"(got {len(only_model)} documents only in {model!r} and {len(only_base)} only in {baseline!r}, "
            f"e.g. {', '.join(example)}). Score both models on the same data and data.max_documents."
        )
    other = other.set_index("doc_id").loc[base["doc_id"]].reset_index()
    return other, base


def _pair_note(record: dict, model: str, baseline: str, docs: pd.DataFrame, base: pd.DataFrame) -> str:
    """Why some rows are absent, or what to keep in mind reading them; '' when nothing."""
    protocols = record["protocol"]["models"]
    notes = []
    if not shared_tokenizer(record, [model, baseline]):
        vocabularies = [protocols[n].get("tokenizer_sha256") for n in (model, baseline)]
        key, message = (
            ("chat_template_sha256", TEMPLATES_DIFFER)
            if None not in vocabularies and vocabularies[0] == vocabularies[1]
            else ("tokenizer_sha256", TOKENIZERS_DIFFER)
        )
        short = [str(protocols[n].get(key))[:12] + "…" for n in (model, baseline)]
        notes.append(message.format(model=short[0], baseline=short[1]))
    differences = protocol_differences(protocols[model], protocols[baseline])
    if differences:
        notes.append("scoring protocol differs from the baseline (" + "; ".join(differences) + ")")
    n_bytes_differ = int((docs["n_bytes"].to_numpy() != base["n_bytes"].to_numpy()).sum())
    if n_bytes_differ:
        notes.append(
            f"scored bytes differ in {n_bytes_differ} documents (bos: none leaves each tokenizer's own "
            "first token unscored), so bits per byte is not on identical text"
        )
    return "; ".join(notes)


def document_differences(docs: pd.DataFrame, base: pd.DataFrame, model: str, baseline: str, shared: bool):
    """Per-document ranking: where the model gains or loses, in nats and in bits per unit,
    largest |delta_nll_sum| first. ``delta_bits_per_token`` is NaN without a shared tokenizer."""
    bpt = METRICS["bits_per_token"]
    bpb = METRICS["bits_per_byte"]
    frame = pd.DataFrame(
        {
            "model": model,
            "baseline": baseline,
            "doc_id": base["doc_id"].to_numpy(),
            "n_tokens": docs["n_tokens"].to_numpy(),
            "n_bytes": base["n_bytes"].to_numpy(),
            "nll_sum": docs["nll_sum"].to_numpy(np.float64),
            "nll_sum_baseline": base["nll_sum"].to_numpy(np.float64),
        }
    )
    frame["delta_nll_sum"] = frame["nll_sum"] - frame["nll_sum_baseline"]
    frame["delta_bits_per_token"] = (
        bpt.pooled(docs["nll_sum"], docs["n_tokens"]) - bpt.pooled(base["nll_sum"], base["n_tokens"])
        if shared
        else np.nan
    )
    frame["delta_bits_per_byte"] = bpb.pooled(docs["nll_sum"], docs["n_bytes"]) - bpb.pooled(
        base["nll_sum"], base["n_bytes"]
    )
    order = np.argsort(-frame["delta_nll_sum"].abs().to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def token_differences(chunks, model: str, baseline: str, top_k: int) -> pd.DataFrame:
    """The ``top_k`` tokens whose nll [nats] moved most between baseline and model, aligned
    by (doc_id, position); refuses tokens that do not align (another text or protocol).

    ``chunks`` yields pairs (the model's token rows, the baseline's) that hold the same
    documents, such as one result part of each, so that only one pair is in memory at a
    time. Ties in |delta_nll| go to the first row in (doc_id, position) order."""
    keys = ["doc_id", "position"]
    best, unmatched, mismatched = None, 0, 0
    for mine, theirs in chunks:
        merged = mine[keys + ["token_id", "token", "nll", "char_start", "char_end"]].merge(
            theirs[keys + ["token_id", "nll"]], on=keys, how="outer", suffixes=("", "_baseline"), indicator=True
        )
        absent = int((merged["_merge"] != "both").sum())
        unmatched += absent
        mismatched += int((merged["token_id"] != merged["token_id_baseline"]).sum()) - absent
        merged["delta_nll"] = merged["nll"].astype(np.float64) - merged["nll_baseline"].astype(np.float64)
        candidates = merged.loc[merged["delta_nll"].abs().nlargest(top_k, keep="all").index]
        best = _largest_moves(candidates if best is None else pd.concat([best, candidates]), top_k)
    if unmatched or mismatched:
        raise DataError(
            f"compare: the tokens of {model!r} must align with the baseline {baseline!r} by (doc_id, position) "
            f"(got {unmatched} unmatched positions and {mismatched} different token ids). "
            "Score both models with the same tokenizer, data and scoring protocol."
        )
    top = best if best is not None else pd.DataFrame(columns=TOKEN_DIFF_COLUMNS[2:])
    return top.assign(model=model, baseline=baseline)[TOKEN_DIFF_COLUMNS].reset_index(drop=True)


def _largest_moves(frame: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The ``top_k`` rows of largest |delta_nll|, ties to the first in (doc_id, position) order."""
    ordered = frame.sort_values(["doc_id", "position"], kind="stable").reset_index(drop=True)
    return ordered.loc[ordered["delta_nll"].abs().nlargest(top_k, keep="first").index]


def tokens_in_memory(tokens: pd.DataFrame):
    """`compare_tables`' ``token_chunks`` for a token table held in memory: one pair per model."""

    def chunks(model: str, baseline: str):
        yield tokens[tokens["model"] == model], tokens[tokens["model"] == baseline]

    return chunks


def _unscored(documents: pd.DataFrame, names: list[str], baseline: str) -> set[str]:
    """Models with no scored token, left out of every comparison with a warning (all of them when
    it is the baseline): their bytes and words carry no loss, and would read as a perfect model."""
    totals = documents.groupby("model", sort=False)["n_tokens"].sum()
    unscored = {n for n in names if totals.get(n, 0) == 0}
    if unscored:
        log.warning(
            "compare: model(s) %s scored no token, so they are compared with nothing%s.",
            ", ".join(sorted(unscored)),
            " (the baseline among them: no comparison)" if baseline in unscored else "",
        )
    return set(names) if baseline in unscored else unscored


GROUP_KEYS = ["level", "group"]  # compare.csv's last columns with data.group_by


def group_comparisons(docs, base, groups: pd.DataFrame, metrics, cfg, pair_note: str, pair: tuple) -> list:
    """The paired bootstrap of one pair on each group's documents alone: one frame per level
    and group (levels in order, groups sorted), intervals withheld below ``compare.min_documents``."""
    model, baseline = pair
    where = pd.Index(base["doc_id"])
    frames = []
    for level in pd.unique(groups["level"]):
        for group, members in groups[groups["level"] == level].groupby("group", sort=True):
            rows = where.get_indexer(members["doc_id"])
            rows = np.sort(rows[rows >= 0])  # the group's documents in the baseline's order
            if not len(rows):
                continue
            mine, theirs = docs.iloc[rows].reset_index(drop=True), base.iloc[rows].reset_index(drop=True)
            table = paired_bootstrap(mine, theirs, metrics, cfg.bootstrap, cfg.seed)
            table = withhold_small_sample(table, len(rows), cfg.min_documents)
            note = "; ".join(n for n in (pair_note, small_sample_note(len(rows), cfg.min_documents)) if n)
            frames.append(
                table.assign(
                    model=model,
                    baseline=baseline,
                    n_documents=len(rows),
                    n_resamples=cfg.bootstrap,
                    note=note,
                    level=level,
                    group=group,
                )
            )
    return frames


def compare_tables(tables: dict, run_record: dict, compare_config=None, token_chunks=None) -> dict:
    """Compare every model with the baseline on the run's documents.

    ``tables`` holds ``documents`` (and ``tokens`` for the per-token diff, or else
    ``token_chunks(model, baseline)`` yields the two models' token rows a part at a time, see
    `token_differences`); ``run_record`` is
    the run.json dict; ``compare_config`` a `CompareConfig` or its dict (baseline null = the
    first model). Returns ``compare`` (columns `COMPARE_COLUMNS`, then `EXTRA_COLUMNS`),
    ``compare_tokens`` (top_k largest |delta_nll| per model; None without a shared tokenizer
    or token table) and ``compare_documents`` (per-document ranking). Each pair gets its own
    ``default_rng(seed)``, so a pair's numbers do not depend on which other models ran, and
    its resampled indices point into the baseline's documents in their table order. With
    fewer than ``compare.min_documents`` documents the intervals and p-values are NaN, and
    the ``note`` says why; ``n_documents`` stands beside every row.

    With ``tables["document_groups"]`` (``doc_id, level, group``: data.group_by), each pair
    also gets one row per level, group and metric, compared on the group's documents alone,
    and the table gains `GROUP_KEYS` (empty on the whole corpus's rows).
    """
    cfg = CompareConfig(**compare_config) if isinstance(compare_config, dict) else compare_config or CompareConfig()
    names = _model_names(tables)
    baseline = _baseline(names, cfg.baseline, "compare.baseline")
    if token_chunks is None and tables.get("tokens") is not None:
        token_chunks = tokens_in_memory(tables["tokens"])
    rows, token_rows, document_rows = [], [], []
    groups = tables.get("document_groups")
    unscored = _unscored(tables["documents"], names, baseline)
    for model in (n for n in names if n != baseline and n not in unscored):
        docs, base = aligned_documents(tables["documents"], model, baseline)
        shared = shared_tokenizer(run_record, [model, baseline])
        metrics = tuple(METRICS) if shared else TOKEN_FREE_METRICS
        table = withhold_small_sample(
            paired_bootstrap(docs, base, metrics, cfg.bootstrap, cfg.seed), len(base), cfg.min_documents
        )
        note = "; ".join(
            n
            for n in (
                _pair_note(run_record, model, baseline, docs, base),
                small_sample_note(len(base), cfg.min_documents),
            )
            if n
        )
        rows.append(
            table.assign(model=model, baseline=baseline, n_documents=len(base), n_resamples=cfg.bootstrap, note=note)
        )
        if groups is not None:
            pair_note = _pair_note(run_record, model, baseline, docs, base)
            rows.extend(group_comparisons(docs, base, groups, metrics, cfg, pair_note, (model, baseline)))
        document_rows.append(document_differences(docs, base, model, baseline, shared))
        if shared and token_chunks is not None:
            token_rows.append(token_differences(token_chunks(model, baseline), model, baseline, cfg.top_k))
    columns = COMPARE_COLUMNS + EXTRA_COLUMNS + (GROUP_KEYS if groups is not None else [])
    compare = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    if groups is not None:  # the whole corpus's rows: no level, no group
        compare = compare.assign(**{key: compare.get(key, pd.Series(dtype=object)).fillna("") for key in GROUP_KEYS})
    return {
        "compare": compare[columns],
        "compare_tokens": pd.concat(token_rows, ignore_index=True) if token_rows else None,
        "compare_documents": pd.concat(document_rows, ignore_index=True) if document_rows else None,
    }
