"""Groups of documents: pooled figures per group, the named averages over groups and their
stratified bootstrap. Pure numpy, built from per-document sums.

Why: a corpus is usually a mixture (sources, domains, languages), and the field uses one
word, "average", for several different numbers. Pooled over every document (micro), the
large groups decide the figure; averaged over groups (macro), each group counts once; the
mean over documents weighs a ten-token document like a ten-thousand-token one; a weighted
mean uses weights chosen elsewhere (lm-eval weighs each task by its document count). Each
is named for what it is here, and each is computed from the same per-document sums
(``nll_sum`` in nats, ``n_tokens``, ``n_bytes``, ``n_words``), pooled within a group with
one division at the end.

The intervals resample documents within their group (a stratified bootstrap over the finest
level's groups): a resample keeps every group's size, so a macro average's interval reflects
the uncertainty inside the groups, not a reshuffling of the mixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .units import LN2

# Per-document columns the bootstrap resamples (`document_columns`), by index.
NLL, TOKENS, BYTES, WORDS, BPB_SUM, PPL_SUM, N_BPB, N_PPL = range(8)
SEPARATOR = "/"  # joins a group's label with its parents' below the top level: prophets/daniel


@dataclass(frozen=True)
class GroupLabels:
    """Each document's group at every level of ``data.group_by``, in corpus order.

    ``codes[d, k]`` indexes ``names[k]``: document d's group at level k, its label joined with
    its parents' by "/" below the top level (``prophets/daniel``); names are sorted. A
    finest-level group lies inside one group of every coarser level.
    """

    levels: tuple[str, ...]
    doc_ids: Sequence  # the documents' ids, in corpus order
    codes: np.ndarray  # (D, L) int64
    names: tuple[tuple[str, ...], ...]  # per level, the group labels
    n_skipped: int = 0  # documents left out for want of a value (data.group_missing: skip)

    @classmethod
    def from_values(cls, levels, doc_ids, values, n_skipped: int = 0) -> GroupLabels:
        """Labels from ``values``: per level, each document's value as a string (corpus order)."""
        n_docs = len(doc_ids)
        raw = np.zeros((n_docs, len(levels)), dtype=np.int64)
        uniques: list[np.ndarray] = []
        for k, column in enumerate(values):
            unique, inverse = np.unique(np.asarray(column, dtype=object).astype(str), return_inverse=True)
            raw[:, k], uniques = inverse.reshape(-1), [*uniques, unique]
        codes = np.zeros_like(raw)
        names = []
        for k in range(len(levels)):
            paths, inverse = np.unique(raw[:, : k + 1], axis=0, return_inverse=True)  # (G_k, k + 1), sorted
            codes[:, k] = inverse.reshape(-1)
            names.append(tuple(SEPARATOR.join(str(uniques[j][p[j]]) for j in range(k + 1)) for p in paths))
        return cls(tuple(levels), doc_ids, codes, tuple(names), n_skipped)

    def finest_to(self, level: int) -> np.ndarray:
        """(G_finest,) the group at ``level`` that holds each finest-level group."""
        out = np.zeros(len(self.names[-1]), dtype=np.int64)
        out[self.codes[:, -1]] = self.codes[:, level]
        return out

    def parents(self, level: int) -> np.ndarray:
        """(G_level,) the group one level up of each group at ``level`` (>= 1)."""
        out = np.zeros(len(self.names[level]), dtype=np.int64)
        out[self.codes[:, level]] = self.codes[:, level - 1]
        return out

    def n_documents(self, level: int) -> np.ndarray:
        """(G_level,) documents per group."""
        return np.bincount(self.codes[:, level], minlength=len(self.names[level]))


def weight_problems(labels: GroupLabels, weights) -> list[str]:
    """What is wrong with ``data.group_weights`` for the groups found: every group of a weighted
    level needs a weight (named as groups.csv names it), and the weights must not all be 0.
    Weights of groups absent from the corpus are allowed (a subset of it may be scored)."""
    if not isinstance(weights, dict):
        return []
    problems = []
    for k, level in enumerate(labels.levels):
        if level not in weights:
            continue
        table = {str(g): w for g, w in weights[level].items()}
        missing = [name for name in labels.names[k] if name not in table]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            problems.append(
                f"data.group_weights.{level}: every group of the level must have a weight (got none for {shown}). "
                "Name groups as groups.csv does: below the top level, joined with their parents by '/'."
            )
        elif not sum(float(table[name]) for name in labels.names[k]) > 0:
            problems.append(f"data.group_weights.{level}: the weights of the groups present must not all be 0.")
    return problems


def document_columns(nll_sum, n_tokens, n_bytes, n_words) -> np.ndarray:
    """(D, 8) float64: the sums (`NLL`, `TOKENS`, `BYTES`, `WORDS`) and, for the means over
    documents, each document's bits per byte and perplexity (0 where it has none) beside an
    indicator of having one (`N_BPB`, `N_PPL`): a document with no scored token has neither."""
    nll = np.asarray(nll_sum, dtype=np.float64)
    tokens, n_bytes = np.asarray(n_tokens, dtype=np.float64), np.asarray(n_bytes, dtype=np.float64)
    has_ppl = tokens > 0
    has_bpb = has_ppl & (n_bytes > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bpb = np.where(has_bpb, nll / LN2 / np.where(has_bpb, n_bytes, 1.0), 0.0)
        ppl = np.where(has_ppl, np.exp(nll / np.where(has_ppl, tokens, 1.0)), 0.0)
    words = np.asarray(n_words, dtype=np.float64)
    return np.column_stack([nll, tokens, n_bytes, words, bpb, ppl, has_bpb, has_ppl]).reshape(len(nll), 8)


def stratum_sums(columns: np.ndarray, strata: np.ndarray, n_strata: int) -> np.ndarray:
    """(n_strata, k) column sums per stratum (group)."""
    out = np.zeros((n_strata, columns.shape[1]))
    np.add.at(out, strata, columns)
    return out


# Documents x columns drawn at a time in a block of resamples: bounds memory, same stream.
_BLOCK_ELEMENTS = 1 << 22


def stratified_resamples(columns: np.ndarray, strata: np.ndarray, n_strata: int, n_resamples: int, seed: int):
    """Column sums of bootstrap resamples drawn within each stratum (group): yields blocks of
    shape (b, n_strata, k), ``n_resamples`` rows in all, so that memory follows the block.

    The documents are ordered by stratum (stable: corpus order within one); position j, in
    stratum s of n_s documents starting at position a_s, draws the document at a_s + i with
    ``i`` from ``np.random.default_rng(seed).integers(0, n, size=(n_resamples, D))``, n the
    size of each position's stratum, row r being resample r. Every stratum keeps its size in
    every resample. The draws come in blocks of rows; numpy's generator gives the same stream
    either way."""
    columns = np.asarray(columns, dtype=np.float64)  # (D, k)
    order = np.argsort(strata, kind="stable")
    counts = np.bincount(strata, minlength=n_strata)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    stratum = np.asarray(strata)[order]  # (D,) each position's stratum
    base, high = starts[stratum], counts[stratum]
    ordered, present = columns[order], counts > 0
    n_docs, k = columns.shape
    rows = max(1, _BLOCK_ELEMENTS // max(n_docs * k, 1))
    rng = np.random.default_rng(seed)
    for first in range(0, n_resamples, rows):
        b = min(rows, n_resamples - first)
        drawn = ordered[base + rng.integers(0, high, size=(b, n_docs))]  # (b, D, k)
        block = np.zeros((b, n_strata, k))
        block[:, present] = np.add.reduceat(drawn, starts[present], axis=1)  # (b, G, k)
        yield block


def stratified_resampled_sums(
    columns: np.ndarray, strata: np.ndarray, n_strata: int, n_resamples: int, seed: int
) -> np.ndarray:
    """(n_resamples, n_strata, k): every block of `stratified_resamples` at once."""
    blocks = list(stratified_resamples(columns, strata, n_strata, n_resamples, seed))
    return np.concatenate(blocks) if blocks else np.zeros((0, n_strata, np.shape(columns)[1]))


def _sum_into(values: np.ndarray, index: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``values`` summed along ``axis`` into ``size`` bins, position i into bin ``index[i]``.
    Groups are numbered in the order of their labels, top level first, so the finer groups of
    one coarser group are contiguous: one `np.add.reduceat` (no groups-by-groups matrix: a
    level may hold many thousands of groups)."""
    values = np.asarray(values, dtype=np.float64)
    index = np.asarray(index)
    starts = np.flatnonzero(np.concatenate([[True], index[1:] != index[:-1]])) if len(index) else index
    if len(starts) == size and np.array_equal(index[starts], np.arange(size)):
        return np.add.reduceat(values, starts, axis=axis)
    moved = np.moveaxis(values, axis, 0)  # any other order: slower, the same sums
    out = np.zeros((size, *moved.shape[1:]))
    np.add.at(out, index, moved)
    return np.moveaxis(out, 0, axis)


def to_level(finest: np.ndarray, labels: GroupLabels, level: int) -> np.ndarray:
    """(..., G_level, k) sums per group of ``level`` from (..., G_finest, k) finest-level sums."""
    return _sum_into(finest, labels.finest_to(level), len(labels.names[level]), axis=-2)


def _ratio(numerator: np.ndarray, count: np.ndarray, ok: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, numerator / np.where(ok, count, 1.0), np.nan)


def pooled(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled figures of (..., k) sums, one division each; NaN where nothing was scored (a
    count of bytes or words with no scored token is no denominator, as in the summary)."""
    nll, tokens = sums[..., NLL], sums[..., TOKENS]
    scored = tokens > 0
    nll_per_token = _ratio(nll, tokens, scored)
    with np.errstate(over="ignore"):
        return {
            "nll_per_token": nll_per_token,
            "ppl": np.exp(nll_per_token),
            "bits_per_token": _ratio(nll / LN2, tokens, scored),
            "bits_per_byte": _ratio(nll / LN2, sums[..., BYTES], scored & (sums[..., BYTES] > 0)),
            "word_ppl": np.exp(_ratio(nll, sums[..., WORDS], scored & (sums[..., WORDS] > 0))),
        }


def _mean(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over the last axis of the finite values (weighted), NaN when none."""
    ok = np.isfinite(values)
    w = np.broadcast_to(np.ones(values.shape[-1]) if weights is None else np.asarray(weights, np.float64), values.shape)
    w = np.where(ok, w, 0.0)
    total = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            total > 0, (np.where(ok, values, 0.0) * w).sum(axis=-1) / np.where(total > 0, total, 1.0), np.nan
        )


def children_mean(values: np.ndarray, parents: np.ndarray, n_parents: int) -> np.ndarray:
    """(..., n_parents) the unweighted mean of the children's finite ``values`` (..., G_child)
    per parent (Paloma's macro over the domains of a source)."""
    ok = np.isfinite(values)
    counts = _sum_into(ok, parents, n_parents, axis=-1)
    sums = _sum_into(np.where(ok, values, 0.0), parents, n_parents, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)


def named_averages(finest: np.ndarray, labels: GroupLabels, weights: dict | None = None) -> dict[str, np.ndarray]:
    """The named averages over groups from (..., G_finest, k) finest-level sums (a point
    estimate with a leading axis of 1, or B resamples).

    - ``bits_per_byte_micro`` = Σ nll / ln 2 / Σ n_bytes over every document (the summary's
      bits_per_byte); ``ppl_micro`` = exp(Σ nll / Σ n_tokens) (the summary's ppl);
    - ``bits_per_byte_doc_mean`` = the mean over documents of each document's bits per byte
      (documents with a scored token); ``ppl_doc_mean`` the same of their perplexities;
    - per level: ``bits_per_byte_macro_<level>`` = the unweighted mean over the level's groups
      of each group's pooled bits per byte; ``ppl_macro_<level>`` = exp(the mean over the
      level's groups of each group's Σ nll / Σ n_tokens), the geometric mean of the groups'
      perplexities;
    - ``bits_per_byte_macro_weighted_<level>`` = Σ_g w_g·bpb_g / Σ_g w_g for each level in ``weights``
      (level -> (G_level,) weights; groups without a figure drop out of both sums).
    """
    total = finest.sum(axis=-2)
    whole = pooled(total)
    out = {"bits_per_byte_micro": whole["bits_per_byte"]}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["bits_per_byte_doc_mean"] = _ratio(total[..., BPB_SUM], total[..., N_BPB], total[..., N_BPB] > 0)
    for k, level in enumerate(labels.levels):
        figures = pooled(to_level(finest, labels, k))
        out[f"bits_per_byte_macro_{level}"] = _mean(figures["bits_per_byte"])
        if weights and level in weights:
            out[f"bits_per_byte_macro_weighted_{level}"] = _mean(figures["bits_per_byte"], weights[level])
    out["ppl_micro"] = whole["ppl"]
    for k, level in enumerate(labels.levels):
        with np.errstate(over="ignore"):
            out[f"ppl_macro_{level}"] = np.exp(_mean(pooled(to_level(finest, labels, k))["nll_per_token"]))
    out["ppl_doc_mean"] = _ratio(total[..., PPL_SUM], total[..., N_PPL], total[..., N_PPL] > 0)
    return out
