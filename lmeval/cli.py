"""The `lmeval` command: parse arguments, call `run`, print. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import LmevalError


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


def _run(args) -> int:
    from .report import format_summary
    from .run import run

    tables = run(
        args.config, args.overrides, overwrite=args.overwrite, fresh=args.fresh,
        show_progress=not args.quiet, return_tokens=False,
    )  # fmt: skip
    if not tables:  # another rank of a torchrun / accelerate launch job; rank 0 prints
        return 0
    print(format_summary(tables["summary"]))
    if tables.get("compare") is not None and len(tables["compare"]):
        shown = ["model", "baseline", "metric", "delta", "ci_low", "ci_high", "p_value", "unit"]
        print("\n" + tables["compare"][shown].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\nwrote {tables['run']['config']['output']['dir']}")
    return 0


def _validate(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: ok ({len(config.models)} model(s), data {config.data.path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmeval", description="Exact per-token cross-entropy for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="score the models of a YAML config and write tables")
    run_p.add_argument("config", help="YAML config file")
    run_p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. scoring.stride=128")
    run_p.add_argument("--overwrite", action="store_true", help="replace results already in output.dir")
    run_p.add_argument("--fresh", action="store_true", help="discard the finished parts of an interrupted run")
    run_p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run_p.set_defaults(func=_run)
    val_p = sub.add_parser("validate", help="check a config without loading any model")
    val_p.add_argument("config")
    val_p.add_argument("overrides", nargs="*")
    val_p.set_defaults(func=_validate)
    from . import compare_cli, surprisal_cli

    surprisal_cli.add_parser(sub).set_defaults(func=surprisal_cli.main)
    compare_cli.add_parser(sub).set_defaults(func=compare_cli.main)
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
