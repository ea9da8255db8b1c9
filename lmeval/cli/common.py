"""What every subcommand shares: argparse types, colour choice, and the printed tables."""

from __future__ import annotations

import argparse
import os

import pandas as pd

COMPARE_SHOWN = [
    "model",
    "baseline",
    "metric",
    "value",
    "baseline_value",
    "delta",
    "ci_low",
    "ci_high",
    "p_value",
    "unit",
    "n_documents",
]
SUMMARY_SHOWN = (
    "model",
    "n_documents",
    "n_tokens",
    "ppl",
    "bits_per_token",
    "bits_per_byte",
    "word_ppl",
    "ece",
    "brier",
    "top1_accuracy",
    "best_temperature",
    "tokens_per_second",
)
COLOR_CHOICES = ("auto", "always", "never")


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with a message that says so."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {value!r})")
        return number

    return parse


def parse_bos(value: str):
    """``auto``, ``none`` or a token id, as `score_texts` takes them."""
    if value in ("auto", "none"):
        return value
    try:
        token_id = int(value)
    except ValueError:
        token_id = -1
    if token_id < 0:
        raise argparse.ArgumentTypeError(f"must be auto, none or a token id >= 0 (got {value!r})")
    return token_id


def use_color(choice: str, stream) -> bool:
    """Colour for ``--color``: always, never, or (auto) on a terminal unless NO_COLOR is set
    (https://no-color.org: any non-empty value turns colour off)."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as an aligned text table for the terminal."""
    shown = [c for c in SUMMARY_SHOWN if c in summary]
    formatters = {"tokens_per_second": lambda x: f"{x:.0f}"}
    return summary[shown].to_string(index=False, float_format=lambda x: f"{x:.4g}", formatters=formatters)


def format_compare(compare: pd.DataFrame) -> str:
    """The comparison as an aligned text table, then its notes (why a unit was refused), each once.
    Only the whole corpus's rows: per-group rows (data.group_by) are in compare.csv."""
    if "group" in compare:
        compare = compare[compare["group"].fillna("") == ""]
    text = compare[[c for c in COMPARE_SHOWN if c in compare]].to_string(index=False, float_format=lambda x: f"{x:.4g}")
    notes = [
        f"note ({row.model} vs {row.baseline}): {row.note}"
        for row in compare.drop_duplicates(["model", "baseline"]).itertuples()
        if isinstance(getattr(row, "note", None), str) and row.note
    ]
    return "\n".join([text, *notes])


DIVERGENCE_SHOWN = (
    "model",
    "baseline",
    "kl_mean",
    "kl_mean_ci_low",
    "kl_mean_ci_high",
    "kl_p99",
    "kl_reverse_mean",
    "same_top1",
    "delta_p_rms",
    "ln_ppl_ratio",
    "ln_ppl_ratio_ci_low",
    "ln_ppl_ratio_ci_high",
)


def format_divergence(divergence: pd.DataFrame) -> str:
    """The divergence summary (KL in nats) as an aligned text table; divergence.csv has every column."""
    shown = [c for c in DIVERGENCE_SHOWN if c in divergence]
    return "divergence from the baseline (nats; 95% document-bootstrap CI):\n" + divergence[shown].to_string(
        index=False, float_format=lambda x: f"{x:.4g}"
    )
