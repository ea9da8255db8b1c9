"""`lmeval pairs FILE --model M`: minimal pairs (BLiMP-style). Parses arguments, calls
`lmeval.minimal_pairs`, writes the per-pair table and prints the pooled accuracy."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import int_at_least, parse_bos

log = logging.getLogger(__name__)


EPILOG = """examples:
  lmeval pairs blimp_anaphor.jsonl --model gpt2
  lmeval pairs pairs.jsonl --model ./ckpt --output pairs.csv --bootstrap 2000
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pairs`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "pairs",
        help="which sentence of each minimal pair the model prefers, and the pooled accuracy",
        description="Score minimal pairs from a jsonl file (sentence_good, sentence_bad, optional context and id): "
        "the total log-probability of each sentence in nats, their difference, whether the good one wins, "
        "and the accuracy over pairs with a bootstrap interval. A context is joined to its sentence verbatim "
        "(context + sentence, no separator added, as `lmeval run` joins data.context_field to the text): end a "
        "context with a space where a new word begins.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="jsonl file, one pair per line")
    parser.add_argument("--model", required=True, help="local folder or hub id")
    parser.add_argument(
        "--output",
        default=None,
        metavar="OUT.csv",
        help="where to write the per-pair table (.csv or .parquet; default: FILE's name + .pairs.csv, here)",
    )
    parser.add_argument(
        "--bootstrap", type=int_at_least(0), default=1000, metavar="B", help="resamples of the pairs (0: no interval)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument(
        "--bos",
        type=parse_bos,
        default="auto",
        metavar="auto|none|ID",
        help="conditioning token before each sentence: auto (BOS, else EOS), none or an id",
    )
    parser.add_argument("--max-length", type=int_at_least(2), default=None, metavar="L", help="window length in tokens")
    return parser


def format_pairs(table) -> str:
    a = table.attrs
    lines = [
        table[["id", "logprob_good", "logprob_bad", "delta", "good_wins"]].to_string(
            index=False, float_format=lambda x: f"{x:.4f}"
        ),
        "",
        (
            f"accuracy {a['accuracy']:.4f}  95% CI [{a['ci_low']:.4f}, {a['ci_high']:.4f}]  over {a['n_pairs']} pairs "
            f"(bootstrap {a['bootstrap']}, seed {a['seed']}; ties {a['n_ties']}); mean delta {a['delta_mean']:.4f} nats"
        ),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run ``lmeval pairs``; returns the exit code. User errors raise `LmevalError`."""
    from ..engine.files import write_table
    from ..producers.pairs import minimal_pairs, read_pairs

    good, bad, contexts, ids = read_pairs(args.file)
    table = minimal_pairs(
        good,
        bad,
        args.model,
        contexts,
        ids=ids,
        bos=args.bos,
        max_length=args.max_length,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    out = Path(args.output) if args.output else Path(Path(args.file).stem + ".pairs.csv")
    # Ids are written as strings (a jsonl may mix numbers and names; parquet cannot).
    write_table(table.assign(id=table["id"].astype(str)), out)
    sys.stdout.write(format_pairs(table) + f"\nwrote {out}\n")
    return 0
