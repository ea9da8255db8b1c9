"""`lmeval run`: config -> documents -> parts (scored, resumable) -> merged tables -> files.

A run is planned as fixed parts of the corpus (`plan`), each written as soon as it is
scored, so an interrupted run resumes where it stopped. Rank 0 holds the run folder's lock
for the whole run, checks every finished part (`resume`), and merges them at the end
(`merge`); under torchrun / accelerate launch the ranks share the unfinished parts.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from pathlib import Path

from ..errors import OutputError
from ..model.loading import load_model
from ..model.scorer import ScoreOptions, decide_compile, resolve_window
from . import distributed
from . import divergence_run
from ..analyses import plots
from ..analyses.analysis import scoring_meta
from ..producers.chat import score_chat_group
from .config import Config, load_config
from ..producers.continuation import score_context_group
from .data import Corpus, load_documents, resolve_prefix, tokenize_documents
from .files import clean_leftovers, prepare_output_dir, replace_outputs, write_json
from .lock import RunLock
from .merge import check_parts_present, merge_tables, run_record, write_comparison
from .parts import finished_keys, identity_hash, model_dirname, open_parts, read_meta, roundtrip, write_part
from .plan import PartPlan, part_doc_ids, plan_key, plan_parts, require_whole
from .prefetch import BackgroundWriter, prefetched
from .progress import ScoringProgress
from .provenance import fingerprint_model, tokenizer_fingerprint
from .resume import ReplacedParts, finished_plans
from ..producers.score import check_batch_tokens, score_group, score_stream
from ..producers.tables import document_sums, normalisers

log = logging.getLogger(__name__)


def run(
    config, overrides: list[str] | None = None, *, overwrite: bool = False, fresh: bool = False,
    show_progress: bool = True, return_tokens: bool = True,
) -> dict:  # fmt: skip
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
    lock = RunLock(Path(config.output.dir))
    with distributed.launched() as ctx:
        try:
            tables = _run_locked(config, overwrite, fresh, show_progress, return_tokens, ctx, lock)
        finally:
            lock.release()
    return tables if ctx.is_main else {}


def _run_locked(config: Config, overwrite, fresh, show_progress, return_tokens, ctx, lock: RunLock):
    started = time.time()
    opened = ctx.call(lambda: _open_run(config, overwrite, fresh, lock), main_only=True)  # rank 0 first
    out, corpus, parts, replaced = ctx.call(lambda: opened if ctx.is_main else _join_run(config))
    try:
        plans = plan_parts(corpus, config.scoring.documents, config.scoring.separator, config.output.part_chars)
        if config.analysis.membership:  # per-document scores need every token of a document in one part
            for plan in plans:
                require_whole(plan, [corpus.documents[i] for i in plan.docs], "analysis.membership")
        todo = ctx.broadcast(_unfinished(corpus, config, parts, plans) if ctx.is_main else None)
        groups, group_ids = _divergence_groups(config, corpus, plans)
        pair_todo = ctx.broadcast(divergence_run.unfinished(config, parts, group_ids) if ctx.is_main else None)
        bar = ScoringProgress(show_progress and ctx.is_main)
        warm = plots.warm_up() if ctx.is_main else None  # the figures' one-time cost, paid while scoring
        try:  # the divergence pass first: a tokenizer mismatch is refused before any long scoring
            ctx.call(lambda: divergence_run.score_share(config, corpus, parts, groups, group_ids, pair_todo, ctx, bar))
            ctx.call(lambda: _score_share(config, corpus, parts, plans, todo, ctx, bar))
        finally:
            bar.close()
            if warm is not None:
                warm.join()
    except BaseException:
        if ctx.is_main:
            replaced.restore_if_nothing_scored()  # a run that failed before scoring changes nothing
        raise
    return ctx.call(lambda: _finish(out, config, corpus, parts, plans, return_tokens, started, replaced), main_only=True)


def _open_run(config: Config, overwrite: bool, fresh: bool, lock: RunLock):
    """Rank 0's start: the lock, the run dir, the corpus, and the parts folder stamped with
    the run's identity (an older run's parts of another identity are set aside, not deleted,
    under --overwrite)."""
    out = prepare_output_dir(config.output.dir, overwrite)
    lock.acquire()
    clean_leftovers(out)
    corpus = load_documents(config.data)
    identity = _identity(config, corpus)
    replaced = ReplacedParts(out / "parts", overwrite)
    if overwrite and not fresh:
        replaced.set_aside_if_foreign(identity)
    return out, corpus, open_parts(out, identity, fresh=fresh), replaced


def _join_run(config: Config):
    """Another rank's start, once rank 0's is done: the same corpus, checked against the manifest."""
    out = Path(config.output.dir)
    corpus = load_documents(config.data)
    return out, corpus, open_parts(out, _identity(config, corpus), fresh=False), ReplacedParts(out / "parts")


def _identity(config: Config, corpus: Corpus) -> dict:
    """What the parts depend on: changing any of it makes earlier parts invalid. Every field
    of every model record counts, whatever fields the record grows."""
    raw = config.to_dict()
    return {
        "config": {"models": [dataclasses.asdict(m) for m in config.models], "data": raw["data"], "scoring": raw["scoring"],
                   "temperatures": raw["calibration"]["temperatures"], "part_chars": raw["output"]["part_chars"],
                   # parts scored for membership carry var_logq and zlib sizes; others do not
                   **({"membership": True} if config.analysis.membership else {})},
        "data": corpus.fingerprint,
        "models": {m.name: fingerprint_model(m.path, m.revision)["fingerprint"] for m in config.models},
    }  # fmt: skip


def _unfinished(corpus: Corpus, config: Config, parts: Path, plans: list[PartPlan]) -> dict[str, list[int]]:
    """Per model, the indices of the plans whose part must still be scored (listed once, by
    rank 0): missing ones, and finished ones that fail their checks (named in a warning)."""
    idh = identity_hash(_identity(config, corpus))
    keys = [plan_key(corpus, p, config.scoring.documents) for p in plans]
    todo = {}
    for model in config.models:
        done = finished_plans(parts / model_dirname(model.name), keys, idh)
        todo[model.name] = [i for i, key in enumerate(keys) if key not in done]
    return todo


def _score_share(config: Config, corpus: Corpus, parts: Path, plans, todo: dict, ctx, bar) -> None:
    """Score this rank's share of each model's unfinished parts, balanced by characters."""
    shares = {}
    for model in config.models:
        left = todo[model.name]
        share = distributed.assign([plans[i] for i in left], [plans[i].weight for i in left], ctx.world_size)[ctx.rank]
        shares[model.name] = [left[j] for j in share]
        bar.plan(sum(plans[i].weight for i in shares[model.name]))
    idh = identity_hash(_identity(config, corpus))
    for k, model in enumerate(config.models):
        folder = parts / model_dirname(model.name)
        score_parts(model, corpus, config, folder, [plans[i] for i in shares[model.name]], bar, idh,
                    another_follows=k + 1 < len(config.models))  # fmt: skip


# Tokens are counted only once a part is tokenized; English BPE averages about 4 characters
# a token (code and CJK fewer, so the estimate errs toward the eager reductions).
CHARS_PER_TOKEN = 4


def score_parts(model, corpus: Corpus, config: Config, folder: Path, plans: list[PartPlan], bar, idh: str,
                another_follows: bool = True) -> None:  # fmt: skip
    """Score ``plans`` (this rank's unfinished parts of one model), writing each part as it finishes."""
    if not plans:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lm = load_model(model)
    s = config.scoring
    options = ScoreOptions(batch_tokens=check_batch_tokens(s.batch_tokens), temperatures=config.calibration.temperatures, compile=s.compile,
                           moments=config.analysis.membership)  # Var_q[log q], for Min-K%++
    # `compile: auto` is settled once for this rank's whole share, from its characters.
    options = decide_compile(lm, options, int(sum(plan.weight for plan in plans) / CHARS_PER_TOKEN))
    protocol = protocol_record(lm, config)  # also checks the window against the model, before any scoring
    _check_protocol(folder, protocol, model.name)
    score = score_stream if s.documents == "concatenated" else score_group
    if config.data.context_field is not None:
        score = score_context_group
    elif config.data.messages_field is not None:
        score = score_chat_group
    cache: dict = {}  # the pieces of one document share its tokenization
    # Independent documents: the next part is tokenized, and the last one written, while one is
    # scored (pieces after the first reuse their document's tokens).
    tokenize = (lambda plan: {"docs": tokenize_documents([corpus.documents[i] for i in plan.docs], lm.tokenizer, s.bos)}
                if plan.piece == 0 else {}) if score is score_group else (lambda plan: {})  # fmt: skip
    with BackgroundWriter() as writer:
        for plan, ready in prefetched(plans, tokenize):
            started = time.perf_counter()
            bar.group(plan.weight, tokenizing=not ready and (plan.piece == 0 or not cache))
            calls = dict(lm.workspace.calls)
            documents = [corpus.documents[i] for i in plan.docs]
            columns, texts = score(lm, documents, config, options, bar.progress, piece=plan, cache=cache, **ready)
            n_tokens, nll_sum = document_sums(columns["doc_index"], columns["nll"], len(texts))
            n_bytes, n_words = normalisers(texts)
            meta = {
                "doc_ids": part_doc_ids(corpus, plan, s.documents), "piece": [plan.piece, plan.n_pieces],
                "n_tokens": n_tokens.tolist(), "nll_sum": nll_sum.tolist(), "n_bytes": n_bytes, "n_words": n_words,
                "seconds": time.perf_counter() - started, "identity": idh,
                "protocol": {**protocol, "reductions": lm.workspace.mode_since(calls)},  # how they ran: compiled or eager
                **scoring_meta(texts, config.analysis),
            }  # fmt: skip
            writer.submit(write_part, folder / f"{plan_key(corpus, plan, s.documents)}.parquet", columns, meta)
    del lm
    if another_follows:  # free this model's reference cycles before the next one loads (0.5 s)
        gc.collect()


def protocol_record(lm, config: Config) -> dict:
    """The resolved protocol of one model in a run: what its numbers mean (also the in-loop evaluator's)."""
    s = config.scoring
    length, stride = resolve_window(lm, s.max_length, s.stride)
    return {
        "max_length": length, "stride": stride, "bos": s.bos,
        "bos_token_id": (resolve_prefix(lm.tokenizer, s.bos) or [None])[0],
        "documents": s.documents, "separator": s.separator if s.documents == "concatenated" else None,
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer), "vocab_size": lm.vocab_size,
        "commit_sha": lm.commit_sha, **lm.probes.protocol(),
    }  # fmt: skip


def _check_protocol(folder: Path, protocol: dict, name: str) -> None:
    """Finished parts of a model must have been scored with the protocol just resolved. A hub
    model whose branch moved (another commit) passes the identity check, which is made before
    loading; mixing it with the parts of the old commit would put two models in one table."""
    done = sorted(finished_keys(folder))
    if not done:
        return
    previous = read_meta(folder / f"{done[0]}.parquet")["protocol"]
    # How the reductions ran (compiled or eager) is recorded, but changes no number.
    changed = sorted(k for k in (set(previous) | set(protocol)) - {"reductions"} if previous.get(k) != roundtrip(protocol).get(k))
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {protocol.get(k)!r}" for k in changed)
        raise OutputError(
            f"output.dir: the finished parts of model {name} were scored with another protocol ({details}). "
            "Rerun with --fresh to discard them, or pin `revision` to the commit they were scored with."
        )


def _divergence_groups(config: Config, corpus: Corpus, plans: list[PartPlan]) -> tuple[list, list]:
    """The divergence pass's parts: the plan's document groups, each whole (the pieces of a
    huge document are one divergence part)."""
    groups = list(dict.fromkeys(plan.docs for plan in plans))
    return [list(g) for g in groups], [part_doc_ids(corpus, PartPlan(g), config.scoring.documents) for g in groups]


def _part_paths(config: Config, corpus: Corpus, parts: Path, plans) -> dict[str, list[Path]]:
    """Each model's part files, in corpus order."""
    keys = [plan_key(corpus, p, config.scoring.documents) for p in plans]
    return {m.name: [parts / model_dirname(m.name) / f"{k}.parquet" for k in keys] for m in config.models}


def _finish(out: Path, config: Config, corpus: Corpus, parts: Path, plans, return_tokens: bool, started: float,
            replaced: ReplacedParts) -> dict:  # fmt: skip
    """Merge every part into the tables, write run.json, and drop the parts (rank 0 only).

    The previous results of the folder (under --overwrite) are replaced here, file by file,
    atomically; files of theirs this run does not write are removed after run.json."""
    part_paths = _part_paths(config, corpus, parts, plans)
    check_parts_present(part_paths, parts)
    with replace_outputs(out):
        tables = merge_tables(out, config, corpus, part_paths, return_tokens)
        record = run_record(config, corpus, tables, time.time() - started)
        if len(config.models) >= 2:
            tables.update(write_comparison(out, config, tables, record))
        _, group_ids = _divergence_groups(config, corpus, plans)
        tables.update(divergence_run.write_divergence(out, config, corpus, parts, group_ids, record))
        write_json(record, out / "run.json")
    shutil.rmtree(parts)  # run.json marks the run complete; the tables now hold every row
    replaced.discard()
    tables["run"] = record
    return tables
