"""Merge a run's parts into its tables, run.json and the comparison (rank 0, after scoring).

Each model's parts are read in corpus order; calibration, document and summary numbers are
pooled from the parts' sums, and the per-token rows stream into tokens.parquet a part at a
time, so a large corpus's tokens never sit in memory together.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import calibration as cal
from ..errors import OutputError
from ..analyses.analysis import ModelAnalysis, add_reference_ratio
from ..analyses.plots import plot_positions
from ..analyses.compare import compare_tables
from .compare_runs import write_compare
from .config import Config
from .data import Corpus
from .files import TokenWriter, write_figure, write_table
from .parts import PartError, read_part
from ..analyses.plots import plot_reliability
from .config import AnalysisConfig
from .provenance import fingerprint_model, versions
from .schemas import read_table, string_ids
from ..producers.tables import documents_frame, summary_row, tokens_frame

CALIBRATION_INPUTS = ["nll", "max_prob", "is_top1", "sum_q2", "mean_neg_logq", "entropy", "nll_t", "max_prob_t"]


@dataclass
class ModelTables:
    """One model's collected results (per-token rows stay on disk)."""

    documents: pd.DataFrame
    summary: dict
    calibration: pd.DataFrame
    temperature: pd.DataFrame
    bins: cal.ReliabilityBins
    protocol: dict
    positions: pd.DataFrame | None = None


def collect_model(name: str, corpus: Corpus, config: Config, paths: list[Path], token_sink) -> ModelTables:
    """Merge a model's parts, in corpus order: documents, pooled summary, calibration; each
    part's token rows go to ``token_sink`` so they never all sit in memory at once."""
    c = config.calibration
    sums, confidences, seconds, metas = None, [], 0.0, []
    analysis = ModelAnalysis(name, config.analysis)
    for path in paths:
        columns, meta = _read_checked(path)
        metas.append(meta)
        analysis.add(columns, meta)
        part_sums = cal.calibration_sums(
            *(columns[k] for k in CALIBRATION_INPUTS[:6]), eps_grid=c.label_smoothing, nll_t=columns.get("nll_t"),
            max_prob_t=columns.get("max_prob_t"), temperatures=c.temperatures, n_bins=c.bins,
        )  # fmt: skip
        sums = part_sums if sums is None else cal.merge_sums(sums, part_sums)
        if c.binning == "mass":
            confidences.append((columns["max_prob"], columns["is_top1"]))
        if token_sink is not None:
            token_sink(tokens_frame(name, string_ids(meta["doc_ids"]), columns))
        seconds += meta["seconds"]
    documents = analysis.documents(documents_frame(name, *_document_sums(metas)))
    summary = summary_row(name, documents, n_skipped=corpus.n_skipped, seconds=seconds)
    summary["n_documents"] = len(corpus.documents)
    protocol = metas[0]["protocol"]
    metrics = cal.summarize(sums, vocab_size=protocol["vocab_size"])
    bins = sums.bins
    if c.binning == "mass":
        conf, top1 = (np.concatenate(x) for x in zip(*confidences))
        bins = cal.reliability_bins(conf, top1, c.bins, scheme="mass")
        metrics.update(ece=cal.expected_calibration_error(bins), mce=cal.max_calibration_error(bins))
    summary.update(metrics)
    summary.update(analysis.summary())
    calibration, temperature = bins.to_frame(), cal.temperature_table(sums, c.temperatures)
    calibration.insert(0, "model", name)
    temperature.insert(0, "model", name)
    positions = analysis.positions() if config.analysis.positions else None
    return ModelTables(documents, summary, calibration, temperature, bins, protocol, positions)


PROTOCOL_NOTES = {
    "windows": "targets in spans of `stride` new tokens; each window holds at most `max_length` ids "
    "ending at its last target; every token is scored exactly once (stride = max_length is "
    "lm-evaluation-harness loglikelihood_rolling)",
    "normalisers": {
        "tokens": "scored tokens",
        "bytes": "UTF-8 bytes of the scored text (of the text before data.detokenizer when data.count_on is source)",
        "words": "len(re.split(r'\\s+', text)) per document, as lm-evaluation-harness counts them (same text as bytes)",
    },
    "aggregation": "pooled: ppl = exp(sum nll / sum tokens); never a mean of per-document ratios",
    "log_base": "nll in nats (natural log); *_bits and bits_per_* are nats / ln 2",
    # A run writes no word table: word_ppl is the token sum over lm-eval's word count.
    "word_correction": "none (word_ppl divides the token nll sum by the word count; corrected word "
    "surprisal, word_correction=bow, is in word tables: lmeval.surprisal_table(words=True), lmeval surprisal --words)",
    "text_end": None,
}




def _read_checked(path: Path) -> tuple[dict, dict]:
    """A part's columns and metadata; one that fails its checksum since the run began is
    removed and named, so that a rerun scores it again."""
    try:
        return read_part(path)
    except PartError as exc:
        path.unlink(missing_ok=True)
        raise OutputError(
            f"output.dir: result part {path} cannot be merged: {exc}. It has been removed; "
            "rerun the same command to score it again (every other part is kept)."
        ) from None


def _document_sums(metas: list[dict]) -> tuple[list[str], list, list, list, list]:
    """Per document, in corpus order: (ids, n_tokens, n_bytes, n_words, nll_sum), adding up
    the pieces of a document that was scored as several parts."""
    fields = ("doc_ids", "n_tokens", "n_bytes", "n_words", "nll_sum")
    rows = pd.DataFrame({k: list(itertools.chain.from_iterable(m[k] for m in metas)) for k in fields})
    rows["doc_ids"] = string_ids(rows["doc_ids"])
    if rows["doc_ids"].is_unique:  # no pieces: keep the float64 sums exactly as they were
        merged = rows
    else:
        merged = rows.groupby("doc_ids", sort=False, as_index=False).sum()
    return tuple(merged[k].tolist() for k in fields)


def check_parts_present(part_paths: dict[str, list[Path]], parts: Path) -> None:
    """Every part must be on disk before the merge (ranks of a multi-node job write to one folder)."""
    missing = [name for name, paths in part_paths.items() if not all(p.exists() for p in paths)]
    if missing:
        raise OutputError(
            f"output.dir: every result part must be in {parts} before the merge (parts of {', '.join(missing)} are missing). "
            "Every rank writes there: put `output.dir` on a file system all nodes share, then rerun to resume."
        )


def merge_tables(out: Path, config: Config, corpus: Corpus, part_paths: dict[str, list[Path]], return_tokens: bool) -> dict:
    """Every model's parts (``part_paths[name]``, in corpus order) merged into the run's tables,
    written to ``out``; the token table streams to disk a part at a time."""
    writer = TokenWriter(out / "tokens.parquet") if config.output.per_token else None
    results = []
    try:
        for model in config.models:
            sink = writer.write if writer else None
            results.append((model.name, collect_model(model.name, corpus, config, part_paths[model.name], sink)))
    except BaseException:
        if writer is not None:
            writer.abort()  # no temporary file left in the run folder
        raise
    if writer is not None:
        writer.close()
    tables = {
        "documents": add_reference_ratio(pd.concat([r.documents for _, r in results], ignore_index=True),
                                         config.analysis.reference),
        "summary": pd.DataFrame([r.summary for _, r in results]),
        "calibration": pd.concat([r.calibration for _, r in results], ignore_index=True),
        "temperature": pd.concat([r.temperature for _, r in results], ignore_index=True),
        "protocol": {name: r.protocol for name, r in results},
    }
    write_table(tables["documents"], out / "documents.parquet")
    for name in ("summary", "calibration", "temperature"):
        write_table(tables[name], out / f"{name}.csv")
    write_figure(plot_reliability({name: r.bins for name, r in results}), out / "reliability.png")
    positions = write_positions([r.positions for _, r in results], out, config.analysis)
    if positions is not None:
        tables["positions"] = positions
    if return_tokens and config.output.per_token:
        tables["tokens"] = read_table(out / "tokens.parquet")
    return tables


def write_comparison(out: Path, config: Config, tables: dict, record: dict) -> dict:
    """compare.csv (and the per-token diff) of every model against the baseline."""
    with_tokens = dict(tables)
    if "tokens" not in tables and (out / "tokens.parquet").exists():
        columns = ["model", "doc_id", "position", "token_id", "token", "nll", "char_start", "char_end"]
        with_tokens["tokens"] = pd.read_parquet(out / "tokens.parquet", columns=columns)
    frames = compare_tables(with_tokens, record, config.compare)
    write_compare(out, frames, tables["summary"])
    return frames


def run_record(config: Config, corpus: Corpus, tables: dict, seconds: float) -> dict:
    """run.json: the config, the protocol of each model, versions, fingerprints and timing."""
    summary = tables["summary"]
    protocols = tables.pop("protocol")
    return {
        "config": config.to_dict(),
        "protocol": {**PROTOCOL_NOTES, "models": protocols},
        "versions": versions(),
        "models": {m.name: {**fingerprint_model(m.path, m.revision), "commit_sha": protocols[m.name].get("commit_sha")}
                   for m in config.models},
        "data": {"path": config.data.path, "fingerprint": corpus.fingerprint,
                 "n_documents": len(corpus.documents), "n_skipped": corpus.n_skipped},
        "seconds": seconds,
        "tokens_per_second": dict(zip(summary.model, summary.tokens_per_second)),
    }  # fmt: skip


def write_positions(frames: list[pd.DataFrame], out: Path, options: AnalysisConfig) -> pd.DataFrame | None:
    """positions.csv and positions.png of every model (nothing with ``positions: false``)."""
    if not options.positions:
        return None
    table = pd.concat(frames, ignore_index=True)
    write_table(table, out / "positions.csv")
    if len(table):
        write_figure(plot_positions(table, log_x=options.position_bins == "log"), out / "positions.png")
    return table
