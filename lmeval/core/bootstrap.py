"""The document bootstrap: resampled sums and percentile intervals. Pure numpy.

Documents, not tokens, are the independent units of a corpus (tokens of one document share
its topic and style), so every interval lmeval reports resamples documents. A resample
recomputes a pooled figure from resampled SUMS, dividing once at the end, exactly as the
point estimate is pooled.
"""

from __future__ import annotations

import tempfile
from typing import IO

import numpy as np

# Elements of the (n_resamples, n_docs) index matrix drawn at a time: 2 MB of int64, and as
# much again for each temporary of the counts. Small on purpose: freed blocks of tens of MB
# stay in the heap (glibc raises its mmap threshold to them), so larger chunks raised the peak
# resident set of a 31,000-document run by 170 MB; the same stream whatever the size.
_CHUNK_ELEMENTS = 1 << 18
# Fewer documents than this get no interval or p-value: resampling 1 document always redraws
# it (an interval of zero width, p = 2 / (B + 1)), and with a handful the resamples take only
# a few distinct values, so the percentile interval is far too narrow and p far too small.
MIN_DOCUMENTS = 10


def resampled_sums(columns, n_resamples: int, seed: int) -> np.ndarray:
    """Column sums over bootstrap resamples of the rows (documents): shape (n_resamples, k).

    The draw is exactly ``np.random.default_rng(seed).integers(0, n_docs, size=(n_resamples,
    n_docs))``: row r lists the documents (with repetition) of resample r. It is drawn in
    blocks of rows to bound memory; numpy's generator yields the identical stream either way.
    """
    columns = np.asarray(columns, dtype=np.float64)  # (D, k)
    n_docs, k = columns.shape
    # 0 * inf is NaN: non-finite entries (an infinite nll) join only the resamples that draw them.
    is_finite = np.isfinite(columns)
    bad = np.argwhere(~is_finite)
    finite = np.where(is_finite, columns, 0.0) if len(bad) else columns
    out = np.empty((n_resamples, k))
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n_docs, 1))
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        index = rng.integers(0, n_docs, size=(stop - start, n_docs))  # (b, D)
        counts = draw_counts(index, n_docs)
        out[start:stop] = counts @ finite  # (b, D) @ (D, k): no (b, D, k) gather
        for d, j in bad:
            out[start:stop, j][counts[:, d] > 0] += columns[d, j]
    return out


def draw_counts(index: np.ndarray, n_docs: int) -> np.ndarray:
    """How often each document is drawn in each resample: ``(b, D)`` float64 from the
    ``(b, D)`` index rows, so that a resample's sums are one matrix product."""
    b = len(index)
    flat = (index + (np.arange(b) * n_docs)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n_docs).reshape(b, n_docs).astype(np.float64)


def bootstrap_interval(deltas: np.ndarray) -> tuple[float, float, float]:
    """95% percentile interval and two-sided bootstrap p-value of resampled deltas.

    ``ci_low, ci_high`` are ``np.percentile(deltas, [2.5, 97.5])`` (linear interpolation).
    ``p = min(1, 2 * min((1 + #{delta* <= 0}) / (B + 1), (1 + #{delta* >= 0}) / (B + 1)))``:
    the smallest two-sided level at which the percentile interval excludes 0, with the +1
    correction so that p is never 0 from a finite B (its floor is 2 / (B + 1)). All deltas 0
    (a model against itself) gives p = 1. NaN everywhere when B = 0.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    if len(deltas) == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = np.percentile(deltas, [2.5, 97.5])
    b = len(deltas)
    below = (1 + np.count_nonzero(deltas <= 0)) / (b + 1)
    above = (1 + np.count_nonzero(deltas >= 0)) / (b + 1)
    return float(low), float(high), float(min(1.0, 2 * min(below, above)))


class DocumentRows:
    """Per-document float64 rows of ``width`` sums, for a document bootstrap at a run's end.

    A part's rows stay in memory (`add`); the running state moves them to an unnamed temporary
    file (`absorb`), so the resident set does not grow with the corpus (48 columns are 384 bytes
    a document). `canonical` reads them back once, the pieces of a document summed into one
    row, in doc_id order: the order every lmeval bootstrap draws documents in, so intervals do
    not depend on the order of the corpus and figures resampled together stay paired.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.doc_ids: list[str] = []
        self.pending: list[np.ndarray] = []  # rows not yet on disk: (n, width) each
        self.file: IO[bytes] | None = None

    def add(self, doc_ids, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.width)
        if len(rows) != len(doc_ids):
            raise ValueError(f"DocumentRows.add: {len(rows)} rows for {len(doc_ids)} documents")
        self.doc_ids.extend(map(str, doc_ids))
        self.pending.append(rows)

    def absorb(self, later: DocumentRows) -> DocumentRows:
        """``later``'s rows after this one's, written to this one's file; returns self."""
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="lmeval-documents-")  # noqa: SIM115 (closed by canonical)
        for rows in [*self.pending, *later._read_all()]:
            self.file.write(np.ascontiguousarray(rows).tobytes())
        self.pending = []
        self.doc_ids += later.doc_ids
        return self

    def _read_all(self) -> list[np.ndarray]:
        """Every row, file first, then pending; the file is closed: a last use."""
        rows = list(self.pending)
        if self.file is not None:
            self.file.seek(0)
            rows.insert(0, np.frombuffer(self.file.read(), dtype=np.float64).reshape(-1, self.width))
            self.file.close()
            self.file = None
        return rows

    def canonical(self) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids sorted, their rows ``(D, width)`` with pieces summed). A last use."""
        rows = self._read_all()
        stacked = np.concatenate(rows) if rows else np.zeros((0, self.width))
        ids, inverse = np.unique(np.array(self.doc_ids, dtype=object).astype(str), return_inverse=True)
        out = np.zeros((len(ids), self.width))
        if len(ids) == len(stacked):  # no pieces: a permutation, exactly the rows
            out[inverse.ravel()] = stacked
        else:
            np.add.at(out, inverse.ravel(), stacked)
        return ids, out
