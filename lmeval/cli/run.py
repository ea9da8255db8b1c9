"""`lmeval run`, `lmeval demo` and `lmeval validate`: parse arguments, call `run`, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.presets import PRESETS
from ..errors import ConfigError
from .common import format_compare, format_divergence, format_summary, int_at_least

RUN_EPILOG = """examples:
  lmeval run config.yaml                          score the models of a YAML config
  lmeval run config.yaml scoring.stride=256 -q    ... with an override, no progress bar
  lmeval run --model gpt2 --data docs.jsonl       no config file: one model, one corpus
  lmeval run --model ckpt/step-1000 --model ckpt/step-2000 --data heldout.txt \\
             --max-length 1024 --stride 512 --out runs/steps
  lmeval run --model gpt2 --data docs.jsonl --print-config > my.yaml   keep it as a config
  lmeval run lm_eval_wikitext --model gpt2        a shipped config (lm-eval's wikitext task)
  lmeval run --preset llama_cpp --model M --data wiki.test.raw     llama.cpp's perplexity arithmetic
  lmeval run --preset gptq_wikitext2 --model M --data test.jsonl   the GPTQ paper's (L = 2048)
  lmeval run cfg.yaml --shard 0/4 -q              shard 0 of 4 (a Slurm array task); then `lmeval merge DIR`
"""
DEMO_EPILOG = """examples:
  lmeval demo                                     writes ./runs/demo
  lmeval demo output.dir=elsewhere --overwrite
"""
VALIDATE_EPILOG = """examples:
  lmeval validate config.yaml
  lmeval validate config.yaml scoring.stride=128
  lmeval validate --model gpt2 --data docs.jsonl --max-length 512
"""


def add_parsers(subparsers) -> None:
    """Register ``run``, ``demo`` and ``validate`` on an argparse subparsers object."""
    raw = argparse.RawDescriptionHelpFormatter
    run_p = subparsers.add_parser(
        "run",
        help="score the models of a YAML config (or of --model/--data) and write tables",
        description="Score each model on the corpus and write tokens, documents, summary and calibration tables "
        "with run.json. Give a YAML config, or --model and --data (with a config they replace its entries).",
        epilog=RUN_EPILOG,
        formatter_class=raw,
    )
    run_p.add_argument("config", nargs="?", default=None, help="YAML config file, or the name of a shipped config")
    run_p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. scoring.stride=128")
    _add_config_flags(run_p)
    run_p.add_argument("--print-config", action="store_true", help="print the equivalent YAML config and exit")
    _add_run_flags(run_p)
    scale = run_p.add_argument_group("several processes without a process group (a Slurm array)")
    scale.add_argument(
        "--shard",
        metavar="I/N",
        help="score the I-th of N shares of the unfinished parts (I from 0) into output.dir and exit without "
        "merging; merge with `lmeval merge OUTPUT_DIR` (see docs/scaling.md)",
    )
    scale.add_argument(
        "--merge-when-complete",
        action="store_true",
        help="with --shard: merge after scoring if every shard's parts are then on disk (the last shard merges)",
    )
    scale.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this process (or the ranks of torchrun / accelerate launch); ray: the unfinished parts mapped "
        "over Ray actors (the cluster at RAY_ADDRESS, else a local one), merged here",
    )
    scale.add_argument(
        "--ray-actors",
        type=int_at_least(1),
        metavar="N",
        help="with --executor ray: the number of actors, each loading each model once (default: the cluster's "
        "GPUs, else 2)",
    )
    run_p.set_defaults(func=run_command)
    demo_p = subparsers.add_parser(
        "demo",
        help="run the bundled offline demo (two checkpoints, held-out books) into ./runs/demo",
        description="Run the demo config shipped inside the package. It needs no network and writes ./runs/demo.",
        epilog=DEMO_EPILOG,
        formatter_class=raw,
    )
    demo_p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output.dir=elsewhere")
    _add_run_flags(demo_p)
    demo_p.set_defaults(func=demo_command)
    val_p = subparsers.add_parser(
        "validate",
        help="check a config without loading any model",
        description="Check a config (and overrides or --model/--data) without loading torch, a model or the data.",
        epilog=VALIDATE_EPILOG,
        formatter_class=raw,
    )
    val_p.add_argument("config", nargs="?", default=None, help="YAML config file, or the name of a shipped config")
    val_p.add_argument("overrides", nargs="*")
    _add_config_flags(val_p)
    val_p.set_defaults(func=validate_command)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The zero-config flags: what a YAML file would say, given on the command line."""
    group = parser.add_argument_group("without a config file (with one, these replace its entries)")
    group.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH_OR_ID",
        help="a local model folder or hub id; repeat for several models",
    )
    group.add_argument(
        "--data", metavar="PATH_OR_ID", help="a json/jsonl/csv/parquet/txt file, a glob, or a hub dataset id"
    )
    group.add_argument("--data-name", metavar="NAME", help="the hub dataset's configuration, e.g. wikitext-2-raw-v1")
    group.add_argument("--split", metavar="SPLIT", help="the dataset split (default: train)")
    group.add_argument("--text-field", metavar="F", help="the column holding the text (default: text)")
    group.add_argument(
        "--max-length", type=int_at_least(1), metavar="L", help="window length (default: the model's context)"
    )
    group.add_argument("--stride", type=int_at_least(1), metavar="S", help="new tokens scored per window (default: L)")
    group.add_argument("--out", metavar="DIR", help="output folder (default: runs/lmeval)")
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a protocol preset: the windows, joining and prefix of another tool's perplexity "
        "(keys you set still win; see docs/protocol.md)",
    )
    group.add_argument(
        "--documents-only",
        action="store_true",
        help="documents.parquet and summary.csv only (output.documents_only): per-document nll sums, ppl and "
        "bits per byte, no calibration, positions or token rows, the cheapest reductions (for data filtering)",
    )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace results already in output.dir")
    parser.add_argument("--fresh", action="store_true", help="discard the finished parts of an interrupted run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def load_command_config(args):
    """The `Config` of a `run` or `validate` command line: CONFIG (a file or a shipped
    config's name) and/or the --model/--data flags, then the key=value overrides."""
    from ..engine.config import config_from_options, raw_config_from_options
    from ..engine.demo import shipped_config, shipped_config_names

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # `lmeval run --model m --data d key=value`
    if config is not None and not Path(config).exists() and shipped_config(config) is not None:
        name, config = Path(config).stem, shipped_config(config)
        if args.out is None:  # ./runs/<name>, never inside the package; --out and later overrides win
            overrides = [f"output.dir=runs/{name}", *overrides]
    options = raw_config_from_options(
        args.model,
        args.data,
        data_name=args.data_name,
        split=args.split,
        text_field=args.text_field,
        max_length=args.max_length,
        stride=args.stride,
        out=args.out,
        preset=getattr(args, "preset", None),
        documents_only=getattr(args, "documents_only", False),
    )
    if config is None and not (args.model and args.data):
        given = "--model only" if args.model else "--data only" if args.data else "neither"
        raise ConfigError(
            f"{args.command}: a config file, or both --model and --data, must be given (got {given}). "
            f"Run e.g. `lmeval {args.command} config.yaml` or `lmeval {args.command} --model gpt2 --data docs.jsonl`; "
            f"shipped configs: {', '.join(shipped_config_names())}.",
            source="command line",
        )
    return config_from_options(config, options, overrides)


def run_command(args) -> int:
    config = load_command_config(args)
    if args.print_config:
        from ..engine.config import config_to_yaml

        print(
            f"# lmeval run config, printed by --print-config; run it with `lmeval run FILE`\n{config_to_yaml(config)}",
            end="",
        )
        return 0
    executor = getattr(args, "executor", "local")
    if config.data.streaming and (executor != "local" or getattr(args, "shard", None) is not None):
        raise ConfigError(
            "data.streaming: a streamed corpus is read and planned by one process (got --shard or --executor ray). "
            "Drop data.streaming to share the parts: the corpus is then loaded whole and planned up front.",
            source="command line",
        )
    if getattr(args, "ray_actors", None) is not None and executor != "ray":
        raise ConfigError(
            f"--ray-actors: must come with --executor ray (got --executor {executor}).", source="command line"
        )
    if getattr(args, "shard", None) is not None or getattr(args, "merge_when_complete", False):
        if executor != "local":
            raise ConfigError(
                f"--shard: must not be combined with --executor {executor} (got both). A shard is one process; "
                "the Ray executor shares the parts among its actors itself.",
                source="command line",
            )
        return _shard_command(args, config)
    if executor == "ray":
        from ..engine.executors import run_ray

        tables = run_ray(
            config,
            actors=args.ray_actors,
            overwrite=args.overwrite,
            fresh=args.fresh,
            show_progress=not args.quiet,
            return_tokens=False,
        )
        print_tables(tables)
        return 0
    from ..engine.run import run

    tables = run(
        config,
        overwrite=args.overwrite,
        fresh=args.fresh,
        show_progress=not args.quiet,
        return_tokens=False,
    )
    if not tables:  # another rank of a torchrun / accelerate launch job; rank 0 prints
        return 0
    print_tables(tables)
    return 0


def print_tables(tables: dict) -> None:
    """The summary (and comparisons) of a finished run, then where its files are."""
    print(format_summary(tables["summary"]))
    if tables.get("compare") is not None and len(tables["compare"]):
        print("\n" + format_compare(tables["compare"]))
    if tables.get("divergence") is not None:
        print("\n" + format_divergence(tables["divergence"]))
    print(f"\nwrote {tables['run']['config']['output']['dir']}")


def _shard_command(args, config) -> int:
    """`lmeval run --shard I/N`: score one share, say what is left, merge if asked and complete."""
    from ..engine.shards import parse_shard, run_shard

    if args.shard is None:
        raise ConfigError(
            "--merge-when-complete: must come with --shard I/N (got no --shard). A run without --shard merges anyway.",
            source="command line",
        )
    clash = [flag for flag, given in (("--overwrite", args.overwrite), ("--fresh", args.fresh)) if given]
    if clash:
        raise ConfigError(
            f"--shard: must not be combined with {' or '.join(clash)} (got both): shards share output.dir, and one "
            "shard discarding parts would discard the others'. Remove output.dir (or its parts/ folder) before "
            "starting the shards, or give them another `output.dir`.",
            source="command line",
        )
    index, count = parse_shard(args.shard)
    report = run_shard(config, index, count, show_progress=not args.quiet, merge_when_complete=args.merge_when_complete)
    print(
        f"shard {index}/{count}: scored {report.scored} of the {report.share} part(s) of its share "
        f"({report.share - report.scored} were finished) in {report.seconds:.1f} s"
    )
    if report.merged is not None:
        print_tables(report.merged)
        return 0
    if report.note:
        print(report.note)
    if report.missing:
        print(f"{report.missing} part(s) of other shards are still missing in {report.output_dir}")
    else:
        print(f"every part is scored: merge with `lmeval merge {report.output_dir}`")
    return 0


def demo_command(args) -> int:
    """`lmeval run` on the packaged demo config, writing ./runs/demo unless overridden."""
    from ..engine.demo import DEMO_OUTPUT, demo_config_path

    args.config = str(demo_config_path())
    args.overrides = [f"output.dir={DEMO_OUTPUT}", *args.overrides]  # later overrides win
    args.model, args.data, args.print_config = [], None, False
    args.data_name = args.split = args.text_field = args.max_length = args.stride = args.out = None
    return run_command(args)


def validate_command(args) -> int:
    from ..engine.preflight import check_files

    config = load_command_config(args)
    for note in check_files(config):  # how each path that is not local was read
        print(note)
    where = args.config or "command line"
    print(f"{where}: ok ({len(config.models)} model(s), data {config.data.path})")
    return 0
