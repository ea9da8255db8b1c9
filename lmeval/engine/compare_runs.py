"""Comparing earlier runs without rescoring: read finished run folders, refuse ones that are
not comparable, compare them as a run would (`lmeval.analyses.compare`), and write the files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from ..analyses.compare import _baseline, _model_names, compare_tables, protocol_differences
from ..analyses.plots import plot_checkpoints
from ..errors import DataError
from .config import CompareConfig
from .files import token_table, write_figure, write_table

# --------------------------------------------------------------------------------------
# Comparing earlier runs without rescoring
# --------------------------------------------------------------------------------------


def read_run(run_dir) -> dict:
    """A finished run folder's record (run.json) and tables; ``tokens`` is None when the run
    wrote no token table (output.per_token: false); a tokens/ folder is read as one table."""
    folder = Path(run_dir)
    needed = [folder / "run.json", folder / "documents.parquet", folder / "summary.csv"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise DataError(
            f"compare: {folder} must be a finished lmeval run folder (got no {', '.join(missing)}). "
            "Pass the output.dir of an `lmeval run`."
        )
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"compare: {folder / 'run.json'} must be valid JSON (got {exc}). Rerun `lmeval run`.") from None
    tokens_path = token_table(folder, "tokens.parquet")
    return {
        "dir": str(folder),
        "record": record,
        "documents": pd.read_parquet(folder / "documents.parquet"),
        "summary": pd.read_csv(folder / "summary.csv"),
        "tokens": pd.read_parquet(tokens_path) if tokens_path is not None else None,
    }


def check_runs_comparable(runs: list[dict]) -> None:
    """Refuse runs that scored different data, under different protocols, or reuse a name."""
    owner: dict[str, str] = {}  # model name -> the run that holds it
    for run in runs:
        for name in run["record"]["protocol"]["models"]:
            if name in owner:
                raise DataError(
                    f"compare: model names must be unique across runs (got {name!r} in {owner[name]} and {run['dir']}). "
                    "Give the models distinct `name:` values in their configs and rerun one of them."
                )
            owner[name] = run["dir"]
    first = runs[0]
    fingerprint = first["record"]["data"].get("fingerprint")
    ids = set(first["documents"]["doc_id"])
    ref_name, ref = next(iter(first["record"]["protocol"]["models"].items()))
    for run in runs[1:]:
        other = run["record"]["data"].get("fingerprint")
        if other != fingerprint:
            raise DataError(
                f"compare: data fingerprint must be equal across runs (got {str(fingerprint)[:12]}… in {first['dir']} "
                f"vs {str(other)[:12]}… in {run['dir']}). Score every model on the same corpus."
            )
        if set(run["documents"]["doc_id"]) != ids:
            raise DataError(
                f"compare: document ids must be equal across runs (got {len(ids)} in {first['dir']} vs "
                f"{run['documents']['doc_id'].nunique()} in {run['dir']}). Score every model on the same documents."
            )
    for run in runs:
        for name, protocol in run["record"]["protocol"]["models"].items():
            differences = protocol_differences(protocol, ref)
            if differences:
                raise DataError(
                    f"compare: the scoring protocol must match across runs, but model {name!r} in {run['dir']} differs "
                    f"from {ref_name!r} in {first['dir']} ({'; '.join(differences)}). Rerun one of them with the "
                    f"same scoring.{differences[0].split(':')[0]}."
                )


def merge_runs(runs: list[dict]) -> tuple[dict, dict]:
    """One set of tables and one record holding every run's models, as if scored together."""
    tokens = [r["tokens"] for r in runs]
    tables = {
        "documents": pd.concat([r["documents"] for r in runs], ignore_index=True),
        "summary": pd.concat([r["summary"] for r in runs], ignore_index=True),
        "tokens": None if any(t is None for t in tokens) else pd.concat(tokens, ignore_index=True),
    }
    records = [r["record"] for r in runs]
    record = {
        "config": {
            **records[0].get("config", {}),
            "models": [m for r in records for m in r.get("config", {}).get("models", [])],
        },
        "protocol": {
            **records[0]["protocol"],
            "models": {k: v for r in records for k, v in r["protocol"]["models"].items()},
        },
        "data": records[0]["data"],
        "models": {k: v for r in records for k, v in r.get("models", {}).items()},
        "runs": [r["dir"] for r in runs],
    }
    return tables, record


def compare_runs(run_dirs: list, baseline: str | None = None, compare_config: CompareConfig | None = None) -> dict:
    """Compare the models of earlier runs without rescoring: read each run folder, refuse
    differing data or protocols (`check_runs_comparable`), and compare as `compare_tables`
    does. ``baseline`` None = the first model of the first run. Returns `compare_tables`'
    frames plus the merged ``summary``."""
    if not run_dirs:
        raise DataError("compare: at least one run folder must be given (got none). Pass RUN_DIR arguments.")
    runs = [read_run(d) for d in run_dirs]
    check_runs_comparable(runs)
    tables, record = merge_runs(runs)
    names = _model_names(tables)
    if len(names) < 2:
        raise DataError(f"compare: at least two models must be given (got {', '.join(names)}). Pass more run folders.")
    cfg = dataclasses.replace(compare_config or CompareConfig(), baseline=_baseline(names, baseline, "--baseline"))
    frames = compare_tables(tables, record, cfg)
    frames["summary"] = tables["summary"]
    return frames


# --------------------------------------------------------------------------------------
# Files and the checkpoint plot
# --------------------------------------------------------------------------------------


def write_compare(out_dir, frames: dict, summary: pd.DataFrame | None = None) -> list[Path]:
    """Write compare.csv, compare_documents.csv and compare_tokens.csv (when present), and
    checkpoints.png when ``summary`` holds two or more models; atomically. Returns the paths."""
    out = Path(out_dir)
    written = []
    for name in ("compare", "compare_tokens", "compare_documents"):
        if frames.get(name) is not None:
            write_table(frames[name], out / f"{name}.csv")
            written.append(out / f"{name}.csv")
    if summary is not None and len(summary) >= 2 and len(frames["compare"]):
        write_figure(plot_checkpoints(summary, frames["compare"]), out / "checkpoints.png")
        written.append(out / "checkpoints.png")
    return written
