"""`lmeval report RUN_DIR [RUN_DIR ...] [-o report.html]`: one page to read finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  lmeval report runs/demo                         writes runs/demo/report.html
  lmeval report runs/step-1000 runs/step-2000 -o checkpoints.html
                                                  several runs: a checkpoint's step is the last
                                                  number in its folder's name
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page of finished runs (report.html)",
        description="Write one self-contained HTML page (no network request, opens from disk) of the tables "
        "that finished runs wrote: summary and protocol, paired comparison, checkpoints (several RUN_DIRs, in "
        "order), calibration, loss by position, and a sortable table of documents with their token heat maps. "
        "`lmeval run` writes the page of its own run as report.html (output.report: false turns that off).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output.dir of a finished run")
    parser.add_argument("-o", "--output", help="the page to write (default: report.html in the last RUN_DIR)")
    parser.set_defaults(func=main)
    return parser


def main(args) -> int:
    from ..view.report import write_report

    out = Path(args.output) if args.output else Path(args.run_dirs[-1]) / "report.html"
    print(f"wrote {write_report(args.run_dirs, out)}")
    return 0
