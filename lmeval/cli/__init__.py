"""The `lmeval` command: parse arguments, call the library, print. argparse only.

User errors (`LmevalError`) print one paragraph without a traceback and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import LmevalError, on_command_line
from . import compare, merge, pairs, report, run, surprisal


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was
    made: an embedding program (or a test) that swaps stderr keeps receiving the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass

    def filter(self, record) -> bool:
        """Skip a record that a library's own handler has printed already (huggingface_hub and
        datasets attach one to their logger and still propagate), so that it shows once."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if logger.handlers:
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return super().filter(record)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmeval",
        description="Exact per-token cross-entropy for causal LMs.",
        epilog="examples:\n  lmeval demo\n  lmeval run --model gpt2 --data docs.jsonl\n  lmeval run config.yaml\n"
        "  lmeval compare runs/a runs/b\n  lmeval surprisal --model gpt2 'Hello world'\n"
        "run `lmeval COMMAND --help` for each command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"lmeval {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    surprisal.add_parser(sub).set_defaults(func=surprisal.main)
    compare.add_parser(sub).set_defaults(func=compare.main)
    pairs.add_parser(sub).set_defaults(func=pairs.main)
    merge.add_parser(sub)
    report.add_parser(sub)
    return parser


def _version() -> str:
    # `lmeval.__version__`. The parent package is always imported before its `cli`
    # subpackage, so it is read from sys.modules: no upward import of code.
    return sys.modules[__name__.partition(".")[0]].__version__


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
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    try:
        with on_command_line():
            code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is met below and not at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except LmevalError as exc:
        print(f"lmeval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command == "run":
            again = f"`lmeval run {args.config}` with the same overrides" if args.config else "the same command"
            hint = f" Finished parts are kept; rerun {again} to resume."
        print(f"lmeval: interrupted.{hint}", file=sys.stderr)
        return 130


# What a Unix tool killed by SIGPIPE reports (128 + 13): `lmeval run ... | head` ends quietly.
EXIT_STDOUT_CLOSED = 141


def _stdout_closed() -> int:
    """The reader of stdout went away (`| head`): stop without a traceback, and point stdout at
    /dev/null so that Python's final flush does not complain either. The run's files are
    written before anything is printed, so nothing is lost."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (embedded, tests)
        pass
    return EXIT_STDOUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
