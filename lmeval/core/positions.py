"""Loss against where a token sits: position bins, their document bootstrap, and the
in-context-learning score. Pure numpy, built from sums and counts.

Why: a model that uses its context predicts later tokens of a document better than early
ones, so mean NLL [nats] falls with the token's position (YaRN, LongRoPE, the Gemini 1.5
report). The curve is pooled from per-(document, bin) sums, ``nll_mean = sum nll / n``, so
it streams over result parts and never needs every token at once; its intervals resample
documents, as every lmeval interval does (tokens of one document are not independent).
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np

from .bootstrap import resampled_sums

# Log edges are laid out up to 2^48 tokens once, so every part bins against the same edges.
_LOG_OCTAVES = 48
# Dense (documents x bins) float64 columns handed to the bootstrap at a time.
_BLOCK_BYTES = 16 * 2**20


@functools.cache
def log_edges(bins_per_octave: int) -> np.ndarray:
    """Integer bin edges ``0, 1, round(2^(i/b)) ...`` (duplicates dropped), int64.

    Bin j holds values v with ``edges[j] <= v < edges[j + 1]``: with b = 1 that is [0, 1),
    [1, 2), [2, 4), [4, 8), ...; with b = 4 four bins per doubling once they are wider
    than one token.
    """
    powers = np.floor(2.0 ** (np.arange(_LOG_OCTAVES * bins_per_octave + 1) / bins_per_octave) + 0.5)
    return np.unique(np.concatenate([[0], powers]).astype(np.int64))


@dataclass(frozen=True)
class Bins:
    """How token positions (or context lengths) are binned: ``log`` (``bins_per_octave``
    bins per doubling, `log_edges`) or ``linear`` (bins of ``width`` tokens from 0)."""

    scheme: str = "log"
    bins_per_octave: int = 4
    width: int = 64

    def index(self, values: np.ndarray) -> np.ndarray:
        """The bin of each value (values are counts of tokens, >= 0)."""
        values = np.asarray(values, dtype=np.int64)
        if self.scheme == "linear":
            return values // self.width
        return np.searchsorted(log_edges(self.bins_per_octave), values, side="right") - 1

    def bounds(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[lo, hi)`` of each bin index."""
        index = np.asarray(index, dtype=np.int64)
        if self.scheme == "linear":
            return index * self.width, (index + 1) * self.width
        edges = log_edges(self.bins_per_octave)
        return edges[index], edges[index + 1]


# The dtype of each BinnedSums field: `_narrow` makes them, SpilledSums stores them as records.
ENTRY = np.dtype(
    [("doc", np.int32), ("bin", np.int32), ("n_tokens", np.int32), ("nll_sum", np.float64), ("value_sum", np.int64)]
)


@dataclass(frozen=True)
class BinnedSums:
    """Sparse per-(document, bin) sums: one entry per pair that holds tokens. ``doc``, ``bin``
    and ``n_tokens`` int32, ``value_sum`` (of the binned value itself, for the bin's mean
    position: a sum of integers, exact) int64, ``nll_sum`` [nats] float64: 28 bytes an entry.

    A run keeps every entry until its end (the document bootstrap needs each document's sums),
    about 80 entries a document at 4 bins an octave, so the entries are its one state that
    grows with the corpus: they are kept narrow (`ENTRY`) and, in a run, on disk (SpilledSums)."""

    doc: np.ndarray
    bin: np.ndarray
    n_tokens: np.ndarray
    nll_sum: np.ndarray
    value_sum: np.ndarray

    @staticmethod
    def concat(parts: list[BinnedSums]) -> BinnedSums:
        """The parts' entries as one, a (document, bin) pair met twice summed into one entry."""
        empty = [np.zeros(0, dtype=np.int64)]  # no parts: no entries (each field keeps its dtype otherwise)
        doc, bin_, n, s, v = (
            np.concatenate([getattr(p, f) for p in parts] or empty) for f in BinnedSums.__dataclass_fields__
        )
        doc, bin_ = doc.astype(np.int64), bin_.astype(np.int64)
        width = int(bin_.max()) + 1 if len(bin_) else 1
        keys, inverse = np.unique(doc * width + bin_, return_inverse=True)
        return _narrow(keys, width, inverse, n, s, v)


class SpilledSums:
    """BinnedSums appended to an unnamed temporary file instead of memory: a run's entries
    (about 80 a document, 28 bytes each: 67 MB at 50M tokens) wait there until its end, so
    the resident set does not grow with the corpus. `load` reads them back as one BinnedSums
    (pieces of a document still separate: `BinnedSums.concat` merges them)."""

    def __init__(self) -> None:
        # open for the run, closed by `close`; unnamed, so it is gone on exit whatever happens
        self.file = tempfile.TemporaryFile(prefix="lmeval-positions-")  # noqa: SIM115

    def append(self, sums: BinnedSums) -> None:
        records = np.empty(len(sums.doc), dtype=ENTRY)
        for name in BinnedSums.__dataclass_fields__:
            records[name] = getattr(sums, name)
        self.file.write(records.tobytes())

    def load(self) -> BinnedSums:
        self.file.seek(0)
        records = np.frombuffer(self.file.read(), dtype=ENTRY)
        self.file.seek(0, 2)  # appends go on at the end
        return BinnedSums(*(np.ascontiguousarray(records[name]) for name in BinnedSums.__dataclass_fields__))

    def close(self) -> None:
        self.file.close()


def binned_sums(
    doc_index: np.ndarray, values: np.ndarray, nll: np.ndarray, bins: Bins, doc_offset: int = 0
) -> BinnedSums:
    """Per-(document, bin) token counts and sums of ``nll`` (float64) for one part's tokens.
    ``doc_index`` is the part's document index; ``doc_offset`` makes it corpus-wide."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    b = bins.index(values)
    width = int(b.max()) + 1 if len(b) else 1
    keys, inverse = np.unique((doc_index + doc_offset) * width + b, return_inverse=True)
    return _narrow(keys, width, inverse, np.ones(len(b)), np.asarray(nll, dtype=np.float64), values)


def _narrow(keys: np.ndarray, width: int, inverse: np.ndarray, n, nll, value) -> BinnedSums:
    """Entries ``keys = doc * width + bin`` with the sums of the rows ``inverse`` maps to them,
    in BinnedSums' dtypes (counts and integer sums are exact in float64 below 2^53)."""
    if len(keys) and (keys[-1] // width >= 2**31 or width > 2**31):
        raise ValueError(f"positions: {keys[-1] // width + 1} documents or {width} bins exceed int32")
    return BinnedSums(
        doc=(keys // width).astype(ENTRY["doc"]),
        bin=(keys % width).astype(ENTRY["bin"]),
        n_tokens=np.bincount(inverse, weights=n, minlength=len(keys)).astype(ENTRY["n_tokens"]),
        nll_sum=np.bincount(inverse, weights=nll, minlength=len(keys)).astype(ENTRY["nll_sum"], copy=False),
        value_sum=np.rint(np.bincount(inverse, weights=value, minlength=len(keys))).astype(ENTRY["value_sum"]),
    )


def pooled_bins(sums: BinnedSums) -> dict[str, np.ndarray]:
    """Each non-empty bin, in order: ``bin``, ``n_tokens``, ``n_documents``, ``value_mean``,
    ``nll_sum`` and ``nll_mean = nll_sum / n_tokens`` [nats]."""
    used, inverse = np.unique(sums.bin, return_inverse=True)
    n = np.bincount(inverse, weights=sums.n_tokens, minlength=len(used))
    nll_sum = np.bincount(inverse, weights=sums.nll_sum, minlength=len(used))
    value_sum = np.bincount(inverse, weights=sums.value_sum, minlength=len(used))
    return {
        "bin": used,
        "n_tokens": n.astype(np.int64),
        "n_documents": np.bincount(inverse, minlength=len(used)).astype(np.int64),
        "value_mean": value_sum / n,
        "nll_sum": nll_sum,
        "nll_mean": nll_sum / n,
    }


def bin_intervals(
    groups: list[BinnedSums], n_docs: int, n_resamples: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """95% document-bootstrap percentile interval of each non-empty bin's ``nll_mean``, for
    each group of sums (one per axis), in `pooled_bins` order.

    All groups share one draw of ``n_docs`` documents per resample (`resampled_sums` with
    ``seed``), over every document of the corpus, including those without tokens in a bin.
    A resample holding no token of a bin says nothing about it and is left out of that
    bin's percentiles (``np.nanpercentile``); a bin with tokens from fewer than two
    documents gets NaN, since one document cannot show how documents vary.
    """
    cells = []  # (group, bin, rows of its entries)
    for g, sums in enumerate(groups):
        used, inverse = np.unique(sums.bin, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        for j, rows in enumerate(np.split(order, np.cumsum(np.bincount(inverse, minlength=len(used)))[:-1])):
            cells.append((g, j, rows))
    out = [(np.full(len(np.unique(s.bin)), np.nan), np.full(len(np.unique(s.bin)), np.nan)) for s in groups]
    cells = [c for c in cells if len(c[2]) >= 2]
    if n_resamples == 0 or n_docs == 0 or not cells:
        return out
    per_block = max(1, _BLOCK_BYTES // (16 * n_docs))
    for start in range(0, len(cells), per_block):
        block = cells[start : start + per_block]
        columns = np.zeros((n_docs, 2 * len(block)))  # (D, 2c): token counts, then nll sums
        for c, (g, _, rows) in enumerate(block):
            columns[groups[g].doc[rows], c] = groups[g].n_tokens[rows]
            columns[groups[g].doc[rows], len(block) + c] = groups[g].nll_sum[rows]
        boot = resampled_sums(columns, n_resamples, seed)  # (B, 2c); the same draw for every block
        counts, nll_sums = boot[:, : len(block)], boot[:, len(block) :]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, nll_sums / counts, np.nan)
        with warnings.catch_warnings():  # an all-empty column (vanishingly rare) is NaN, as meant
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(means, [2.5, 97.5], axis=0)
        for c, (g, j, _) in enumerate(block):
            out[g][0][j], out[g][1][j] = low[c], high[c]
    return out


# --------------------------------------------------------------------------------------
# The in-context-learning score (Olsson et al. 2022)
# --------------------------------------------------------------------------------------


def icl_window(center: int) -> tuple[int, int]:
    """The inclusive ``[lo, hi]`` of context lengths counted as "near" ``center``: +-10%."""
    return int(np.floor(0.9 * center + 0.5)), int(np.floor(1.1 * center + 0.5))


def window_sums(doc_index: np.ndarray, context_len: np.ndarray, nll: np.ndarray, window: tuple[int, int], n_docs: int):
    """Per-document (n_tokens, nll_sum) of the tokens whose context length lies in ``window``."""
    inside = (context_len >= window[0]) & (context_len <= window[1])
    d = np.asarray(doc_index)[inside]
    return (
        np.bincount(d, minlength=n_docs).astype(np.int64),
        np.bincount(d, weights=np.asarray(nll, dtype=np.float64)[inside], minlength=n_docs),
    )


def icl_score(early: tuple, late: tuple, n_resamples: int, seed: int) -> dict:
    """Mean NLL [nats] of the tokens in the late window minus that of the early window, over
    the documents with tokens in both (each document is its own control, as in Olsson et
    al.'s "loss at token 500 minus loss at token 50, averaged over examples"). Negative =
    the model predicts better with more context. Pooled from sums, with a 95% document-
    bootstrap interval. ``early`` and ``late`` are per-document (n_tokens, nll_sum)."""
    (n_e, s_e), (n_l, s_l) = early, late
    both = (np.asarray(n_e) > 0) & (np.asarray(n_l) > 0)
    result = {"icl_score": np.nan, "icl_ci_low": np.nan, "icl_ci_high": np.nan, "icl_documents": int(both.sum())}
    if not both.any():
        return result
    columns = np.column_stack([n_e[both], s_e[both], n_l[both], s_l[both]]).astype(np.float64)  # (D, 4)
    total = columns.sum(axis=0)
    result["icl_score"] = total[3] / total[2] - total[1] / total[0]
    if n_resamples and both.sum() >= 2:
        boot = resampled_sums(columns, n_resamples, seed)
        low, high = np.percentile(boot[:, 3] / boot[:, 2] - boot[:, 1] / boot[:, 0], [2.5, 97.5])
        result.update(icl_ci_low=float(low), icl_ci_high=float(high))
    return result
