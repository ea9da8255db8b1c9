"""The `lmeval` command: parse arguments, call the library, print. argparse only.

User errors (`LmevalError`) print one paragraph without a traceback and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import LmevalError
from . import compare, pairs, run, surprisal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmeval", description="Exact per-token cross-entropy for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    surprisal.add_parser(sub).set_defaults(func=surprisal.main)
    compare.add_parser(sub).set_defaults(func=compare.main)
    pairs.add_parser(sub).set_defaults(func=pairs.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow flags (`lmeval run cfg.yaml -q scoring.stride=8`): collect them.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", force=True)
    try:
        return args.func(args)
    except LmevalError as exc:
        print(f"lmeval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command == "run":
            hint = f" Finished parts are kept; rerun `lmeval run {args.config}` with the same overrides to resume."
        print(f"lmeval: interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
