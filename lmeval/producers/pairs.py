"""Minimal pairs: which of two sentences does the model prefer? (BLiMP-style acceptability.)

Each pair is a grammatical ``sentence_good`` and a minimally different ``sentence_bad``. The
model prefers the good one when its total log-probability is higher:
``delta = log p(good) - log p(bad) > 0``, in nats, each sentence scored whole after the BOS
(or given its pair's context, which conditions both and is never scored; joined verbatim,
``context + sentence``, as `lmeval run` joins a context to its text). Accuracy is
pooled over pairs, with a bootstrap interval that resamples PAIRS (the independent units).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.bootstrap import bootstrap_interval, resampled_sums
from ..errors import DataError
from .continuation import check_contexts
from .score import as_loaded_model, check_batch_tokens, score_texts
from .text import check_texts

log = logging.getLogger(__name__)
PAIR_COLUMNS = [
    "id",
    "logprob_good",
    "logprob_bad",
    "delta",
    "good_wins",
    "n_tokens_good",
    "n_tokens_bad",
    "sentence_good",
    "sentence_bad",
]


def minimal_pairs(
    good,
    bad,
    model,
    contexts=None,
    *,
    ids=None,
    bos="auto",
    max_length: int | None = None,
    stride: int | None = None,
    batch_tokens: int = 16384,
    bootstrap: int = 1000,
    seed: int = 0,
    name: str | None = None,
) -> pd.DataFrame:
    """One row per pair: logprob_good and logprob_bad (the total log-probability of each
    sentence, nats), delta (logprob_good - logprob_bad, nats), good_wins (delta > 0; a tie
    is not a win), n_tokens_good / n_tokens_bad, and the sentences; ``id`` is ``ids[i]`` or
    the pair's index; with ``contexts`` also ``context``.

    A context is joined to its sentence verbatim, as `lmeval run`'s ``data.context_field``
    joins a context to its text: the scored string is ``context + sentence``, and no separator
    is added. So a context that precedes a new sentence ends with its space ('David wept. ');
    a pair whose context and sentence meet with no whitespace is named in a warning.

    ``attrs`` hold the pooled result: n_pairs, accuracy (the fraction of pairs the good
    sentence wins), ci_low and ci_high (the 95% percentile interval over ``bootstrap``
    resamples of the pairs, seeded by ``seed``; NaN when ``bootstrap`` is 0), delta_mean
    (nats), n_ties, and the protocol (bos, contexts).
    """
    good, bad = check_texts(good), check_texts(bad)
    if len(good) != len(bad):
        raise DataError(
            f"minimal_pairs: good and bad must pair up one to one (got {len(good)} and {len(bad)} sentences)."
        )
    for side, texts in (("good", good), ("bad", bad)):
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise DataError(
                f"minimal_pairs: sentence_{side} of pair {empty[0] + 1} (counting from 1) must not be empty. "
                "Fix or drop that pair."
            )
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise DataError(f"bootstrap: must be an integer >= 0 (got {bootstrap!r}). Use 0 for no interval, or e.g. 1000.")
    ids = list(range(len(good))) if ids is None else list(ids)
    if len(ids) != len(good):
        raise DataError(f"minimal_pairs: ids must hold one id per pair ({len(good)}) (got {len(ids)}).")
    check_pair_ids(ids, [f"pair {i + 1} (counting from 1)" for i in range(len(ids))])
    contexts = None if contexts is None else check_contexts(contexts, len(good))
    if contexts is not None:
        warn_touching(contexts, good, bad, [f"pair {i + 1} (id {doc_id!r})" for i, doc_id in enumerate(ids)])
    lm = as_loaded_model(model, name)
    frame = score_texts(
        good + bad,
        lm,
        contexts=None if contexts is None else contexts + contexts,
        bos=bos,
        max_length=max_length,
        stride=stride,
        batch_tokens=check_batch_tokens(batch_tokens),
    )
    doc = frame["doc_id"].to_numpy(np.int64)
    nll = np.bincount(doc, weights=frame["nll"].to_numpy(np.float64), minlength=2 * len(good))
    n_tokens = np.bincount(doc, minlength=2 * len(good))
    n = len(good)
    table = pd.DataFrame(
        {
            "id": ids,
            "logprob_good": -nll[:n],
            "logprob_bad": -nll[n:],
            "delta": nll[n:] - nll[:n],
            "n_tokens_good": n_tokens[:n],
            "n_tokens_bad": n_tokens[n:],
            "sentence_good": good,
            "sentence_bad": bad,
        }
    )
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
        "n_pairs": n,
        "accuracy": float(wins.mean()) if n else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "delta_mean": float(table["delta"].mean()) if n else float("nan"),
        "n_ties": int((table["delta"] == 0).sum()),
        "bootstrap": bootstrap,
        "seed": seed,
    }


def check_pair_ids(ids: list, places: list[str]) -> None:
    """Ids as `lmeval run` takes them (a string or a number; never null, a list or a mapping),
    unique as the text they are written as: ``1`` and ``"1"`` would be one row id in the CSV."""
    seen: dict[str, str] = {}  # the id as written -> where it first was
    for doc_id, place in zip(ids, places):
        if doc_id is None or doc_id != doc_id or isinstance(doc_id, (bool, list, dict, bytes)):
            kind = "null" if doc_id is None or doc_id != doc_id else type(doc_id).__name__
            raise DataError(
                f"{place}: id must be a string or a number (got a {kind}: {doc_id!r}), as `lmeval run` "
                "requires of data.id_field. Fix that id, or drop `id` to number the pairs."
            )
        if str(doc_id) in seen:
            raise DataError(
                f"{place}: id {doc_id!r} must be unique, and {seen[str(doc_id)]} has the id "
                f"{str(doc_id)!r} already (ids are compared as the text the table writes). "
                "Give each pair its own id."
            )
        seen[str(doc_id)] = place


def warn_touching(contexts: list[str], good: list[str], bad: list[str], places: list[str]) -> None:
    """Warn when a context and its sentence meet with no whitespace between them.

    Why: a context conditions its text exactly as `lmeval run`'s data.context_field does, as
    the one string ``context + text``, joined verbatim (no separator is added, so that a
    continuation may also go on mid-word). A pair's sentence usually starts a new sentence, so
    a context that ends without a space is most often missing one ('David wept.' + 'He ...'
    scores 'David wept.He ...'); the data, not lmeval, must say where the space goes."""
    touching = [
        i
        for i, (c, g, b) in enumerate(zip(contexts, good, bad))
        if c and not c[-1].isspace() and not (g[:1].isspace() and b[:1].isspace())
    ]
    if touching:
        i = touching[0]
        log.warning(
            "%d pair(s) join context and sentence with no whitespace between them (first: %s, scored as %r). "
            "The text scored is context + sentence, verbatim, as lmeval run's data.context_field: end the "
            "context with a space (or start the sentence with one) where a new word begins.",
            len(touching),
            places[i],
            (contexts[i] + good[i])[-60:],
        )


def read_pairs(path) -> tuple[list[str], list[str], list[str] | None, list]:
    """``(good, bad, contexts, ids)`` from a jsonl file of ``{"sentence_good", "sentence_bad"}``
    rows (BLiMP's fields), each with an optional ``context`` and ``id``. Messages name a row by
    its 1-based line number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: must be a readable jsonl file (got {exc.strerror}). Check the path.") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: must be UTF-8 text (byte {exc.start} is not). Re-encode it.") from exc
    rows: list[tuple[int, dict]] = []  # (line number, pair)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: must be one JSON object per line ({exc.msg}).") from None
        missing = [
            k for k in ("sentence_good", "sentence_bad") if not isinstance(row, dict) or not isinstance(row.get(k), str)
        ]
        if missing:
            raise DataError(
                f"{path}: line {number}: must have string fields sentence_good and sentence_bad (missing {', '.join(missing)})."
            )
        if "context" in row and not isinstance(row["context"], str):
            raise DataError(f"{path}: line {number}: context must be a string (got {type(row['context']).__name__}).")
        empty = [k for k in ("sentence_good", "sentence_bad") if not row[k].strip()]
        if empty:
            raise DataError(f"{path}: line {number}: {empty[0]} must not be empty. Fix or remove that line.")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: holds no pairs. Each line must be a JSON object with sentence_good and sentence_bad.")
    places = [f"{path}: line {number}" for number, _ in rows]
    records = [row for _, row in rows]
    has_context = any("context" in r for r in records)
    ids = [r.get("id", i) for i, r in enumerate(records)]
    check_pair_ids(ids, places)
    good, bad = [r["sentence_good"] for r in records], [r["sentence_bad"] for r in records]
    contexts = [r.get("context", "") for r in records] if has_context else None
    return good, bad, contexts, ids
