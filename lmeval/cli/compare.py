"""`lmeval compare`: compare the models of earlier runs without rescoring them. Parses
arguments and prints; the work is `lmeval.compare`.

It prints the comparison table; files are written only when ``--out DIR`` is given, so a
run folder is never modified by looking at it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..engine.config import CompareConfig
from ..errors import OutputError
from .common import format_compare, int_at_least

log = logging.getLogger(__name__)

DEFAULTS = CompareConfig()
EPILOG = """examples:
  lmeval compare runs/base runs/finetuned                  the first run's model is the baseline
  lmeval compare runs/steps/step-* --baseline step-1000 --out runs/steps-compare
  lmeval compare runs/a runs/b --bootstrap 0               deltas only, no intervals
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "compare",
        help="compare the models of earlier runs: pooled deltas with paired bootstrap CIs",
        description="Merge the models of finished run folders (same data, same scoring protocol) into one "
        "comparison against a baseline, without rescoring. Prints the table; writes files with --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output.dir of an earlier `lmeval run`")
    parser.add_argument(
        "--baseline", default=None, metavar="NAME", help="model to compare against (default: the first)"
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write compare.csv, compare_tokens.csv, "
        "compare_documents.csv and checkpoints.png here (default: print only)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace compare files already in --out")
    parser.add_argument(
        "--bootstrap",
        type=int_at_least(0),
        default=DEFAULTS.bootstrap,
        metavar="N",
        help=f"document resamples (default: {DEFAULTS.bootstrap}; 0 = no intervals)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, metavar="S", help="bootstrap seed (default: 0)")
    parser.add_argument(
        "--top-k",
        type=int_at_least(0),
        default=DEFAULTS.top_k,
        metavar="K",
        help=f"tokens with the largest nll change to list (default: {DEFAULTS.top_k})",
    )
    parser.add_argument(
        "--min-documents",
        type=int_at_least(1),
        default=DEFAULTS.min_documents,
        metavar="N",
        help=f"fewer documents get no interval or p-value (default: {DEFAULTS.min_documents})",
    )
    return parser


def _output_dir(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out: must be a folder (got the file {out}). Choose another --out.")
    taken = [
        n
        for n in ("compare.csv", "compare_tokens.csv", "compare_documents.csv", "checkpoints.png")
        if (out / n).exists()
    ]
    if taken and not overwrite:
        raise OutputError(
            f"--out: {out} must not already hold a comparison (got {', '.join(taken)}). "
            "Pass --overwrite to replace it, or choose another --out."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out: cannot create {out} ({exc.strerror}). Check its permissions.") from exc
    return out


def main(args: argparse.Namespace) -> int:
    """Run ``lmeval compare``; returns the exit code. User errors raise `LmevalError`."""
    from ..engine.compare_runs import compare_runs, write_compare

    config = CompareConfig(
        baseline=args.baseline,
        bootstrap=args.bootstrap,
        seed=args.seed,
        top_k=args.top_k,
        min_documents=args.min_documents,
    )
    out = _output_dir(args.out, args.overwrite) if args.out else None
    frames = compare_runs(args.run_dirs, args.baseline, config)
    print(format_compare(frames["compare"]))
    if out is not None:
        write_compare(out, frames, frames["summary"])
        print(f"\nwrote {out}")
    return 0
