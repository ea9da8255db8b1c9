"""Documents and summary: per-document sums and the pooled corpus figures of each model.

Why: a corpus's perplexity is ``exp(sum nll / sum tokens)`` over every scored token, pooled,
never a mean of per-document ratios; bits per byte and word perplexity divide the same nll
sum by the UTF-8 bytes and lm-eval's word count of the scored text. Each part records its
documents' sums (``n_tokens``, ``nll_sum`` in nats, ``n_bytes``, ``n_words``); this analysis
adds them up per document (the pieces of a long document are one document) and pools once.
Owns ``documents.parquet``, ``summary.csv`` and, with ``output.per_token``, ``tokens.parquet``.

Each pooled metric of the summary gets a 95% document-bootstrap percentile interval
(``ppl_ci_low``, ``ppl_ci_high``, ...): documents, not tokens, are the independent units, and a
resample pools its documents' sums exactly as the point estimate does (`summary_intervals`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from ..core import memorization as mem
from ..core.bootstrap import bootstrap_interval, resampled_sums
from ..core.units import bits_per, perplexity, scored_count
from ..engine.config import CompareConfig
from ..producers.tables import normalisers, tokens_frame
from .base import TOKEN_PLACE, Analysis, ModelResult, Needs, Outputs, Part, RunFacts
from .compare import METRICS, metric_columns

DOCUMENT_COLUMNS = [
    "model",
    "doc_id",
    "n_tokens",
    "n_bytes",
    "n_words",
    "nll_sum",
    "ppl",
    "bits_per_token",
    "bits_per_byte",
]


SUM_FIELDS = ("doc_ids", "n_tokens", "n_bytes", "n_words", "nll_sum")
# The columns a tokens.parquet row is built from (`tokens_frame`).
TOKEN_TABLE_INPUTS = TOKEN_PLACE | {
    "nll",
    "entropy",
    "max_prob",
    "is_top1",
    "rank",
    "sum_q2",
    "mean_neg_logq",
}


class DocumentsAnalysis(Analysis):
    """documents.parquet, summary.csv and (``per_token``) tokens.parquet."""

    name = "documents"

    def __init__(self, per_token: bool, reference: str | None = None, compare=None):
        self.per_token, self.reference = per_token, reference
        self.compare = compare  # the config's `compare` section: the intervals' resamples, seed and min_documents
        self.token_file = "tokens.parquet" if per_token else None

    def needs(self) -> Needs:
        return Needs(token_columns=TOKEN_TABLE_INPUTS if self.per_token else frozenset())

    def text_facts(self, texts: list[str]) -> dict:
        n_bytes, n_words = normalisers(texts)
        return {"n_bytes": n_bytes, "n_words": n_words}

    def start(self, model: str):
        return {"rows": [], "seconds": 0.0}

    def update(self, state, part: Part):
        state["rows"].append([part.meta[k] for k in SUM_FIELDS])
        state["seconds"] += part.meta["seconds"]
        return state

    def merge(self, state, later):
        return {"rows": state["rows"] + later["rows"], "seconds": state["seconds"] + later["seconds"]}

    def token_rows(self, part: Part):
        return tokens_frame(part.model, part.doc_ids, part.columns) if self.per_token else None

    def finish(self, model: str, state, run: RunFacts) -> ModelResult:
        documents = documents_frame(model, *_document_sums(state["rows"]))
        summary = summary_row(model, documents, n_skipped=run.n_skipped, seconds=state["seconds"])
        summary["n_documents"] = run.n_documents
        c = self.compare or CompareConfig()
        summary.update(summary_intervals(documents, c.bootstrap, c.seed, c.min_documents))
        return ModelResult(summary=summary, tables={"documents": documents})

    def outputs(self, results: dict, run: RunFacts) -> Outputs:
        """The engine has added every analysis's per-document columns to each model's rows."""
        documents = add_reference_ratio(
            pd.concat([r.tables["documents"] for r in results.values()], ignore_index=True), self.reference
        )
        summary = pd.DataFrame([r.summary for r in results.values()])
        return Outputs(
            files={"documents.parquet": documents, "summary.csv": summary},
            tables={"documents": documents, "summary": summary},
        )


def _document_sums(rows: list[list]) -> tuple[list[str], list, list, list, list]:
    """Per document, in corpus order: (ids, n_tokens, n_bytes, n_words, nll_sum), adding up
    the pieces of a document that was scored as several parts."""
    frame = pd.DataFrame({k: list(itertools.chain.from_iterable(r[i] for r in rows)) for i, k in enumerate(SUM_FIELDS)})
    frame["doc_ids"] = [str(d) for d in frame["doc_ids"]]  # ids as the tables store them
    if not frame["doc_ids"].is_unique:  # pieces: one row per document (unique ids keep their float64 sums as they were)
        frame = frame.groupby("doc_ids", sort=False, as_index=False).sum()
    return tuple(frame[k].tolist() for k in SUM_FIELDS)


def add_reference_ratio(documents: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """Every model's documents with ``ref_ratio`` against the ``reference`` model's rows
    (matched by doc_id; 1 for the reference itself). Unchanged without a reference."""
    if reference is None:
        return documents
    ref = documents[documents["model"] == reference].set_index("doc_id")
    ref_nll = documents["doc_id"].map(ref["nll_sum"])
    ref_bytes = documents["doc_id"].map(ref["n_bytes"])
    ratio = mem.reference_ratio(documents["nll_sum"], documents["n_bytes"], ref_nll, ref_bytes)
    return documents.assign(ref_ratio=ratio)


def documents_frame(model_name: str, doc_ids: list, n_tokens, n_bytes, n_words, nll_sum) -> pd.DataFrame:
    """One row per document: its sums and counts, and ratios pooled within it."""
    rows = pd.DataFrame(
        {
            "model": model_name,
            "doc_id": pd.Series(doc_ids, dtype=object),
            "n_tokens": np.asarray(n_tokens, dtype=np.int64),
            "n_bytes": np.asarray(n_bytes, dtype=np.int64),
            "n_words": np.asarray(n_words, dtype=np.int64),
            "nll_sum": np.asarray(nll_sum, dtype=np.float64),
        }
    )
    rows["ppl"] = [perplexity(s, n) for s, n in zip(rows.nll_sum, rows.n_tokens)]
    rows["bits_per_token"] = [bits_per(s, n) for s, n in zip(rows.nll_sum, rows.n_tokens)]
    rows["bits_per_byte"] = [
        bits_per(s, scored_count(n, t)) for s, n, t in zip(rows.nll_sum, rows.n_bytes, rows.n_tokens)
    ]
    return rows


def summary_row(model_name: str, documents: pd.DataFrame, n_skipped: int = 0, seconds: float | None = None) -> dict:
    """Pooled corpus metrics for one model, from the per-document sums."""
    nll_sum = float(documents["nll_sum"].sum())
    n_tokens = int(documents["n_tokens"].sum())
    n_bytes = int(documents["n_bytes"].sum())
    n_words = int(documents["n_words"].sum())
    row = {
        "model": model_name,
        "n_documents": len(documents),
        "n_skipped": n_skipped,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_words": n_words,
        "nll_sum": nll_sum,
        "nll_mean": nll_sum / n_tokens if n_tokens else math.nan,
        "ppl": perplexity(nll_sum, n_tokens),
        "bits_per_token": bits_per(nll_sum, n_tokens),
        "bits_per_byte": bits_per(nll_sum, scored_count(n_bytes, n_tokens)),
        "word_ppl": perplexity(nll_sum, scored_count(n_words, n_tokens)),
        "byte_ppl": perplexity(nll_sum, scored_count(n_bytes, n_tokens)),
        "ppl_doc_mean": ppl_doc_mean(documents),
    }
    if seconds is not None:
        row["tokens_per_second"] = n_tokens / seconds if seconds > 0 else math.nan
    return row


INTERVAL_METRICS = ("ppl", "bits_per_token", "bits_per_byte", "word_ppl")


def summary_intervals(documents: pd.DataFrame, n_resamples: int, seed: int, min_documents: int) -> dict:
    """``{metric}_ci_low``, ``{metric}_ci_high`` for each of `INTERVAL_METRICS`, and
    ``n_resamples``: the 95% percentile interval of the pooled metric over ``n_resamples``
    bootstrap resamples of the documents (`resampled_sums`: each resample's nll and count sums,
    pooled with one division, as the point estimate). Documents are drawn in doc_id order, so
    the interval does not depend on the corpus's order. NaN with fewer than ``min_documents``
    documents, where a percentile interval is far too narrow, and with ``n_resamples`` 0."""
    specs = [METRICS[name] for name in INTERVAL_METRICS]
    enough = len(documents) >= max(min_documents, 1) and n_resamples > 0
    names, columns = metric_columns(documents.sort_values("doc_id", kind="stable"), specs)  # (D, k)
    boot = resampled_sums(columns, n_resamples if enough else 0, seed)  # (B, k)
    row: dict = {}
    for spec in specs:
        draws = spec.pooled(boot[:, 0], boot[:, names.index(spec.count)])  # (B,)
        low, high, _ = bootstrap_interval(draws[np.isfinite(draws)])  # NaN from no resamples
        row[f"{spec.name}_ci_low"], row[f"{spec.name}_ci_high"] = low, high
    row["n_resamples"] = n_resamples if enough else 0
    return row


def ppl_doc_mean(documents: pd.DataFrame) -> float:
    """The mean over documents of each document's own perplexity (HF evaluate's
    ``mean_perplexity``). Not lmeval's ``ppl``: a mean of ratios weighs a ten-token document
    like a ten-thousand-token one, so it is shown only under this name, beside the pooled
    value. Documents with no scored token have no perplexity and are left out (NaN if none)."""
    scored = documents[documents["n_tokens"] > 0]
    if not len(scored):
        return math.nan
    per_document = np.exp(scored["nll_sum"].to_numpy(np.float64) / scored["n_tokens"].to_numpy(np.float64))
    return float(per_document.mean())
