"""`lmeval run`, `lmeval demo` and `lmeval validate`: parse arguments, call `run`, print."""

from __future__ import annotations

import argparse

from .common import format_compare, format_divergence, format_summary


def add_parsers(subparsers) -> None:
    """Register ``run``, ``demo`` and ``validate`` on an argparse subparsers object."""
    run_p = subparsers.add_parser("run", help="score the models of a YAML config and write tables")
    run_p.add_argument("config", help="YAML config file")
    run_p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. scoring.stride=128")
    _add_run_flags(run_p)
    run_p.set_defaults(func=run_command)
    demo_p = subparsers.add_parser(
        "demo", help="run the bundled offline demo (two checkpoints, held-out books) into ./runs/demo",
        description="Run the demo config shipped inside the package. It needs no network and writes ./runs/demo.",
    )  # fmt: skip
    demo_p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output.dir=elsewhere")
    _add_run_flags(demo_p)
    demo_p.set_defaults(func=demo_command)
    val_p = subparsers.add_parser("validate", help="check a config without loading any model")
    val_p.add_argument("config")
    val_p.add_argument("overrides", nargs="*")
    val_p.set_defaults(func=validate_command)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace results already in output.dir")
    parser.add_argument("--fresh", action="store_true", help="discard the finished parts of an interrupted run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run_command(args) -> int:
    from ..pipeline.run import run

    tables = run(
        args.config, args.overrides, overwrite=args.overwrite, fresh=args.fresh,
        show_progress=not args.quiet, return_tokens=False,
    )  # fmt: skip
    if not tables:  # another rank of a torchrun / accelerate launch job; rank 0 prints
        return 0
    print(format_summary(tables["summary"]))
    if tables.get("compare") is not None and len(tables["compare"]):
        print("\n" + format_compare(tables["compare"]))
    if tables.get("divergence") is not None:
        print("\n" + format_divergence(tables["divergence"]))
    print(f"\nwrote {tables['run']['config']['output']['dir']}")
    return 0


def demo_command(args) -> int:
    """`lmeval run` on the packaged demo config, writing ./runs/demo unless overridden."""
    from ..pipeline.demo import DEMO_OUTPUT, demo_config_path

    args.config = str(demo_config_path())
    args.overrides = [f"output.dir={DEMO_OUTPUT}", *args.overrides]  # later overrides win
    return run_command(args)


def validate_command(args) -> int:
    from ..pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: ok ({len(config.models)} model(s), data {config.data.path})")
    return 0
