"""`lmeval run`: config -> documents -> parts (scored, resumable) -> merged tables -> files.

A run is planned as fixed groups of documents, one result part each, from the corpus alone;
each part is written as soon as it is scored, so an interrupted run resumes where it
stopped. Under torchrun / accelerate launch the ranks share the unfinished parts, and rank 0
merges them (`merge`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from pathlib import Path

from ..model.loading import load_model
from ..model.scorer import ScoreOptions, resolve_window
from . import distributed
from .config import Config, load_config
from .data import SEPARATOR_ID, Corpus, load_documents, resolve_prefix
from ..errors import OutputError
from .files import prepare_output_dir, write_json
from .merge import check_parts_present, merge_tables, run_record, write_comparison
from .parts import finished_keys, model_dirname, open_parts, part_key, plan_groups, read_meta, roundtrip, write_part
from .progress import ScoringProgress
from .provenance import fingerprint_model, tokenizer_fingerprint
from .score import check_batch_tokens, score_group, score_stream
from .tables import document_sums, normalisers

log = logging.getLogger(__name__)


def plan_parts(corpus: Corpus, config: Config) -> list[list[int]]:
    """Groups of corpus indices, one part each; concatenated scoring is one stream, one part."""
    if config.scoring.documents == "concatenated":
        return [list(range(len(corpus.documents)))]
    return plan_groups([len(d.text) for d in corpus.documents], config.output.part_chars)


def _group_ids(corpus: Corpus, group: list[int], config: Config) -> list:
    ids = [corpus.documents[i].doc_id for i in group]
    return ids + [SEPARATOR_ID] if config.scoring.documents == "concatenated" else ids


def score_parts(model, corpus: Corpus, config: Config, folder: Path, groups, bar) -> None:
    """Score every group of ``groups`` whose part is missing, writing each part as it finishes."""
    done = finished_keys(folder)
    todo = [g for g in groups if part_key(_group_ids(corpus, g, config)) not in done]
    if not todo:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lm = load_model(model)
    s = config.scoring
    options = ScoreOptions(batch_tokens=check_batch_tokens(s.batch_tokens), temperatures=config.calibration.temperatures, compile=s.compile)
    protocol = _protocol(lm, config)  # also checks the window against the model, before any scoring
    _check_resumed_protocol(folder, done, protocol, model.name)
    score = score_stream if s.documents == "concatenated" else score_group
    for group in todo:
        started = time.perf_counter()
        bar.group(sum(len(corpus.documents[i].text) for i in group))
        columns, texts = score(lm, [corpus.documents[i] for i in group], config, options, bar.progress)
        n_tokens, nll_sum = document_sums(columns["doc_index"], columns["nll"], len(texts))
        n_bytes, n_words = normalisers(texts)
        ids = _group_ids(corpus, group, config)
        meta = {
            "doc_ids": ids, "n_tokens": n_tokens.tolist(), "nll_sum": nll_sum.tolist(), "n_bytes": n_bytes,
            "n_words": n_words, "seconds": time.perf_counter() - started, "protocol": protocol,
        }  # fmt: skip
        write_part(folder / f"{part_key(ids)}.parquet", columns, meta)
    del lm
    gc.collect()


def _protocol(lm, config: Config) -> dict:
    s = config.scoring
    length, stride = resolve_window(lm, s.max_length, s.stride)
    return {
        "max_length": length, "stride": stride, "bos": s.bos,
        "bos_token_id": (resolve_prefix(lm.tokenizer, s.bos) or [None])[0],
        "documents": s.documents, "separator": s.separator if s.documents == "concatenated" else None,
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer), "vocab_size": lm.vocab_size,
        "commit_sha": lm.commit_sha, **lm.probes.protocol(),
    }  # fmt: skip


def _check_resumed_protocol(folder: Path, done: set[str], protocol: dict, name: str) -> None:
    """Parts already on disk must come from the protocol just resolved: a hub model whose
    branch moved (another commit), or a tokenizer that changed, would otherwise mix two
    models in one table. Checked after loading, since only then are these known."""
    if not done:
        return
    previous = read_meta(folder / f"{sorted(done)[0]}.parquet")["protocol"]
    changed = sorted(k for k in set(previous) | set(protocol) if previous.get(k) != roundtrip(protocol).get(k))
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {protocol.get(k)!r}" for k in changed)
        raise OutputError(
            f"output.dir: the finished parts of model {name} were scored with another protocol ({details}). "
            "Rerun with --fresh to discard them, or pin `revision` to the commit they were scored with."
        )


def _identity(config: Config, corpus: Corpus) -> dict:
    """What the parts depend on: changing any of it makes earlier parts invalid."""
    raw = config.to_dict()
    return {
        "config": {"models": [dataclasses.asdict(m) for m in config.models], "data": raw["data"], "scoring": raw["scoring"],
                   "temperatures": raw["calibration"]["temperatures"], "part_chars": raw["output"]["part_chars"]},
        "data": corpus.fingerprint,
        "models": {m.name: fingerprint_model(m.path, m.revision)["fingerprint"] for m in config.models},
    }  # fmt: skip


def run(
    config, overrides: list[str] | None = None, *, overwrite: bool = False, fresh: bool = False,
    show_progress: bool = True, return_tokens: bool = True,
) -> dict:  # fmt: skip
    """Run a config end to end; write the tables to ``output.dir`` and return them as DataFrames.

    ``config`` is a `Config` or a path to a YAML file (then ``overrides`` apply). Finished
    parts of an interrupted run in the same dir are reused (``fresh`` discards them).
    Returns ``tokens`` (unless ``return_tokens`` is false), ``documents``, ``summary``,
    ``calibration``, ``temperature``, and ``run``, the record written to run.json.

    Under ``torchrun`` or ``accelerate launch`` every process calls this. Rank 0 prepares
    ``output.dir``; each rank scores its share of the unfinished part groups; rank 0 merges
    the parts and returns the tables once they are written, and every other rank returns an
    empty dict at the same moment. An error on any rank is raised on every rank.
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    with distributed.launched() as ctx:
        started = time.time()
        opened = ctx.call(lambda: _open_run(config, overwrite, fresh), main_only=True)  # rank 0 first
        out, corpus, parts = ctx.call(lambda: opened if ctx.is_main else _join_run(config))
        groups = plan_parts(corpus, config)
        todo = ctx.broadcast(_unfinished(corpus, config, parts, groups) if ctx.is_main else None)
        bar = ScoringProgress(show_progress and ctx.is_main)
        try:
            ctx.call(lambda: _score_share(config, corpus, parts, groups, todo, ctx, bar))
        finally:
            bar.close()
        tables = ctx.call(lambda: _finish(out, config, corpus, parts, groups, return_tokens, started), main_only=True)
    return tables if ctx.is_main else {}


def _open_run(config: Config, overwrite: bool, fresh: bool):
    """Rank 0's start: the run dir, the corpus, and the parts folder stamped with the run's identity."""
    out = prepare_output_dir(config.output.dir, overwrite)
    corpus = load_documents(config.data)
    return out, corpus, open_parts(out, _identity(config, corpus), fresh=fresh or overwrite)


def _join_run(config: Config):
    """Another rank's start, once rank 0's is done: the same corpus, checked against the manifest."""
    out = Path(config.output.dir)
    corpus = load_documents(config.data)
    return out, corpus, open_parts(out, _identity(config, corpus), fresh=False)


def _unfinished(corpus: Corpus, config: Config, parts: Path, groups) -> dict[str, list[int]]:
    """Per model, the indices of the groups whose part is not written yet (listed once, by rank 0)."""
    todo = {}
    for model in config.models:
        done = finished_keys(parts / model_dirname(model.name))
        todo[model.name] = [i for i, g in enumerate(groups) if part_key(_group_ids(corpus, g, config)) not in done]
    return todo


def _score_share(config: Config, corpus: Corpus, parts: Path, groups, todo: dict, ctx, bar) -> None:
    """Score this rank's share of each model's unfinished groups, balanced by characters."""
    weights = [sum(len(corpus.documents[i].text) for i in g) for g in groups]
    shares = {}
    for model in config.models:
        left = todo[model.name]
        share = distributed.assign([groups[i] for i in left], [weights[i] for i in left], ctx.world_size)[ctx.rank]
        shares[model.name] = [left[j] for j in share]
        bar.plan(sum(weights[i] for i in shares[model.name]))
    for model in config.models:
        score_parts(model, corpus, config, parts / model_dirname(model.name), [groups[i] for i in shares[model.name]], bar)


def _part_paths(config: Config, corpus: Corpus, parts: Path, groups) -> dict[str, list[Path]]:
    """Each model's part files, in corpus order."""
    keys = [part_key(_group_ids(corpus, g, config)) for g in groups]
    return {m.name: [parts / model_dirname(m.name) / f"{k}.parquet" for k in keys] for m in config.models}


def _finish(out: Path, config: Config, corpus: Corpus, parts: Path, groups, return_tokens: bool, started: float) -> dict:
    """Merge every part into the tables, write run.json, and drop the parts (rank 0 only)."""
    part_paths = _part_paths(config, corpus, parts, groups)
    check_parts_present(part_paths, parts)
    tables = merge_tables(out, config, corpus, part_paths, return_tokens)
    record = run_record(config, corpus, tables, time.time() - started)
    if len(config.models) >= 2:
        tables.update(write_comparison(out, config, tables, record))
    write_json(record, out / "run.json")
    shutil.rmtree(parts)  # run.json marks the run complete; the tables now hold every row
    tables["run"] = record
    return tables
