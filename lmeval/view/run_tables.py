"""A finished run folder's tables, read for the report (`lmeval.view.report`).

Only what a run wrote is read, never recomputed: run.json marks a finished run, summary.csv
is required, every other table is optional and its section is left out when it is absent.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..engine.config import step_number
from ..errors import LmevalError, OutputError

log = logging.getLogger(__name__)

OPTIONAL_CSV = (
    "compare",
    "compare_documents",
    "compare_tokens",
    "calibration",
    "temperature",
    "positions",
    "groups",
    "divergence",
    "divergence_tokens",
)


@dataclass
class RunTables:
    """One run folder: its name, run.json, and each table it has (absent tables are missing keys)."""

    folder: Path
    record: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tokens_path: Path | None = None  # tokens.parquet, when the run kept token rows in one file

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def step(self) -> int | None:
        """The checkpoint step in the folder's name (its last run of digits: step-1000, ckpt_2000), if any."""
        step = step_number(self.name)[0]
        return step if step >= 0 else None

    def has(self, name: str) -> bool:
        return name in self.tables and not self.tables[name].empty


def read_run(folder: str | Path) -> RunTables:
    """The tables of a finished run in ``folder``, with errors that name the file and the fix."""
    folder = Path(folder)
    record_path = folder / "run.json"
    if not record_path.is_file():
        raise OutputError(
            f"report: {folder} must hold a finished run (got no run.json there). Point it at an `output.dir` "
            "that `lmeval run` completed, or rerun that config to finish it."
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"report: {record_path} must be the JSON lmeval wrote (got {exc}). Rerun the config."
        ) from exc
    run = RunTables(folder, record)
    run.tables["summary"] = _read(folder / "summary.csv")
    for name in OPTIONAL_CSV:
        if (folder / f"{name}.csv").exists():
            run.tables[name] = _read(folder / f"{name}.csv")
    if (folder / "documents.parquet").exists():
        run.tables["documents"] = _read(folder / "documents.parquet")
    tokens = folder / "tokens.parquet"
    if tokens.is_file():  # read later, only the sampled documents' rows (a `tokens/` dataset is not read)
        run.tokens_path = tokens
    return run


def read_tokens(path: Path, doc_ids: list[str] | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """Rows of a token table: only ``doc_ids``' (read with a filter, so a large table is never
    loaded whole) and only ``columns``."""
    import pyarrow.parquet as pq

    filters = [("doc_id", "in", doc_ids)] if doc_ids is not None else None
    try:
        return pq.read_table(path, columns=columns, filters=filters).to_pandas()
    except (OSError, ValueError) as exc:
        raise OutputError(f"report: {path} must be the table lmeval wrote (got {exc}). Rerun the config.") from exc


def token_rows(path: Path) -> int:
    """How many rows a token table has, from its footer."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise OutputError(
            f"report: the run folder must hold {path.name} (got none in {path.parent}). Rerun the config."
        )
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        table = pd.read_csv(path)
        # text columns as written: a token that is a space, or a doc id "NA", is not a missing value
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in table.columns:
            if not pd.api.types.is_numeric_dtype(table[column]):
                table[column] = text[column]
        return table
    except (OSError, ValueError) as exc:
        raise OutputError(f"report: {path} must be the table lmeval wrote (got {exc}). Rerun the config.") from exc


def run_texts(run: RunTables) -> Callable[[str], str | None] | None:
    """doc_id -> text, read from the corpus the run's config (in run.json) names, so that a token
    view shows the text under each token's span; None where documents were concatenated (spans
    point into the stream) or streamed. The corpus is read on the first call only (a run whose
    page embeds no token view never reads it); where it cannot be read here (moved, a hub dataset
    offline), every text is None and the views show each token as the tokenizer spells it."""
    from ..engine.config import SECTIONS, build_config
    from ..engine.data import load_documents

    try:  # run.json's config also records where it came from (`source`): not a section
        config = build_config({k: v for k, v in run.record["config"].items() if k in ("models", *SECTIONS)}, run.folder)
    except (LmevalError, KeyError, ValueError) as exc:
        log.info(
            "report: the config in %s/run.json is not readable here (%s); token views show the tokens.", run.folder, exc
        )
        return None
    if config.data.streaming or config.scoring.documents != "independent":
        return None

    @functools.cache
    def texts() -> dict[str, str]:
        try:
            corpus = load_documents(config.data)
        except (LmevalError, OSError, ValueError) as exc:
            log.info(
                "report: the corpus of %s is not readable here (%s); token views show the tokens.", run.folder, exc
            )
            return {}
        return {str(d.doc_id): d.text for d in corpus.documents}

    return lambda doc_id: texts().get(doc_id)
