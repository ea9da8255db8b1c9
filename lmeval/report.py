"""Tables: per-token arrays to tidy DataFrames, pooled from sums and counts.

Units are in the names: ``nll`` is nats, ``*_bits`` and ``bits_per_*`` are base 2. Every
document and summary number is built the same way: sums and counts first, one division at
the end (``ppl = exp(sum nll / sum tokens)``), never a mean of per-document ratios.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .data import TokenizedDocument, count_bytes, count_words
from .errors import OutputError
from .losses import LN2, bits_per, perplexity

TOKEN_COLUMNS = [
    "model", "doc_id", "position", "token_id", "token", "char_start", "char_end", "context_len",
    "nll", "surprisal_bits", "entropy", "max_prob", "is_top1", "rank",
]  # fmt: skip
DOCUMENT_COLUMNS = [
    "model", "doc_id", "n_tokens", "n_bytes", "n_words", "nll_sum", "ppl", "bits_per_token", "bits_per_byte",
]  # fmt: skip


def char_spans(docs: list[TokenizedDocument], doc_index: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(N, 2) character spans of scored tokens, gathered from every document's offsets."""
    if not docs or len(doc_index) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lengths = np.array([len(d.token_ids) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.concatenate([d.offsets for d in docs])[starts[doc_index] + position]


def token_strings(tokenizer, token_ids: np.ndarray) -> np.ndarray:
    """The vocabulary piece of each id (e.g. 'Ġthe'), looked up once per distinct id."""
    unique, inverse = np.unique(token_ids, return_inverse=True)
    pieces = np.array(tokenizer.convert_ids_to_tokens(unique.tolist()), dtype=object)
    return pieces[inverse] if len(unique) else np.array([], dtype=object)


def tokens_frame(model_name: str, doc_ids: list, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per scored token, in document then position order. ``columns`` holds the
    scorer's arrays plus ``token``, ``char_start``, ``char_end``; ``doc_index`` indexes ``doc_ids``."""
    doc_index = columns["doc_index"]
    frame = pd.DataFrame(
        {
            "model": model_name,
            "doc_id": np.array(doc_ids, dtype=object)[doc_index] if len(doc_index) else np.array([], dtype=object),
            "position": columns["position"],
            "token_id": columns["token_id"],
            "token": columns["token"],
            "char_start": columns["char_start"],
            "char_end": columns["char_end"],
            "context_len": columns["context_len"],
            "nll": columns["nll"],
            "surprisal_bits": columns["nll"] / LN2,
            "entropy": columns["entropy"],
            "max_prob": columns["max_prob"],
            "is_top1": columns["is_top1"],
            "rank": columns["rank"],
            # Kept beside DESIGN's columns so calibration can be recomputed from the table.
            "sum_q2": columns["sum_q2"],
            "mean_neg_logq": columns["mean_neg_logq"],
        }
    )
    if "topk_ids" in columns and columns["topk_ids"].shape[1]:
        frame["topk_token_ids"] = list(columns["topk_ids"])
        frame["topk_probs"] = list(columns["topk_probs"])
    order = np.lexsort((columns["position"], doc_index))
    return frame.iloc[order].reset_index(drop=True)


def document_sums(doc_index: np.ndarray, nll: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (n_tokens, nll_sum), the sum in float64."""
    n_tokens = np.bincount(doc_index, minlength=n_docs).astype(np.int64)
    nll_sum = np.bincount(doc_index, weights=nll.astype(np.float64), minlength=n_docs)
    return n_tokens, nll_sum


def normalisers(texts: list[str]) -> tuple[list[int], list[int]]:
    """UTF-8 bytes and lm-eval words of each scored text (a blank text has no words)."""
    return [count_bytes(t) for t in texts], [count_words(t) if t.strip() else 0 for t in texts]


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
    rows["bits_per_byte"] = [bits_per(s, n) for s, n in zip(rows.nll_sum, rows.n_bytes)]
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
        "bits_per_byte": bits_per(nll_sum, n_bytes),
        "word_ppl": perplexity(nll_sum, n_words),
        "byte_ppl": perplexity(nll_sum, n_bytes),
    }
    if seconds is not None:
        row["tokens_per_second"] = n_tokens / seconds if seconds > 0 else math.nan
    return row


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

# Every file `lmeval run` may write; --overwrite removes exactly these, nothing else.
OUTPUT_FILES = (
    "tokens.parquet", "documents.parquet", "documents.csv", "summary.csv", "calibration.csv",
    "temperature.csv", "compare.csv", "compare_tokens.csv", "compare_documents.csv", "reliability.png", "checkpoints.png", "run.json",
)  # fmt: skip


def prepare_output_dir(path: str, overwrite: bool) -> Path:
    """Create the run dir. A finished run (it has run.json) is never replaced unless
    ``overwrite``; an interrupted one (it has parts/) is left for `run` to resume."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output.dir: {out} is a file, not a folder. Choose another `output.dir`.")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    interrupted = (out / "parts").is_dir() and not (out / "run.json").exists()
    if existing and not (overwrite or interrupted):
        raise OutputError(
            f"output.dir: {out} already holds results ({', '.join(existing)}). "
            "Pass --overwrite to replace them, or choose another `output.dir`."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in existing:  # replaced on request, or left half-done by an interrupted run
            (out / name).unlink()
        probe = out / ".lmeval-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output.dir: cannot write to {out} ({exc.strerror}). Check its permissions.") from exc
    return out


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary name, then rename: a crash or a full
    disk never leaves a half-written file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not be written ({exc.strerror or exc}). Free disk space or fix permissions.") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_json(data: dict, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (Path, tuple, set)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as an aligned text table for the terminal."""
    shown = [c for c in ("model", "n_documents", "n_tokens", "ppl", "bits_per_token", "bits_per_byte", "word_ppl",
                         "ece", "brier", "top1_accuracy", "best_temperature", "tokens_per_second") if c in summary]
    formatters = {"tokens_per_second": lambda x: f"{x:.0f}"}
    return summary[shown].to_string(index=False, float_format=lambda x: f"{x:.4g}", formatters=formatters)


class TokenWriter:
    """Streams token tables into one parquet file, a row group per call, so the per-token
    rows of a large corpus never sit in memory together. Renamed into place on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = None

    def write(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: could not be written ({exc.strerror}).") from exc
