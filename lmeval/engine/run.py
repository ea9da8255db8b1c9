"""`lmeval run`: config -> documents -> plan -> passes -> parts -> merge -> files.

A run is planned as fixed parts of the corpus (`plan`), each written as soon as it is
scored, so an interrupted run resumes where it stopped. Rank 0 holds the run folder's lock
for the whole run, checks every finished part (`resume`) and folds parts into the analyses
as they finish (`merge`); under torchrun / accelerate launch the ranks share the unfinished
parts of each pass (`passes`). The engine knows no metric: the analyses (`lmeval.analyses`)
say what scoring must produce and return the tables and figures it writes.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path

from ..analyses import analyses_for, plots
from ..analyses.base import RunFacts
from . import distributed, hooks
from .config import Config, load_config
from .data import SEPARATOR_ID, Corpus, join_documents, load_documents
from .files import clean_leftovers, prepare_output_dir, replace_outputs, write_json
from .lock import RunLock
from .merge import Merger, layout_of, run_record, write_comparison, write_outputs
from .parts import identity_hash, model_dirname, open_parts
from .passes import Models, PassJob, check_tokenizers, lockstep_decision, plan_passes, score_lockstep_share, score_share
from .plan import PartPlan, plan_key, plan_parts, require_whole
from .progress import ScoringProgress
from .provenance import fingerprint_model
from .resume import ReplacedParts, finished_plans, missing_folders
from .schemas import read_table


def run(
    config,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
    fresh: bool = False,
    show_progress: bool = True,
    return_tokens: bool = True,
) -> dict:
    """Run a config end to end; write the tables to ``output.dir`` and return them as DataFrames.

    ``config`` is a `Config` or a path to a YAML file (then ``overrides`` apply). Finished
    parts of an interrupted run of the same config are reused; ``fresh`` discards them.
    ``overwrite`` replaces the results of a finished run, but only once the new run has
    scored: until then the old files stay as they were. Returns ``tokens`` (unless
    ``return_tokens`` is false), ``documents``, ``summary``, ``calibration``,
    ``temperature``, and ``run``, the record written to run.json.

    Under ``torchrun`` or ``accelerate launch`` every process calls this. Rank 0 locks and
    prepares ``output.dir``; each rank scores its share of the unfinished parts; rank 0
    merges them and returns the tables once they are written, and every other rank returns
    an empty dict at the same moment. An error on any rank is raised on every rank.
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    if config.data.streaming:  # planned as the stream is read (lmeval.engine.stream)
        from .stream import run_streamed

        return run_streamed(config, overwrite, fresh, show_progress, return_tokens, (_identity, _finish))
    lock = RunLock(Path(config.output.dir))
    with distributed.launched() as ctx:
        try:
            tables = _run_locked(config, overwrite, fresh, show_progress, return_tokens, ctx, lock)
        finally:
            lock.release()
    return tables if ctx.is_main else {}


def _run_locked(config: Config, overwrite, fresh, show_progress, return_tokens, ctx, lock: RunLock):
    started = time.time()
    analyses = analyses_for(config)
    opened = ctx.call(lambda: _open_run(config, analyses, overwrite, fresh, lock), main_only=True)  # rank 0 first
    out, corpus, parts, replaced = ctx.call(lambda: opened if ctx.is_main else _join_run(config, analyses))
    merger: Merger | _NoMerge | None = None
    try:
        plans = plan_parts(corpus, config.scoring.documents, config.scoring.separator, config.output.part_chars)
        _require_whole(analyses, plans, corpus)
        idh = identity_hash(_identity(config, corpus, analyses))
        todo = ctx.broadcast(_unfinished(corpus, config, parts, plans, idh) if ctx.is_main else None)
        merger = (
            Merger(out, analyses, _part_paths(config, corpus, parts, plans), layout_of(config, corpus))
            if ctx.is_main
            else _NoMerge()
        )
        bar = ScoringProgress(show_progress and ctx.is_main)
        warm = plots.warm_up() if ctx.is_main else None  # the figures' one-time cost, paid while scoring
        try:
            ctx.call(lambda: _score_passes(config, corpus, parts, plans, todo, analyses, idh, merger, ctx, bar))
        finally:
            bar.close()
            if warm is not None:
                warm.join()
    except BaseException:
        if ctx.is_main:
            if isinstance(merger, Merger):
                merger.abort()
            replaced.restore_if_nothing_scored()  # a run that failed before scoring changes nothing
        raise
    timing = {"started": started, "first_part": bar.first_part_at, "scored": time.time()}

    def finish() -> dict:
        assert isinstance(merger, Merger)  # rank 0 merges, and only rank 0 finishes
        return _finish(out, config, corpus, parts, merger, return_tokens, timing, replaced)

    return ctx.call(finish, main_only=True)


class _NoMerge:
    """Ranks other than 0 score and write parts; rank 0 merges them."""

    def add(self, *args) -> None:
        pass


def _open_run(config: Config, analyses: tuple, overwrite: bool, fresh: bool, lock: RunLock):
    """Rank 0's start: the lock, the run dir, the corpus, and the parts folder stamped with
    the run's identity (an older run's parts of another identity are set aside, not deleted,
    under --overwrite)."""
    made = missing_folders(Path(config.output.dir))
    out = prepare_output_dir(config.output.dir, overwrite)
    lock.acquire()
    replaced = ReplacedParts(out / "parts", made)
    try:
        clean_leftovers(out)
        corpus = load_documents(config.data)
        identity = _identity(config, corpus, analyses)
        if overwrite or fresh:
            replaced.set_aside(identity, always=fresh)
        return out, corpus, open_parts(out, identity, fresh=fresh), replaced
    except BaseException:
        replaced.restore_if_nothing_scored()  # a start that fails leaves the folder as it found it
        raise


def _join_run(config: Config, analyses: tuple):
    """Another rank's start, once rank 0's is done: the same corpus, checked against the manifest."""
    out = Path(config.output.dir)
    corpus = load_documents(config.data)
    return out, corpus, open_parts(out, _identity(config, corpus, analyses), fresh=False), ReplacedParts(out / "parts")


def _identity(config: Config, corpus: Corpus, analyses: tuple) -> dict:
    """What the parts depend on: changing any of it makes earlier parts invalid. Every field
    of every model record counts, whatever fields the record grows; each analysis adds what
    its parts carry (membership's moments, a pair's baseline). How documents are grouped is
    not: it changes no score (the documents a group leaves out change the fingerprint)."""
    raw = config.to_dict()
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("group_by", "group_missing", "group_weights")}
    if raw["scoring"]["windows"] == "rolling":  # the chunk keys are unused: a rolling run keeps its identity
        raw["scoring"] = {k: v for k, v in raw["scoring"].items() if k not in ("windows", "chunk_context", "chunk_bos")}
    added: dict = {}
    for analysis in analyses:
        added.update(analysis.identity())
    return {
        "config": {
            "models": [dataclasses.asdict(m) for m in config.models],
            "data": raw["data"],
            "scoring": raw["scoring"],
            "temperatures": raw["calibration"]["temperatures"],
            "part_chars": raw["output"]["part_chars"],
            "per_token": raw["output"]["per_token"],
            # parts of a documents-only run keep no token columns (absent otherwise: older runs keep their identity)
            **({"documents_only": True} if raw["output"]["documents_only"] else {}),
            **added,
        },
        "data": corpus.fingerprint,
        "models": {m.name: fingerprint_model(m.path, m.revision)["fingerprint"] for m in config.models},
    }


def _require_whole(analyses: tuple, plans: list[PartPlan], corpus: Corpus) -> None:
    """Analyses that need every token of a document in one part refuse pieces up front."""
    for needs in (a.needs().whole_documents for a in analyses):
        if needs:
            for plan in plans:
                require_whole(plan, [corpus.documents[i] for i in plan.docs[:1]], needs)


def _unfinished(corpus: Corpus, config: Config, parts: Path, plans: list[PartPlan], idh: str) -> dict[str, list[int]]:
    """Per model, the indices of the plans whose part must still be scored (listed once, by
    rank 0): missing ones, and finished ones that fail their checks (named in a warning)."""
    keys = [plan_key(corpus, p, config.scoring.documents) for p in plans]
    todo = {}
    for model in config.models:
        done = finished_plans(parts / model_dirname(model.name), keys, idh)
        todo[model.name] = [i for i, key in enumerate(keys) if key not in done]
    return todo


def _score_passes(config, corpus, parts, plans, todo, analyses, idh, merger, ctx, bar) -> None:
    """Every pass in config order, each over this rank's share of its model's unfinished parts."""
    passes = plan_passes(config)
    shares = {}
    for p in passes:
        left = pass_left(p, todo)
        share = distributed.assign([plans[i] for i in left], [plans[i].weight for i in left], ctx.world_size)[ctx.rank]
        shares[p.model.name] = [left[j] for j in share]
        bar.plan(sum(plans[i].weight for i in shares[p.model.name]))
    if any(shares.values()):
        check_tokenizers(config, passes)  # a mismatched pair costs two tokenizer loads, not a pass
    models = Models(config)
    for k, p in enumerate(passes):
        chosen = sorted(shares[p.model.name])
        if not chosen:
            continue
        score_pass(
            p,
            chosen,
            plans,
            todo,
            models.get,
            lambda folder: PassJob(config, corpus, analyses, idh, folder, merger, bar),
            parts,
        )
        if k + 1 < len(passes) and not p.variants and p.model.name not in models.kept:
            gc.collect()  # free this model before the next one loads (its reference cycles: 0.5 s)


def pass_left(p, todo: dict[str, list[int]]) -> list[int]:
    """The plan indices pass ``p`` still scores: a lockstep pass scores a part any of its
    models still needs (each writes only its own)."""
    return sorted(set().union(*(todo[m.name] for m in (p.model, *p.variants))))


def score_pass(
    p, chosen: list[int], plans: list[PartPlan], todo: dict[str, list[int]], get, job_for, parts: Path
) -> None:
    """One pass over the plan indices ``chosen``: the unit every executor schedules (a rank's
    share, a shard's, a Ray actor's task). ``get(spec)`` gives a loaded model; ``job_for(folder)``
    the `PassJob` writing a model's parts into ``folder``; ``todo`` says which parts each model
    still needs (a lockstep pass scores a part any of its models needs, each writes its own)."""
    if p.variants:  # every variant with the baseline, its forward once
        group = (p.model, *p.variants)
        jobs = {m.name: job_for(parts / model_dirname(m.name)) for m in group}
        wanted = {m.name: set(todo[m.name]) for m in group}
        loaded = [get(m) for m in group]
        score_lockstep_share(jobs, loaded[0], loaded[1:], [(i, plans[i]) for i in chosen], wanted)
        return
    lm = get(p.model)
    base = get(p.baseline) if p.baseline is not None else None
    score_share(job_for(parts / model_dirname(p.model.name)), lm, base, [(i, plans[i]) for i in chosen])


def _part_paths(config: Config, corpus: Corpus, parts: Path, plans) -> dict[str, list[Path]]:
    """Each model's part files, in corpus order."""
    keys = [plan_key(corpus, p, config.scoring.documents) for p in plans]
    return {m.name: [parts / model_dirname(m.name) / f"{k}.parquet" for k in keys] for m in config.models}


def _run_facts(config: Config, corpus: Corpus) -> RunFacts:
    texts: dict[str, str] = {}  # doc_id -> text, filled on the first call

    def text_of(doc_id: str) -> str:  # only the few top divergence tokens ask, once, at the end
        if not texts:
            texts.update({str(d.doc_id): d.text for d in corpus.documents})
            if config.scoring.documents == "concatenated":  # separator tokens' spans point into the whole stream
                texts[SEPARATOR_ID] = join_documents(list(corpus.documents), config.scoring.separator).document.text
        return texts[doc_id]

    return RunFacts(
        tuple(m.name for m in config.models), len(corpus.documents), corpus.n_skipped, text_of, corpus.groups
    )


def run_loaded(config: Config, corpus: Corpus, lm, out: Path | None = None) -> dict:
    """Score a model already in memory (``lm``, named as ``config.models[0]``) over ``corpus``
    with the plan, producer, pass and analyses of `run`, merged in memory (no parts, no resume):
    the in-loop evaluator's engine. With ``out``, the run's files and run.json are written there.
    Returns the tables and ``run``, the record."""
    started = time.perf_counter()
    analyses = analyses_for(config)
    plans = plan_parts(corpus, config.scoring.documents, config.scoring.separator, config.output.part_chars)
    _require_whole(analyses, plans, corpus)
    merger = Merger(out, analyses, {lm.name: [None] * len(plans)})
    job = PassJob(config, corpus, analyses, "in-memory", None, merger, ScoringProgress(False))
    try:
        score_share(job, lm, None, list(enumerate(plans)))
        files, tables, extra = merger.finish(_run_facts(config, corpus))
    except BaseException:
        merger.abort()
        raise
    record = run_record(config, corpus, merger.protocols, tables["summary"], time.perf_counter() - started)
    record.update(extra)
    if out is not None:
        write_outputs(out, files)
        write_json(record, out / "run.json")
    tables["run"] = record
    return tables


def _finish(
    out: Path,
    config: Config,
    corpus: Corpus,
    parts: Path,
    merger: Merger,
    return_tokens: bool,
    timing: dict,
    replaced: ReplacedParts,
) -> dict:
    """Close the merge, write every analysis's files and run.json, and drop the parts (rank 0 only).

    The previous results of the folder (under --overwrite) are replaced here, file by file,
    atomically; files of theirs this run does not write are removed after run.json."""
    facts = _run_facts(config, corpus)  # its texts, once loaded, serve the merge and the pages
    with replace_outputs(out):
        files, tables, extra = merger.finish(facts)
        write_outputs(out, files)
        record = run_record(config, corpus, merger.protocols, tables["summary"], time.time() - timing["started"])
        record.update(extra)
        if "divergence" in record:  # how the variants met the baseline: one pass, or pair by pair
            ran = any("lockstep" in str(p.get("reductions")) for p in merger.protocols.values())
            mode, why = lockstep_decision(config)  # the reason as it stands now
            if (mode == "lockstep") != ran:
                mode, why = ("lockstep" if ran else "pair"), "decided from the free memory when the parts were scored"
            record["divergence"]["lockstep"] = {"setting": config.compare.lockstep, "mode": mode, "why": why}
        if len(config.models) >= 2 and not config.output.documents_only:  # documents-only: those two tables
            tables.update(write_comparison(out, config, tables, record, merger.row_ranges.get("tokens.parquet")))
        # The merge keeps pace with scoring: what is left after the last part does not grow with the tokens.
        record["seconds_after_last_part"] = time.time() - timing["scored"]
        if timing.get("first_part") is not None:  # loading, planning, probes (absent: nothing was scored here)
            record["seconds_before_first_part"] = timing["first_part"] - timing["started"]
        write_json(record, out / "run.json")
        for write_page in hooks.RUN_PAGES:  # report.html, read back from the files just written
            write_page(out, config, facts.text_of)  # type: ignore[arg-type]
    if return_tokens and config.output.per_token and not config.output.documents_only:
        tables["tokens"] = read_table(merger.writers["tokens.parquet"].path)  # the file, or its folder
    shutil.rmtree(parts)  # run.json marks the run complete; the tables now hold every row
    replaced.discard()
    tables["run"] = record
    return tables
