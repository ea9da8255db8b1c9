"""`lmeval merge OUTPUT_DIR`: fold the parts that `lmeval run --shard I/N` wrote into the tables."""

from __future__ import annotations

import argparse

from .run import print_tables

EPILOG = """examples:
  lmeval merge runs/pile                 after every `lmeval run cfg.yaml --shard I/N` has finished
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="merge the parts of a sharded run (lmeval run --shard I/N) into its tables",
        description="Merge the parts that the shards of `lmeval run CONFIG --shard I/N` wrote into OUTPUT_DIR, "
        "with the config they ran (kept in OUTPUT_DIR/parts), once every part is there. If some are missing, "
        "nothing is written and the error names them, shard by shard (exit code 2).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output.dir the shards wrote to")
    parser.set_defaults(func=main)
    return parser


def main(args) -> int:
    from ..engine.shards import merge

    print_tables(merge(args.output_dir))
    return 0
