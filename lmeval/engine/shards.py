"""Shards: `lmeval run CONFIG --shard I/N` and `lmeval merge OUTPUT_DIR`, for schedulers
without a process group (a Slurm array, a batch queue, several shells).

Each shard is a process of its own. It scores the unfinished parts of the I-th of N shares
into the shared ``output.dir`` and exits without merging; `merge` (or the last shard, with
``merge_when_complete``) folds every part into the tables once all exist, and names the
missing ones otherwise. The shares are `distributed.assign`'s, the assignment the ranks of
a torchrun job use, but taken over every part of the plan rather than over the unfinished
ones: shards start and restart at different times, so only the plan (which comes from the
corpus alone) gives every shard the same answer. A rerun of one array task therefore
scores only the parts of its own share that are not finished, and no part is left to no one.

The first shard stamps ``parts/`` with the run's identity (as any run does), its config
(``parts/config.yaml``, which `merge` reads) and the shard count (``parts/sharding.json``);
a shard of another config or another count is refused. Shards hold the run folder's lock
shared (`lock.RunLock`), so they run side by side while a plain run or a merge is refused.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..analyses import analyses_for
from ..errors import ConfigError, LmevalError, OutputError
from . import distributed
from .config import Config, config_to_yaml, load_config
from .data import Corpus, load_documents
from .files import clean_leftovers, prepare_output_dir
from .lock import RunLock
from .merge import Merger, layout_of
from .parts import identity_hash, model_dirname, open_parts, roundtrip
from .plan import PartPlan, plan_key, plan_parts
from .progress import ScoringProgress
from .resume import ReplacedParts, finished_plans
from .run import _finish, _identity, _NoMerge, _part_paths, _require_whole, _score_passes

CONFIG_FILE = "config.yaml"  # under parts/: the config the shards run, which `merge` reads back
SHARDING_FILE = "sharding.json"  # under parts/: the shard count the run was started with


class ShardError(LmevalError):
    """A shard or a merge that cannot go ahead as asked; the message says how to proceed."""


class MissingPartsError(ShardError):
    """`merge` found parts that no shard has written yet."""


@dataclass
class ShardReport:
    """What one shard did: its share, what it scored, and what the run still lacks."""

    index: int
    count: int
    share: int  # parts of this shard's share, per model summed
    scored: int  # part files this shard wrote
    missing: int  # part files of the whole run still absent after it (every shard's)
    output_dir: Path
    merged: dict | None = None  # the tables, when this shard merged the run
    note: str = ""  # why a shard asked to merge did not
    seconds: float = 0.0
    scored_keys: dict[str, list[str]] = field(default_factory=dict)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; a `ConfigError` that shows the spelling otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise ConfigError(
            f"--shard: must be I/N with 0 <= I < N, shards counted from 0 (got {text!r}). In a Slurm array started "
            "with --array=0-3, pass --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.",
            source="command line",
        )
    return int(match[1]), int(match[2])


def shares(plans: list[PartPlan], count: int) -> list[list[int]]:
    """Each shard's plan indices: the ranks' assignment (by characters), over the whole plan."""
    return distributed.assign(plans, [p.weight for p in plans], count)


def run_shard(
    config: Config, index: int, count: int, *, show_progress: bool = True, merge_when_complete: bool = False
) -> ShardReport:
    """Score shard ``index`` of ``count``: the unfinished parts of its share, every model.

    With ``merge_when_complete``, merge the run afterwards if every part of every shard is
    then on disk and no other shard still holds the folder (the last one to finish merges;
    the others return with ``note`` saying so)."""
    started = time.time()
    world_size = distributed.launch_from_env().world_size
    if world_size > 1:
        raise ShardError(
            f"--shard: must run as one process per shard (got WORLD_SIZE={world_size}). Start each shard "
            "with plain `lmeval run`, or use torchrun without --shard (its ranks share the parts themselves)."
        )
    out = prepare_output_dir(config.output.dir, overwrite=False)  # refuses a folder holding a finished run
    lock = RunLock(out, shared=True, role=f"shard {index}/{count}").acquire()
    try:
        analyses = analyses_for(config)
        corpus = load_documents(config.data)
        identity = _identity(config, corpus, analyses)
        parts = _stamp(out, config, identity, count)
        plans = plan_parts(corpus, config.scoring.documents, config.scoring.separator, config.output.part_chars)
        _require_whole(analyses, plans, corpus)
        idh = identity_hash(identity)
        keys = [plan_key(corpus, p, config.scoring.documents) for p in plans]
        mine = shares(plans, count)[index]
        todo = {}
        for model in config.models:  # only this share's parts are read and checked, not every shard's
            done = finished_plans(parts / model_dirname(model.name), [keys[i] for i in mine], idh)
            todo[model.name] = [i for i in mine if keys[i] not in done]
        bar = ScoringProgress(show_progress)
        try:  # one process scores the whole of `todo`: the engine's own loop, nothing merged
            local = distributed.Context(distributed.Launch())
            _score_passes(config, corpus, parts, plans, todo, analyses, idh, _NoMerge(), local, bar)
        finally:
            bar.close()
        missing = missing_parts(config, corpus, parts, plans)
    finally:
        lock.release()
    report = ShardReport(
        index,
        count,
        share=len(mine) * len(config.models),
        scored=sum(len(v) for v in todo.values()),
        missing=sum(len(v) for v in missing.values()),
        output_dir=out,
        scored_keys={m: [keys[i] for i in v] for m, v in todo.items()},
    )
    if merge_when_complete:
        if report.missing:
            report.note = f"not merged: {report.missing} part(s) of other shards are missing; the last shard merges"
        else:
            try:
                report.merged = merge(out, config=config, corpus=corpus)
            except OutputError as exc:  # another shard still holds the folder, or is merging it now
                if "in use by another lmeval run" not in str(exc):
                    raise
                report.note = f"not merged: {exc}"
    report.seconds = time.time() - started
    return report


def _stamp(out: Path, config: Config, identity: dict, count: int) -> Path:
    """The parts folder, stamped (by the first shard to get here) with the run's identity,
    config and shard count, and checked against them (by every later shard)."""
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    _create_once(parts / "manifest.json", json.dumps(roundtrip(identity), indent=2))
    parts = open_parts(out, identity, fresh=False)  # a shard of another config, model or corpus is refused
    _create_once(
        parts / CONFIG_FILE, f"# the config of a sharded run; `lmeval merge` reads it\n{config_to_yaml(config)}"
    )
    _create_once(parts / SHARDING_FILE, json.dumps({"count": count}))
    started_with = _sharding(parts)
    if started_with != count:
        raise ShardError(
            f"--shard: N must be the shard count {out} was started with (got {count}, started with {started_with}): "
            f"with another N the shares differ and parts would be scored twice or by no shard. Pass "
            f"--shard I/{started_with}; to share out the unfinished parts over another count, first let every shard "
            f"stop, then delete {parts / SHARDING_FILE}."
        )
    return parts


def _create_once(path: Path, text: str) -> None:
    """Write ``path`` unless it exists, atomically and at most once among processes racing to
    write it (a hard link fails on an existing name; a rename would replace it)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another shard was first: its file is checked against ours by the caller
    finally:
        tmp.unlink(missing_ok=True)


def _sharding(parts: Path) -> int | None:
    try:
        return int(json.loads((parts / SHARDING_FILE).read_text(encoding="utf-8"))["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def missing_parts(config: Config, corpus: Corpus, parts: Path, plans: list[PartPlan]) -> dict[str, list[int]]:
    """Per model, the plan indices whose part file is not on disk (a cheap look, no checks)."""
    paths = _part_paths(config, corpus, parts, plans)
    return {m: [i for i, p in enumerate(files) if not p.exists()] for m, files in paths.items()}


def merge(output_dir, *, config: Config | None = None, corpus: Corpus | None = None, return_tokens: bool = False):
    """Merge a sharded run's parts in ``output_dir`` into its tables, as `run` would have.

    Every part must be on disk and pass its checks; otherwise nothing is written and a
    `MissingPartsError` names, per shard, the parts and documents still missing. Returns the
    tables (``tokens`` only with ``return_tokens``) and ``run``, the record written to run.json.
    """
    out = Path(output_dir).resolve()
    parts = out / "parts"
    if config is None:
        config = _saved_config(out)
    lock = RunLock(out)
    lock.acquire()  # refused while any shard still scores here
    try:
        started = time.time()
        clean_leftovers(out)  # what killed shards left (temporary part files), now that none runs
        analyses = analyses_for(config)
        corpus = load_documents(config.data) if corpus is None else corpus
        identity = _identity(config, corpus, analyses)
        open_parts(out, identity, fresh=False)  # the corpus or models changed since the shards: refused
        plans = plan_parts(corpus, config.scoring.documents, config.scoring.separator, config.output.part_chars)
        idh = identity_hash(identity)
        keys = [plan_key(corpus, p, config.scoring.documents) for p in plans]
        absent = {}
        for model in config.models:  # a damaged or foreign part is named and removed: its shard redoes it
            # the footer alone: the merge reads every part once, and checks its checksum then
            done = finished_plans(parts / model_dirname(model.name), keys, idh, columns=False)
            absent[model.name] = [i for i, key in enumerate(keys) if key not in done]
        if any(absent.values()):
            raise MissingPartsError(_missing_message(out, config, corpus, plans, absent, _sharding(parts)))
        merger = Merger(out, analyses, _part_paths(config, corpus, parts, plans), layout_of(config, corpus))
        try:
            tables = _finish(
                out,
                config,
                corpus,
                parts,
                merger,
                return_tokens,
                {"started": started, "scored": started},
                ReplacedParts(parts),
            )
        except BaseException:
            merger.abort()
            raise
    finally:
        lock.release()
    return tables


def _saved_config(out: Path) -> Config:
    parts = out / "parts"
    if not (parts / CONFIG_FILE).exists():
        if (out / "run.json").exists() and not parts.exists():
            why = "it holds a finished run (run.json), which is merged already"
        elif (parts / "manifest.json").exists():
            why = "its parts were written by a run without --shard; rerun that `lmeval run CONFIG` to resume and merge"
        else:
            why = "it holds no parts of a sharded run"
        raise ShardError(
            f"lmeval merge: OUTPUT_DIR must be the output.dir of `lmeval run CONFIG --shard I/N` (got {out}: {why}). "
            "Pass the folder the shards wrote to."
        )
    return load_config(parts / CONFIG_FILE, [f"output.dir={out}"])


def _missing_message(out: Path, config: Config, corpus: Corpus, plans, absent: dict, count: int | None) -> str:
    owner = {}
    if count:
        for shard, share in enumerate(shares(plans, count)):
            owner.update(dict.fromkeys(share, shard))
    total = sum(len(v) for v in absent.values())
    lines, reruns = [], set()
    for model, indices in absent.items():
        if not indices:
            continue
        by_shard: dict = {}
        for i in indices:
            by_shard.setdefault(owner.get(i), []).append(i)
        for shard, idx in sorted(by_shard.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            first = [str(corpus.documents[plans[i].docs[0]].doc_id) for i in idx[:3]]
            more = ", ..." if len(idx) > 3 else ""
            who = f"shard {shard}/{count}" if shard is not None else "no shard"
            lines.append(f"{model}: {who}: {len(idx)} part(s), starting at documents {', '.join(first)}{more}")
            if shard is not None:
                reruns.add(shard)
    rerun = ", ".join(f"--shard {s}/{count}" for s in sorted(reruns)) or "each shard"
    return (
        f"lmeval merge: every part must be scored before the merge (got {total} part(s) missing in {out}):\n  "
        + "\n  ".join(lines)
        + f"\nRerun `lmeval run CONFIG {rerun}` with the shards' config (it scores only what is missing), "
        "then `lmeval merge` again; nothing was written."
    )
