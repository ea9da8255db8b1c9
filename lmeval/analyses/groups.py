"""Groups (``data.group_by``): each group's pooled figures, the named averages over groups, and
per-group divergence, as Paloma reports a mixture of sources and domains.

Why: a corpus is usually a mixture, and one pooled number hides which parts a model fits; the
averages over the parts disagree (see `lmeval.core.groups`), so each one is named. Every group's
figures are pooled within the group from its documents' sums (one division at the end), with a
document bootstrap inside the group; a parent's row also gives the unweighted mean of its
children's bits per byte (Paloma's macro over the domains of a source).

Owns ``groups.csv``, ``groups.png`` and, with ``compare.divergence``, ``divergence_groups.csv``;
adds the named averages and their intervals to the summary, and hands the documents' groups to
the comparison (``compare.csv``'s per-group rows). Documents are grouped by the corpus
(`RunFacts.groups`): what a group is never depends on scoring.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..core import groups as G
from ..core.bootstrap import bootstrap_interval, resampled_sums
from ..errors import ConfigError
from .base import Analysis, ModelResult, Outputs, Part, RunFacts
from .compare import small_sample_note
from .divergence import MEANS, document_sums
from .documents import SUM_FIELDS, _document_sums
from .plots import plot_groups

GROUP_COLUMNS = [
    "model",
    "level",
    "group",
    "n_documents",
    "n_tokens",
    "n_bytes",
    "n_words",
    "nll_sum",
    "ppl",
    "bits_per_token",
    "bits_per_byte",
    "word_ppl",
    "bits_per_byte_ci_low",
    "bits_per_byte_ci_high",
    "bits_per_byte_macro_children",
    "note",
]
DIVERGENCE_MEANS = ("kl_mean", "kl_reverse_mean", "same_top1", "delta_p_mean", "ln_ppl_ratio")
DIVERGENCE_GROUP_COLUMNS = [
    "model",
    "baseline",
    "level",
    "group",
    "n_documents",
    "n_tokens",
    *[c for m in DIVERGENCE_MEANS for c in (m, f"{m}_ci_low", f"{m}_ci_high")],
    "ppl_ratio",
    "n_resamples",
    "note",
]
DEFINITIONS = {
    "group": "a document's value of each data.group_by column, joined with its parents' by '/' below the top level",
    "pooled": "within a group: sums over its documents, one division (bits_per_byte = sum nll / ln 2 / sum n_bytes)",
    "bits_per_byte_micro": "sum nll / ln 2 / sum n_bytes over every document (= the summary's bits_per_byte)",
    "bits_per_byte_doc_mean": "the mean over documents of each document's bits per byte",
    "bits_per_byte_macro_<level>": "the unweighted mean over the level's groups of each group's pooled bits per byte",
    "bits_per_byte_macro_weighted_<level>": "sum_g w_g bpb_g / sum_g w_g, w from data.group_weights "
    "('documents': each group's document count, lm-eval's weight_by_size)",
    "bits_per_byte_macro_children": "groups.csv: the unweighted mean of the children's bits per byte (Paloma's "
    "macro over the subdomains of a source)",
    "ppl_micro": "exp(sum nll / sum n_tokens) over every document (= the summary's ppl)",
    "ppl_macro_<level>": "exp(the mean over the level's groups of sum nll / sum n_tokens): the geometric mean of "
    "the groups' perplexities",
    "ppl_doc_mean": "the mean over documents of each document's perplexity (unchanged)",
    "intervals": "95% percentile intervals of a bootstrap that resamples documents within their finest-level group "
    "(a group's size is kept); NaN below compare.min_documents documents",
}


class GroupsAnalysis(Analysis):
    """groups.csv, groups.png, divergence_groups.csv and the named averages (``data.group_by``)."""

    name = "groups"

    def __init__(self, data, compare, divergence_baseline: str | None = None):
        self.levels = tuple(data.group_by)
        self.weights = data.group_weights  # "documents", {level: {group: weight}} or None
        self.missing = data.group_missing
        self.options, self.baseline = compare, divergence_baseline  # the `compare` section
        self._index: tuple = (None, {})  # (labels, doc_id -> row of the labels)

    def start(self, model: str):
        return {"rows": [], "pairs": []}

    def update(self, state, part: Part):
        state["rows"].append([part.meta[k] for k in SUM_FIELDS])
        if "kl" in part.columns:  # a pass with the divergence baseline: its per-document sums
            sums = document_sums(part.columns["doc_index"], part.columns, len(part.doc_ids))
            state["pairs"].append((list(part.doc_ids), sums))
        return state

    def merge(self, state, later):
        return {"rows": state["rows"] + later["rows"], "pairs": state["pairs"] + later["pairs"]}

    def finish(self, model: str, state, run: RunFacts) -> ModelResult:
        labels = _labels(run)
        ids, n_tokens, n_bytes, n_words, nll_sum = _document_sums(state["rows"])
        where = self._rows_of(labels, ids)  # (D,) each document's row in the labels
        columns = G.document_columns(nll_sum, n_tokens, n_bytes, n_words)
        strata, n_strata = labels.codes[where, -1], len(labels.names[-1])
        c = self.options
        finest = G.stratum_sums(columns, strata, n_strata)[None]  # (1, G_finest, k)
        weights = self._weights(labels, where)
        point = G.named_averages(finest, labels, weights)
        # Groups with enough documents for an interval, per level, and their resampled bits per byte.
        sizes = [np.bincount(labels.codes[where, k], minlength=len(labels.names[k])) for k in range(len(labels.levels))]
        shown = [n >= c.min_documents for n in sizes]
        resampled: dict = {name: [] for name in point}
        per_group: list[list] = [[] for _ in labels.levels]
        for block in G.stratified_resamples(columns, strata, n_strata, c.bootstrap, c.seed):  # (b, G_finest, k)
            for name, values in G.named_averages(block, labels, weights).items():
                resampled[name].append(values)
            for k, keep in enumerate(shown):
                per_group[k].append(G.pooled(G.to_level(block, labels, k)[:, keep])["bits_per_byte"])  # (b, G_kept)
        summary: dict[str, float] = {"n_skipped_no_group": labels.n_skipped}
        enough = len(ids) >= c.min_documents
        for name, value in point.items():
            if name != "ppl_doc_mean":  # the documents analysis's, unchanged
                summary[name] = float(value[0])
            draws = np.concatenate(resampled[name]) if resampled[name] else np.zeros(0)
            low, high, _ = bootstrap_interval(draws) if enough else (math.nan, math.nan, math.nan)
            summary[f"{name}_ci_low"], summary[f"{name}_ci_high"] = low, high
        intervals = [_percentiles(blocks, keep) for blocks, keep in zip(per_group, shown)]
        tables = {"groups": self._group_rows(model, labels, sizes, finest, intervals)}
        if state["pairs"]:
            tables["divergence_groups"] = self._divergence_rows(model, labels, state["pairs"])
        return ModelResult(summary=summary, tables=tables)

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        labels = _labels(run)
        groups = pd.concat([r.tables["groups"] for r in results.values()], ignore_index=True)[GROUP_COLUMNS]
        files = {
            "groups.csv": groups,
            "groups.png": plot_groups(groups, self.levels, min_documents=self.options.min_documents),
        }
        tables = {"groups": groups, "document_groups": document_groups(labels)}
        pairs = [r.tables["divergence_groups"] for r in results.values() if "divergence_groups" in r.tables]
        if pairs:
            tables["divergence_groups"] = pd.concat(pairs, ignore_index=True)[DIVERGENCE_GROUP_COLUMNS]
            files["divergence_groups.csv"] = tables["divergence_groups"]
        record = {
            "levels": list(self.levels),
            "group_missing": self.missing,
            "n_skipped_no_group": labels.n_skipped,
            "n_groups": {level: len(names) for level, names in zip(labels.levels, labels.names)},
            "weights": self.weights,
            "definitions": DEFINITIONS,
        }
        return Outputs(files=files, tables=tables, record={"groups": record})

    # ----------------------------------------------------------------------------------

    def _rows_of(self, labels: G.GroupLabels, ids: list) -> np.ndarray:
        """Each document's row in ``labels`` (the corpus's order), by id."""
        if self._index[0] is not labels:
            self._index = (labels, {str(d): i for i, d in enumerate(labels.doc_ids)})
        index = self._index[1]
        return np.fromiter((index[str(d)] for d in ids), dtype=np.int64, count=len(ids))

    def _weights(self, labels: G.GroupLabels, where: np.ndarray) -> dict | None:
        """Per level in ``data.group_weights``, each group's weight (its document count for ``documents``)."""
        if self.weights is None:
            return None
        if self.weights == "documents":
            return {
                level: np.bincount(labels.codes[where, k], minlength=len(labels.names[k]))
                for k, level in enumerate(labels.levels)
            }
        tables = {level: {str(g): float(w) for g, w in table.items()} for level, table in self.weights.items()}
        return {
            level: np.array([tables[level][name] for name in labels.names[k]])
            for k, level in enumerate(labels.levels)
            if level in tables
        }

    def _group_rows(self, model: str, labels: G.GroupLabels, sizes: list, finest, intervals: list) -> pd.DataFrame:
        """One row per level and group (`GROUP_COLUMNS`); ``intervals[k]``: (2, G_k) ends."""
        c, frames = self.options, []
        for k, level in enumerate(labels.levels):
            sums = G.to_level(finest, labels, k)[0]  # (G_k, k)
            figures = G.pooled(sums)
            n_documents = sizes[k]
            children = np.full(len(n_documents), np.nan)
            if k + 1 < len(labels.levels):
                below = G.pooled(G.to_level(finest, labels, k + 1)[0])["bits_per_byte"]
                children = G.children_mean(below, labels.parents(k + 1), len(n_documents))
            frames.append(
                pd.DataFrame(
                    {
                        "model": model,
                        "level": level,
                        "group": list(labels.names[k]),
                        "n_documents": n_documents,
                        "n_tokens": sums[:, G.TOKENS].astype(np.int64),
                        "n_bytes": sums[:, G.BYTES].astype(np.int64),
                        "n_words": sums[:, G.WORDS].astype(np.int64),
                        "nll_sum": sums[:, G.NLL],
                        "ppl": figures["ppl"],
                        "bits_per_token": figures["bits_per_token"],
                        "bits_per_byte": figures["bits_per_byte"],
                        "word_ppl": figures["word_ppl"],
                        "bits_per_byte_ci_low": intervals[k][0],
                        "bits_per_byte_ci_high": intervals[k][1],
                        "bits_per_byte_macro_children": children,
                        "note": [small_sample_note(int(n), c.min_documents) for n in n_documents],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)[GROUP_COLUMNS]

    def _divergence_rows(self, model: str, labels: G.GroupLabels, pairs: list) -> pd.DataFrame:
        """Per level and group: the pooled divergence means of ``model`` against the baseline,
        each with a paired document-bootstrap interval within the group (divergence.csv's means)."""
        c = self.options
        ids = [str(d) for doc_ids, _ in pairs for d in doc_ids]
        frame = pd.DataFrame(np.concatenate([s for _, s in pairs]), index=ids)
        frame = frame.groupby(level=0, sort=False).sum()  # the pieces of a long document: one row
        sums = frame.to_numpy()
        where = self._rows_of(labels, list(frame.index))
        rows = []
        for k, level in enumerate(labels.levels):
            codes = labels.codes[where, k]
            for g, name in enumerate(labels.names[k]):
                mine = sums[(codes == g) & (sums[:, 0] > 0)]  # documents without tokens carry nothing
                row = {
                    "model": model,
                    "baseline": self.baseline,
                    "level": level,
                    "group": name,
                    "n_documents": len(mine),
                    "n_tokens": int(mine[:, 0].sum()),
                    "n_resamples": c.bootstrap,
                    "note": small_sample_note(len(mine), c.min_documents),
                }
                total = mine.sum(axis=0)
                enough = len(mine) >= c.min_documents
                boot = resampled_sums(mine, c.bootstrap, c.seed) if enough else np.zeros((0, sums.shape[1]))
                with np.errstate(divide="ignore", invalid="ignore"):
                    for m in DIVERGENCE_MEANS:
                        row[m] = float(MEANS[m](total)) if row["n_tokens"] else math.nan
                        row[f"{m}_ci_low"], row[f"{m}_ci_high"], _ = bootstrap_interval(MEANS[m](boot))
                row["ppl_ratio"] = math.exp(row["ln_ppl_ratio"])
                rows.append(row)
        return pd.DataFrame(rows, columns=DIVERGENCE_GROUP_COLUMNS)


def _percentiles(blocks: list, keep: np.ndarray) -> np.ndarray:
    """(2, G) each group's 95% percentile interval (`bootstrap_interval`'s ends) from its
    resampled values; NaN for the groups left out (too few documents) or without resamples."""
    out = np.full((2, len(keep)), np.nan)
    if blocks and keep.any():
        out[:, keep] = np.percentile(np.concatenate(blocks), [2.5, 97.5], axis=0)
    return out


def _labels(run: RunFacts) -> G.GroupLabels:
    if run.groups is None:
        raise ConfigError(
            "data.group_by: needs documents read from data.path, which carry the group columns (got documents "
            "without groups, e.g. texts given to the in-loop evaluator). Give the data by data.path, or drop group_by."
        )
    return run.groups


def document_groups(labels: G.GroupLabels) -> pd.DataFrame:
    """One row per document and level: ``doc_id``, ``level``, ``group`` (for the comparison's per-group rows)."""
    ids = np.array([str(d) for d in labels.doc_ids], dtype=object)
    return pd.DataFrame(
        {
            "doc_id": np.tile(ids, len(labels.levels)),
            "level": np.repeat(np.array(labels.levels, dtype=object), len(ids)),
            "group": np.concatenate(
                [np.array(labels.names[k], dtype=object)[labels.codes[:, k]] for k in range(len(labels.levels))]
            ),
        }
    )
