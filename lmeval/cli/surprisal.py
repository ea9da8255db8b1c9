"""`lmeval surprisal`: per-token (or per-word) surprisal of some texts, for a terminal, CSV,
JSON or an HTML page. Parses arguments and prints; the work is `lmeval.surprisal`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd

from ..errors import DataError
from .common import COLOR_CHOICES, int_at_least, parse_bos, use_color

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json")
EPILOG = """examples:
  lmeval surprisal "The cat sat on the mat."            the bundled demo model, in the terminal
  lmeval surprisal --model gpt2 --words "Colourless green ideas sleep furiously."
  lmeval surprisal --model gpt2 --file essay.txt --html essay.html
  cat notes.txt | lmeval surprisal --model gpt2 --file - --format csv > notes.csv
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``surprisal`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "surprisal",
        help="show where a model is surprised: per-token or per-word surprisal in bits",
        description="Score texts with a causal LM and show each token's (or word's) surprisal in bits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("text", nargs="*", help="texts to score; each is one document")
    parser.add_argument("--model", default=None, help="local folder or hub id (default: the bundled demo model)")
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="F",
        help="a UTF-8 text file scored as one document; '-' reads stdin; may be repeated",
    )
    parser.add_argument(
        "--words",
        action="store_true",
        help="per whitespace-separated word, corrected for tokens that carry their leading space",
    )
    parser.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="TEXT",
        help="score each text given this context (it conditions, never scores); once for every text, or once per text",
    )
    parser.add_argument(
        "--word-correction",
        choices=("bow", "none"),
        default="bow",
        help="bow: corrected word surprisal (default); none: the plain sum of token surprisals",
    )
    parser.add_argument(
        "--text-end",
        choices=("eos", "word"),
        default="eos",
        help="eos: a text may end after any word (default); word: another word always follows",
    )
    parser.add_argument(
        "--word-boundary",
        choices=("whitespace", "marker"),
        default="whitespace",
        help="which tokens start a word in the correction: whitespace (any token whose text starts with "
        "whitespace, newlines too; default) or marker (only 'Ġ'/'▁' tokens, as wordsprobability and minicons)",
    )
    parser.add_argument(
        "--covariates",
        type=_covariate_list,
        default=None,
        metavar="NAMES",
        help="with --words, comma-separated word covariates: length (length_chars), frequency (frequency_zipf, "
        "from wordfreq) and unigram (unigram_logfreq, from the texts themselves)",
    )
    parser.add_argument(
        "--language",
        default="en",
        metavar="CODE",
        help="the language of --covariates frequency, a wordfreq language code (default: en)",
    )
    parser.add_argument(
        "--top-k", type=int_at_least(0), default=0, metavar="K", help="also list the K likeliest tokens"
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output on stdout (default: table)")
    parser.add_argument("--html", default=None, metavar="OUT.html", help="also write a self-contained HTML page")
    parser.add_argument(
        "--bos",
        type=parse_bos,
        default="auto",
        metavar="auto|none|ID",
        help="conditioning token before each text: auto (BOS, else EOS), none (first token unscored) or an id",
    )
    parser.add_argument("--max-length", type=int_at_least(2), default=None, metavar="L", help="window length in tokens")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="M2",
        help="compare with this model (same tokenizer): colour each token by how far --model moved from it",
    )
    parser.add_argument(
        "--by",
        choices=("delta_nll", "kl"),
        default="delta_nll",
        help="with --baseline, colour by the change of the token's surprisal (delta_nll, bits) "
        "or by KL(baseline || model) of the next-token distribution (kl, nats)",
    )
    parser.add_argument(
        "--color",
        choices=COLOR_CHOICES,
        default="auto",
        help="colour the terminal table: auto (on a terminal, unless NO_COLOR is set), always or never",
    )
    return parser


def _covariate_list(value: str) -> list[str]:
    """``frequency,length`` -> ["frequency", "length"]; the names are checked with the table's options."""
    return [name.strip() for name in value.split(",") if name.strip()]


def read_texts(texts: list[str], files: list[str]) -> list[str]:
    """The documents: each TEXT argument, then each file's whole contents."""
    out = list(texts)
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            out.append(text.removeprefix("\ufeff"))  # a BOM marks the encoding; it is not text
        except UnicodeDecodeError as exc:
            raise DataError(
                f"--file {name}: must be UTF-8 text (got an undecodable byte at {exc.start}). Re-encode it as UTF-8."
            ) from exc
        except OSError as exc:
            raise DataError(f"--file {name}: must be a readable file (got {exc.strerror}). Check the path.") from exc
    if not out:
        raise DataError("surprisal: at least one text must be given (got none). Pass TEXT arguments or --file F.")
    return out


def _contexts(given: list[str], n_texts: int) -> list[str] | None:
    """One --context for every text, or one per text."""
    if not given:
        return None
    if len(given) == 1:
        return given * n_texts
    if len(given) != n_texts:
        raise DataError(
            f"--context: must be given once, or once per text ({n_texts}) (got {len(given)}). "
            "Repeat it in the order of the texts."
        )
    return given


def _records(table: pd.DataFrame) -> list[dict]:
    """JSON-ready rows with full float precision; NaN becomes null."""

    def plain(value):
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return [{k: plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def _csv(table: pd.DataFrame) -> str:
    if "topk" in table.columns:
        table = table.assign(topk=[json.dumps(t, ensure_ascii=False) for t in table["topk"]])
    return table.to_csv(index=False, lineterminator="\n")


def _terminal(table: pd.DataFrame, texts: list[str], color: bool) -> str:
    from ..view.render import render_terminal

    blocks = []
    for doc_id, text in enumerate(texts):
        rows = table[table["doc_id"] == doc_id].reset_index(drop=True)
        blocks.append(f"== document {doc_id} ==\n" + render_terminal(rows, text, color=color))
    return "\n".join(blocks)


def main(args: argparse.Namespace) -> int:
    """Run ``lmeval surprisal``; returns the exit code. User errors raise `LmevalError`."""
    from ..view.render import render_html, write_html
    from ..view.surprisal import surprisal_table

    texts = read_texts(args.text, args.file)
    if args.baseline is not None:
        return _divergence_main(args, texts)
    table = surprisal_table(
        texts,
        args.model,
        words=args.words,
        top_k=args.top_k,
        bos=args.bos,
        max_length=args.max_length,
        contexts=_contexts(args.context, len(texts)),
        word_correction=args.word_correction,
        text_end=args.text_end,
        word_boundary=args.word_boundary,
        covariates=args.covariates,
        language=args.language,
    )
    if args.format == "json":
        sys.stdout.write(json.dumps(_records(table), ensure_ascii=False, indent=1) + "\n")
    elif args.format == "csv":
        sys.stdout.write(_csv(table))
    else:
        sys.stdout.write(_terminal(table, texts, color=use_color(args.color, sys.stdout)))
    if args.html:
        tables = {i: table[table["doc_id"] == i] for i in range(len(texts))}
        title = f"lmeval surprisal: {args.model or 'demo model'}"
        path = write_html(args.html, render_html(tables, texts, title=title))
        log.info("wrote %s", path)
    return 0


def _divergence_main(args: argparse.Namespace, texts: list[str]) -> int:
    """``--baseline``: the per-token divergence of --model from it, printed and drawn."""
    from ..producers.divergence import TokenizerMismatchError, mismatch_message
    from ..view.divergence import divergence_table, render_divergence_html, render_divergence_terminal
    from ..view.render import write_html

    for flag, used in (("--words", args.words), ("--top-k", args.top_k), ("--covariates", args.covariates)):
        if used:
            raise DataError(
                f"{flag}: must not be combined with --baseline (got both). Drop {flag} to compare two models."
            )
    try:
        table = divergence_table(texts, args.model, args.baseline, bos=args.bos, max_length=args.max_length)
    except TokenizerMismatchError as exc:  # said in the flags of this command, not a config key or a keyword
        raise TokenizerMismatchError(
            mismatch_message(exc.names, exc.fingerprints, "--baseline"), exc.names, exc.fingerprints
        ) from None
    if args.format == "json":
        sys.stdout.write(json.dumps(_records(table), ensure_ascii=False, indent=1) + "\n")
    elif args.format == "csv":
        sys.stdout.write(_csv(table))
    else:
        color = use_color(args.color, sys.stdout)
        for doc_id, text in enumerate(texts):
            rows = table[table["doc_id"] == doc_id].reset_index(drop=True)
            sys.stdout.write(
                f"== document {doc_id} ==\n" + render_divergence_terminal(rows, text, color=color, by=args.by)
            )
    if args.html:
        title = f"lmeval surprisal: {args.model or 'demo model'} vs {args.baseline}"
        log.info("wrote %s", write_html(args.html, render_divergence_html(table, texts, title=title, by=args.by)))
    return 0
