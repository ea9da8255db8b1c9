"""Minimal pairs: which of two sentences does the model prefer? (BLiMP-style acceptability.)

Each pair is a grammatical ``sentence_good`` and a minimally different ``sentence_bad``. The
model prefers the good one when its total log-probability is higher:
``delta = log p(good) - log p(bad) > 0``, in nats, each sentence scored whole after the BOS
(or given its pair's context, which conditions both and is never scored). Accuracy is
pooled over pairs, with a bootstrap interval that resamples PAIRS (the independent units).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.bootstrap import bootstrap_interval, resampled_sums
from ..errors import DataError
from .continuation import check_contexts
from .text import check_texts
from .score import as_loaded_model, check_batch_tokens, score_texts

PAIR_COLUMNS = ["id", "logprob_good", "logprob_bad", "delta", "good_wins", "n_tokens_good", "n_tokens_bad",
                "sentence_good", "sentence_bad"]  # fmt: skip


def minimal_pairs(
    good, bad, model, contexts=None, *, ids=None, bos="auto", max_length: int | None = None,
    stride: int | None = None, batch_tokens: int = 16384, bootstrap: int = 1000, seed: int = 0,
    name: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per pair: logprob_good and logprob_bad (the total log-probability of each
    sentence, nats), delta (logprob_good - logprob_bad, nats), good_wins (delta > 0; a tie
    is not a win), n_tokens_good / n_tokens_bad, and the sentences; ``id`` is ``ids[i]`` or
    the pair's index; with ``contexts`` also ``context``.

    ``attrs`` hold the pooled result: n_pairs, accuracy (the fraction of pairs the good
    sentence wins), ci_low and ci_high (the 95% percentile interval over ``bootstrap``
    resamples of the pairs, seeded by ``seed``; NaN when ``bootstrap`` is 0), delta_mean
    (nats), n_ties, and the protocol (bos, contexts).
    """
    good, bad = check_texts(good), check_texts(bad)
    if len(good) != len(bad):
        raise DataError(f"minimal_pairs: good and bad must pair up one to one (got {len(good)} and {len(bad)} sentences).")
    for side, texts in (("good", good), ("bad", bad)):
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise DataError(f"minimal_pairs: sentence_{side} of pair {empty[0]} must not be empty. Fix or drop that pair.")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise DataError(f"bootstrap: must be an integer >= 0 (got {bootstrap!r}). Use 0 for no interval, or e.g. 1000.")
    ids = list(range(len(good))) if ids is None else list(ids)
    if len(ids) != len(good):
        raise DataError(f"minimal_pairs: ids must hold one id per pair ({len(good)}) (got {len(ids)}).")
    contexts = None if contexts is None else check_contexts(contexts, len(good))
    lm = as_loaded_model(model, name)
    frame = score_texts(
        good + bad, lm, contexts=None if contexts is None else contexts + contexts, bos=bos, max_length=max_length,
        stride=stride, batch_tokens=check_batch_tokens(batch_tokens),
    )  # fmt: skip
    doc = frame["doc_id"].to_numpy(np.int64)
    nll = np.bincount(doc, weights=frame["nll"].to_numpy(np.float64), minlength=2 * len(good))
    n_tokens = np.bincount(doc, minlength=2 * len(good))
    n = len(good)
    table = pd.DataFrame({
        "id": ids, "logprob_good": -nll[:n], "logprob_bad": -nll[n:], "delta": nll[n:] - nll[:n],
        "n_tokens_good": n_tokens[:n], "n_tokens_bad": n_tokens[n:], "sentence_good": good, "sentence_bad": bad,
    })  # fmt: skip
    table["good_wins"] = table["delta"] > 0
    columns = PAIR_COLUMNS + (["context"] if contexts is not None else [])
    if contexts is not None:
        table["context"] = contexts
    table = table[columns]
    table.attrs.update(pooled(table, bootstrap, seed), model=lm.name, bos=bos, contexts=contexts is not None)
    return table


def pooled(table: pd.DataFrame, bootstrap: int, seed: int) -> dict:
    """Accuracy over pairs and its bootstrap interval (pairs resampled, sums divided once)."""
    wins = table["good_wins"].to_numpy(np.float64)
    n = len(wins)
    low = high = float("nan")
    if bootstrap and n:
        sums = resampled_sums(wins[:, None], bootstrap, seed)[:, 0]  # (B,)
        low, high, _ = bootstrap_interval(sums / n)
    return {
        "n_pairs": n, "accuracy": float(wins.mean()) if n else float("nan"), "ci_low": low, "ci_high": high,
        "delta_mean": float(table["delta"].mean()) if n else float("nan"), "n_ties": int((table["delta"] == 0).sum()),
        "bootstrap": bootstrap, "seed": seed,
    }  # fmt: skip


def read_pairs(path) -> tuple[list[str], list[str], list[str] | None, list]:
    """``(good, bad, contexts, ids)`` from a jsonl file of ``{"sentence_good", "sentence_bad"}``
    rows (BLiMP's fields), each with an optional ``context`` and ``id``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: must be a readable jsonl file (got {exc.strerror}). Check the path.") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: must be UTF-8 text (byte {exc.start} is not). Re-encode it.") from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: must be one JSON object per line ({exc.msg}).") from None
        missing = [k for k in ("sentence_good", "sentence_bad") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}:{number}: must have string fields sentence_good and sentence_bad (missing {', '.join(missing)}).")
        if "context" in row and not isinstance(row["context"], str):
            raise DataError(f"{path}:{number}: context must be a string (got {type(row['context']).__name__}).")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: holds no pairs. Each line must be a JSON object with sentence_good and sentence_bad.")
    has_context = any("context" in r for r in rows)
    ids = [r.get("id", i) for i, r in enumerate(rows)]
    contexts = [r.get("context", "") for r in rows] if has_context else None
    return [r["sentence_good"] for r in rows], [r["sentence_bad"] for r in rows], contexts, ids
