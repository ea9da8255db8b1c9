"""The merge keeps pace with scoring: each model's parts fold into the analyses' states in
corpus order as they finish, and their token rows are appended to the token tables then.

`Merger.add` takes a part just scored, in memory; a part that cannot fold yet (an earlier
one is another rank's and not written yet) is dropped from memory and read back from disk
when its turn comes, so out-of-order parts wait on disk, never in memory. Finished parts of
an interrupted run are read from disk at their turn. After the last part, `Merger.finish`
only closes the token files and asks each analysis for its tables and figures: work that
grows with the number of documents and bins, not with the number of tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..analyses.base import Part, RunFacts
from ..analyses.compare import compare_tables
from ..errors import OutputError
from .compare_runs import write_compare
from .config import Config
from .data import Corpus
from .files import rewrite_table, token_layout, token_writer, write_figure, write_table
from .memory import release_free_memory
from .parts import PartError, read_part
from .prefetch import prefetched
from .provenance import fingerprint_model, versions


def layout_of(config: Config, corpus: Corpus | None) -> tuple[str, str]:
    """How a run writes its token tables (`files.token_layout`); ``corpus`` None: a stream."""
    return token_layout(config.output.tokens_layout, None if corpus is None else int(corpus.lengths.sum()))


class Merger:
    """Folds every model's parts, in config order then corpus order, into the analyses."""

    def __init__(
        self,
        out: Path | None,
        analyses: tuple,
        paths: Mapping[str, Sequence[Path | None]],
        layout: tuple[str, str] = ("file", "output.tokens_layout: file"),
    ):
        """``paths[model]``: each part's file in corpus order (None: a part that only ever
        exists in memory, as in the in-loop evaluator). ``layout``: how the token tables are
        written, one file or a folder of one file per part, and why (`files.token_layout`)."""
        self.analyses, self.paths = analyses, paths
        self.order = [(model, i) for model, files in paths.items() for i in range(len(files))]
        self.cursor = 0
        self.states = {model: {a.name: a.start(model) for a in analyses} for model in paths}
        self.protocols: dict[str, dict] = {}
        files = sorted({a.token_file for a in analyses if a.token_file})
        self.layout = layout
        self.writers = {name: token_writer(out, name, layout[0]) for name in files} if out is not None else {}
        # table -> model -> each part's (file, first row, stop) in that table, for readers that pair parts
        self.row_ranges: dict[str, dict[str, list[tuple[Path, int, int]]]] = {name: {} for name in self.writers}

    def extend(self, model: str, paths: Sequence[Path]) -> None:
        """More parts of ``model``, planned as a stream is read (`engine.stream`): they come after
        every part already in the order, so a stream's passes extend it model by model."""
        files = self.paths[model]
        assert isinstance(files, list)  # a stream's merger starts from empty lists
        self.order.extend((model, i) for i in range(len(files), len(files) + len(paths)))
        files.extend(paths)

    def add(self, model: str, index: int, part: Part) -> None:
        """A part just scored: folded now if it is next, else left on disk for its turn."""
        if self.cursor < len(self.order) and self.order[self.cursor] == (model, index):
            self._fold(part)
            self.cursor += 1
        self.fold_ready()

    def fold_ready(self, final: bool = False) -> None:
        """Fold the parts already on disk that come next; with ``final``, every one must be
        there, and each is read while the one before it folds (a merge of finished shards)."""
        if final:
            rest = [(model, self._required(model, index)) for model, index in self.order[self.cursor :]]
            for (model, _), read in prefetched(rest, lambda item: _read_checked(item[1])):
                self._fold_read(model, *read)
            return
        while self.cursor < len(self.order):
            model, index = self.order[self.cursor]
            path = self.paths[model][index]
            if path is None or not path.exists():
                return
            self._fold_read(model, *_read_checked(path))

    def _required(self, model: str, index: int) -> Path:
        path = self.paths[model][index]
        if path is None:  # a bug in the caller, not the user's: keeps its traceback
            raise RuntimeError(f"merge: in-memory part {index} of {model} was never added.")
        if not path.exists():
            raise OutputError(
                f"output.dir: every result part must be in {path.parent.parent} before the merge (parts of "
                f"{model} are missing). Every rank writes there: put `output.dir` on a file system all "
                "nodes share, then rerun to resume."
            )
        return path

    def _fold_read(self, model: str, columns: dict, meta: dict) -> None:
        self._fold(Part(model, [str(d) for d in meta["doc_ids"]], columns, meta))
        self.cursor += 1

    def _fold(self, part: Part) -> None:
        self.protocols.setdefault(part.model, part.meta["protocol"])
        states = self.states[part.model]
        for analysis in self.analyses:
            state = analysis.update(analysis.start(part.model), part)  # this part's state, merged in
            states[analysis.name] = analysis.merge(states[analysis.name], state)
            rows = analysis.token_rows(part) if analysis.token_file in self.writers else None
            if rows is None:  # rows the merged state completed (words across parts), taken out of it
                rows = analysis.state_rows(states[analysis.name])
            if rows is not None and analysis.token_file in self.writers:
                self._write_rows(analysis.token_file, part.model, rows)

    def _write_rows(self, name: str, model: str, rows: pd.DataFrame) -> None:
        self.row_ranges[name].setdefault(model, []).append(self.writers[name].write(rows))

    def finish(self, run: RunFacts) -> tuple[dict, dict, dict]:
        """(files, tables, record additions) of every analysis, the token tables closed."""
        self.fold_ready(final=True)
        release_free_memory(force=True)  # scoring's freed memory, before the tables allocate theirs
        for writer in self.writers.values():
            writer.close()
        results = {a.name: {m: a.finish(m, self.states[m][a.name], run) for m in self.states} for a in self.analyses}
        for analysis in self.analyses:  # columns that needed the whole corpus first
            transform = analysis.second_pass(results[analysis.name]) if analysis.token_file in self.writers else None
            if transform is not None:
                rewrite_table(self.writers[analysis.token_file].path, transform)
        _gather_into_documents(results)
        files, tables, record = {}, {}, {}
        for analysis in self.analyses:
            outputs = analysis.outputs(results[analysis.name], run)
            files.update(outputs.files)
            tables.update(outputs.tables)
            record.update(outputs.record)
        if self.writers:
            record["tokens_layout"] = {
                "layout": self.layout[0],
                "why": self.layout[1],
                "tables": {name: writer.path.name for name, writer in self.writers.items()},
            }
        return files, tables, record

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()  # no temporary file left in the run folder


def _gather_into_documents(results: dict) -> None:
    """Each analysis's summary fields and per-document columns join the documents analysis's
    rows (it writes documents.parquet and summary.csv), in the analyses' tuple order."""
    for model, result in results["documents"].items():
        frame = result.tables["documents"]
        for name, by_model in results.items():
            if name != "documents":
                result.summary.update(by_model[model].summary)
            if by_model[model].documents:
                frame = frame.assign(**by_model[model].documents)
        result.tables["documents"] = frame


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


def write_outputs(out: Path, files: dict) -> None:
    """Every analysis's files: DataFrames by suffix (parquet under its schema, or CSV), figures as PNG."""
    for name, value in files.items():
        if isinstance(value, pd.DataFrame):
            write_table(value, out / name)
        else:
            write_figure(value, out / name)


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
    # A run writes no word table: word_ppl is the token sum over lm-eval's word count, so no
    # word-boundary convention enters its numbers (word tables record theirs in their attrs).
    "word_correction": "none (word_ppl divides the token nll sum by the word count; corrected word "
    "surprisal, word_correction=bow, is in word tables: lmeval.surprisal_table(words=True), lmeval surprisal --words, "
    "whose attrs record text_end and word_boundary)",
    "text_end": None,
    "word_boundary": None,
}


def write_comparison(out: Path, config: Config, tables: dict, record: dict, row_ranges: dict | None = None) -> dict:
    """compare.csv (and the per-token diff) of every model against the baseline. The token
    diff reads the token table one part of each model at a time (``row_ranges``: where the
    merge wrote each part's rows), never the whole table."""
    chunks = None
    if "tokens" not in tables and row_ranges:
        chunks = part_pairs(row_ranges)
    frames = compare_tables(tables, record, config.compare, token_chunks=chunks)
    write_compare(out, frames, tables["summary"])
    return frames


TOKEN_DIFF_INPUTS = ["model", "doc_id", "position", "token_id", "token", "nll", "char_start", "char_end"]


def part_pairs(row_ranges: dict[str, list[tuple[Path, int, int]]]):
    """``token_chunks`` of `compare_tables` over a token table: part i of the model with part i
    of the baseline (every model's parts hold the same documents: the plan comes from the
    corpus alone). A part's rows are whole row groups of their file, since each part was one
    write (one row group of the table's file, or a file of its dataset folder)."""
    opened: dict[Path, tuple[pq.ParquetFile, np.ndarray]] = {}

    def rows(path: Path, start: int, stop: int) -> pd.DataFrame:
        if path not in opened:  # one file holds every part, or each part its own: keep the pair's two open
            if len(opened) == 2:
                opened.pop(next(iter(opened)))
            parquet = pq.ParquetFile(path)
            groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            opened[path] = parquet, np.cumsum([0, *groups])
        parquet, starts = opened[path]
        first, end = np.searchsorted(starts, [start, stop])  # the row groups starting in [start, stop)
        return parquet.read_row_groups(range(first, end), columns=TOKEN_DIFF_INPUTS).to_pandas()

    def chunks(model: str, baseline: str):
        for mine, theirs in zip(row_ranges[model], row_ranges[baseline], strict=True):
            yield rows(*mine), rows(*theirs)

    return chunks


def chunk_notes(config: Config) -> dict:
    """The preset's name and, under ``scoring.windows: chunks``, what replaces the window note."""
    notes: dict = {"preset": config.preset} if config.preset else {}
    if config.scoring.windows == "chunks":
        notes["windows"] = (
            "disjoint chunks of `max_length` ids from the start (a shorter remainder dropped); in each, the first "
            "`chunk_context` ids only condition and the rest are scored; with chunk_bos the first id is the BOS "
            "(lmeval.core.windows.Chunks)"
        )
        notes["normalisers"] = {
            "tokens": "scored tokens",
            "bytes": "none: bits_per_byte and byte_ppl are NaN (a dropped remainder and unscored chunk heads)",
            "words": "none: word_ppl is NaN (the same reason)",
        }
    return notes


def word_notes(config: Config) -> dict:
    """With ``analysis.words``, the word convention of words.parquet replaces the null notes."""
    a = config.analysis
    if not a.words:
        return {}
    return {
        "word_correction": "bow: words.parquet's surprisal_bits is the corrected word surprisal (Pimentel & Meister "
        "2024), surprisal_bits_token_sum the plain token sum beside it; word_ppl still divides the token nll sum by "
        "the word count",
        "text_end": a.text_end,
        "word_boundary": a.word_boundary,
    }


def run_record(config: Config, corpus: Corpus, protocols: dict, summary: pd.DataFrame, seconds: float) -> dict:
    """run.json: the config, the protocol of each model, versions, fingerprints and timing."""
    return {
        "config": config.to_dict(),
        "protocol": {**PROTOCOL_NOTES, **chunk_notes(config), **word_notes(config), "models": protocols},
        "versions": versions(),
        "models": {
            m.name: {**fingerprint_model(m.path, m.revision), "commit_sha": protocols[m.name].get("commit_sha")}
            for m in config.models
        },
        "data": {
            "path": config.data.path,
            "fingerprint": corpus.fingerprint,
            "n_documents": len(corpus.documents),
            "n_skipped": corpus.n_skipped,
        },
        "seconds": seconds,
        "tokens_per_second": dict(zip(summary.model, summary.tokens_per_second)),
    }
