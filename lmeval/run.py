"""Compose the steps: config -> documents -> tokens -> windows -> scores -> tables -> files."""

from __future__ import annotations

import gc
import itertools
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import calibration as cal
from . import distributed
from .config import Config, ModelConfig, load_config
from .data import (
    SEPARATOR_ID,
    resolve_prefix,
    Corpus,
    Document,
    TokenizedDocument,
    check_texts,
    join_documents,
    load_documents,
    split_stream,
    tokenize_documents,
)
from .errors import DataError, OutputError
from .parts import finished_keys, model_dirname, open_parts, part_key, plan_groups, read_columns, read_meta, write_part
from .provenance import fingerprint_model, tokenizer_fingerprint, versions
from .report import (
    TokenWriter,
    char_spans,
    document_sums,
    documents_frame,
    normalisers,
    prepare_output_dir,
    summary_row,
    token_strings,
    tokens_frame,
    write_json,
    write_table,
)

log = logging.getLogger(__name__)
from .scoring import LoadedModel, ModelSpec, ScoreOptions, check_vocabulary, load_model, prepare_model, resolve_window, score_windows
from .windows import make_windows


def as_loaded_model(model, name: str | None = None) -> LoadedModel:
    """Accept a path or hub id, a `ModelSpec`, a ``(model, tokenizer)`` pair or a `LoadedModel`."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(ModelSpec(path=str(model), name=name))
    if isinstance(model, ModelSpec):
        return load_model(model)
    if isinstance(model, tuple) and len(model) == 2:
        return prepare_model(model[0], model[1], name=name or type(model[0]).__name__)
    raise DataError(
        f"model: must be a path, a hub id or a (model, tokenizer) pair (got {type(model).__name__})."
    )


def check_batch_tokens(batch_tokens) -> int:
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise DataError(
            f"scoring.batch_tokens: must be an integer >= 1 (got {batch_tokens!r}). "
            "It is the token budget of one batch, e.g. 16384."
        )
    return batch_tokens


def score_documents(
    lm: LoadedModel,
    docs: list[TokenizedDocument],
    max_length: int | None,
    stride: int | None,
    options: ScoreOptions,
    progress=None,
) -> dict[str, np.ndarray]:
    """Window every document and score the windows; columns carry ``doc_index`` into ``docs``."""
    length, step = resolve_window(lm, max_length, stride)
    if docs:
        check_vocabulary(lm, max((int(d.token_ids.max()) for d in docs if len(d.token_ids)), default=0))
    windows = [w for i, d in enumerate(docs) for w in make_windows(i, d.token_ids.tolist(), d.prefix, length, step)]
    return score_windows(lm, windows, options, progress=progress)


def score_texts(
    texts,
    model,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos="auto",
    batch_tokens: int = 16384,
    top_k: int = 0,
    temperatures: tuple[float, ...] = (),
    name: str | None = None,
    compile: str | bool = "auto",
) -> pd.DataFrame:
    """Score each text with a causal LM; return one row per scored token.

    ``model`` is a local path, a hub id, or an already loaded ``(model, tokenizer)`` pair.
    ``doc_id`` is the text's index in ``texts``. Columns (``nll`` in nats, ``surprisal_bits``
    in bits): model, doc_id, position, token_id, token, char_start, char_end, context_len,
    nll, surprisal_bits, entropy, max_prob, is_top1, rank, sum_q2, mean_neg_logq, and with
    ``top_k`` > 0 also topk_token_ids, topk_probs. An empty text yields no rows; the frame's
    ``attrs["n_documents"]`` still counts it. ``compile`` fuses the per-token reductions with
    torch.compile (``"auto"``: on CUDA, or when tokens x vocabulary >= 4e9 on CPU).
    """
    texts = check_texts(texts)
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(batch_tokens), top_k=top_k, temperatures=tuple(temperatures), compile=compile
    )
    lm = as_loaded_model(model, name)
    docs = tokenize_documents([Document(i, t) for i, t in enumerate(texts)], lm.tokenizer, bos)
    columns = score_documents(lm, docs, max_length, stride, options)
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    frame = tokens_frame(lm.name, [d.doc_id for d in docs], columns)
    frame.attrs["n_documents"] = len(texts)
    frame.attrs["n_empty"] = sum(d.n_scored == 0 for d in docs)
    return frame


# --------------------------------------------------------------------------------------
# lmeval run
# --------------------------------------------------------------------------------------


def _spec(model: ModelConfig) -> ModelSpec:
    return ModelSpec(
        path=model.path, name=model.name, dtype=model.dtype, device=model.device, revision=model.revision,
        trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle,
        device_map=model.device_map, max_memory=model.max_memory,
    )  # fmt: skip


def _finish_columns(lm, columns: dict, docs: list[TokenizedDocument]) -> dict:
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    del columns["topk_ids"], columns["topk_probs"]
    return columns


def _score_group(lm, documents: list[Document], config: Config, options, progress):
    """Score documents independently; columns' ``doc_index`` indexes ``documents``."""
    docs = tokenize_documents(documents, lm.tokenizer, config.scoring.bos)
    columns = score_documents(lm, docs, config.scoring.max_length, config.scoring.stride, options, progress)
    return _finish_columns(lm, columns, docs), [d.scored_text() for d in docs]


def _score_stream(lm, documents: list[Document], config: Config, options, progress):
    """Score documents joined into one stream; ``doc_index`` D marks separator tokens."""
    stream = join_documents(documents, config.scoring.separator)
    (doc,) = tokenize_documents([stream.document], lm.tokenizer, config.scoring.bos)
    columns = _finish_columns(lm, score_documents(lm, [doc], config.scoring.max_length, config.scoring.stride, options, progress), [doc])
    index, start, end, position = split_stream(stream, columns["char_start"], columns["char_end"])
    columns.update(doc_index=index, char_start=start, char_end=end, position=position)
    texts = [d.text for d in documents]
    if not doc.prefix and len(doc.token_ids):  # the stream's first token only conditions
        texts[0] = texts[0][int(doc.offsets[0, 1]) :]
    return columns, texts + [config.scoring.separator * (len(texts) - 1)]


def plan_parts(corpus: Corpus, config: Config) -> list[list[int]]:
    """Groups of corpus indices, one part each; concatenated scoring is one stream, one part."""
    if config.scoring.documents == "concatenated":
        return [list(range(len(corpus.documents)))]
    return plan_groups([len(d.text) for d in corpus.documents], config.output.part_chars)


def _group_ids(corpus: Corpus, group: list[int], config: Config) -> list:
    ids = [corpus.documents[i].doc_id for i in group]
    return ids + [SEPARATOR_ID] if config.scoring.documents == "concatenated" else ids


def score_parts(model: ModelConfig, corpus: Corpus, config: Config, folder: Path, groups, bar) -> None:
    """Score every group of ``groups`` whose part is missing, writing each part as it finishes."""
    done = finished_keys(folder)
    todo = [g for g in groups if part_key(_group_ids(corpus, g, config)) not in done]
    if not todo:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lm = as_loaded_model(_spec(model))
    s = config.scoring
    options = ScoreOptions(batch_tokens=check_batch_tokens(s.batch_tokens), temperatures=config.calibration.temperatures, compile=s.compile)
    protocol = _protocol(lm, config)  # also checks the window against the model, before any scoring
    score = _score_stream if s.documents == "concatenated" else _score_group
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
    }  # fmt: skip


CALIBRATION_INPUTS = ["nll", "max_prob", "is_top1", "sum_q2", "mean_neg_logq", "entropy", "nll_t", "max_prob_t"]


@dataclass
class ModelTables:
    """One model's collected results (per-token rows stay on disk)."""

    documents: pd.DataFrame
    summary: dict
    calibration: pd.DataFrame
    temperature: pd.DataFrame
    bins: cal.ReliabilityBins
    protocol: dict


def collect_model(name: str, corpus: Corpus, config: Config, paths: list[Path], token_sink) -> ModelTables:
    """Merge a model's parts, in corpus order: documents, pooled summary, calibration; each
    part's token rows go to ``token_sink`` so they never all sit in memory at once."""
    c = config.calibration
    metas = [read_meta(p) for p in paths]
    sums, confidences, seconds = None, [], 0.0
    for path, meta in zip(paths, metas):
        columns = read_columns(path)
        part_sums = cal.calibration_sums(
            *(columns[k] for k in CALIBRATION_INPUTS[:6]), eps_grid=c.label_smoothing, nll_t=columns.get("nll_t"),
            max_prob_t=columns.get("max_prob_t"), temperatures=c.temperatures, n_bins=c.bins,
        )  # fmt: skip
        sums = part_sums if sums is None else cal.merge_sums(sums, part_sums)
        if c.binning == "mass":
            confidences.append((columns["max_prob"], columns["is_top1"]))
        if token_sink is not None:
            token_sink(tokens_frame(name, meta["doc_ids"], columns))
        seconds += meta["seconds"]
    fields = ("doc_ids", "n_tokens", "n_bytes", "n_words", "nll_sum")
    documents = documents_frame(name, *(list(itertools.chain.from_iterable(m[k] for m in metas)) for k in fields))
    summary = summary_row(name, documents, n_skipped=corpus.n_skipped, seconds=seconds)
    summary["n_documents"] = len(corpus.documents)
    protocol = metas[0]["protocol"]
    metrics = cal.summarize(sums, vocab_size=protocol["vocab_size"])
    bins = sums.bins
    if c.binning == "mass":
        conf, top1 = (np.concatenate(x) for x in zip(*confidences))
        bins = cal.reliability_bins(conf, top1, c.bins, scheme="mass")
        metrics.update(ece=cal.expected_calibration_error(bins), mce=cal.max_calibration_error(bins))
    summary.update(metrics)
    calibration, temperature = bins.to_frame(), cal.temperature_table(sums, c.temperatures)
    calibration.insert(0, "model", name)
    temperature.insert(0, "model", name)
    return ModelTables(documents, summary, calibration, temperature, bins, protocol)


PROTOCOL_NOTES = {
    "windows": "targets in spans of `stride` new tokens; each window holds at most `max_length` ids "
    "ending at its last target; every token is scored exactly once (stride = max_length is "
    "lm-evaluation-harness loglikelihood_rolling)",
    "normalisers": {
        "tokens": "scored tokens",
        "bytes": "UTF-8 bytes of the scored text",
        "words": "len(re.split(r'\\s+', text)) per document, as lm-evaluation-harness counts them",
    },
    "aggregation": "pooled: ppl = exp(sum nll / sum tokens); never a mean of per-document ratios",
    "log_base": "nll in nats (natural log); *_bits and bits_per_* are nats / ln 2",
}


class _Progress:
    """A tqdm bar over scored tokens. Its total is estimated from the characters still to
    score and the tokens per character seen so far, so the ETA holds across groups."""

    def __init__(self, show: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc="scoring", unit="tok", disable=not show, dynamic_ncols=True)
        self.chars_left = 0  # planned characters not yet started
        self.chars_seen = 0  # characters of the groups started so far
        self.done_before = 0  # tokens of the groups finished before the current one

    def plan(self, n_chars: int) -> None:
        self.chars_left += n_chars

    def group(self, n_chars: int) -> None:
        self.done_before = self.bar.n
        self.chars_left -= n_chars
        self.chars_seen += n_chars

    def progress(self, done: int, total: int) -> None:
        known = self.done_before + total
        self.bar.total = known + round(self.chars_left * known / max(self.chars_seen, 1))
        self.bar.update(done)

    def close(self):
        self.bar.close()


def _identity(config: Config, corpus: Corpus) -> dict:
    """What the parts depend on: changing any of it makes earlier parts invalid."""
    raw = config.to_dict()
    scoring_models = [{k: m[k] for k in ("name", "path", "revision", "dtype")} for m in raw["models"]]
    return {
        "config": {"models": scoring_models, "data": raw["data"], "scoring": raw["scoring"],
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
        bar = _Progress(show_progress and ctx.is_main)
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


def _finish(out: Path, config: Config, corpus: Corpus, parts: Path, groups, return_tokens: bool, started: float) -> dict:
    """Merge every part into the tables, write run.json, and drop the parts (rank 0 only)."""
    _check_parts(config, corpus, parts, groups)
    tables = _write_tables(out, config, corpus, parts, groups, return_tokens)
    record = _record(config, corpus, tables, time.time() - started)
    if len(config.models) >= 2:
        tables.update(_compare(out, config, tables, record))
    write_json(record, out / "run.json")
    shutil.rmtree(parts)  # run.json marks the run complete; the tables now hold every row
    tables["run"] = record
    return tables


def _compare(out: Path, config: Config, tables: dict, record: dict) -> dict:
    """compare.csv (and the per-token diff) of every model against the baseline."""
    from .compare import compare_tables, write_compare

    with_tokens = dict(tables)
    if "tokens" not in tables and (out / "tokens.parquet").exists():
        columns = ["model", "doc_id", "position", "token_id", "token", "nll", "char_start", "char_end"]
        with_tokens["tokens"] = pd.read_parquet(out / "tokens.parquet", columns=columns)
    frames = compare_tables(with_tokens, record, config.compare)
    write_compare(out, frames, tables["summary"])
    return frames


def _check_parts(config: Config, corpus: Corpus, parts: Path, groups) -> None:
    keys = [part_key(_group_ids(corpus, g, config)) for g in groups]
    missing = [m.name for m in config.models if set(keys) - finished_keys(parts / model_dirname(m.name))]
    if missing:
        raise OutputError(
            f"output.dir: every result part must be in {parts} before the merge (parts of {', '.join(missing)} are missing). "
            "Every rank writes there: put `output.dir` on a file system all nodes share, then rerun to resume."
        )


def _write_tables(out: Path, config: Config, corpus: Corpus, parts: Path, groups, return_tokens: bool) -> dict:
    writer = TokenWriter(out / "tokens.parquet") if config.output.per_token else None
    results = []
    for model in config.models:
        paths = [parts / model_dirname(model.name) / f"{part_key(_group_ids(corpus, g, config))}.parquet" for g in groups]
        results.append((model.name, collect_model(model.name, corpus, config, paths, writer.write if writer else None)))
    if writer is not None:
        writer.close()
    tables = {
        "documents": pd.concat([r.documents for _, r in results], ignore_index=True),
        "summary": pd.DataFrame([r.summary for _, r in results]),
        "calibration": pd.concat([r.calibration for _, r in results], ignore_index=True),
        "temperature": pd.concat([r.temperature for _, r in results], ignore_index=True),
        "protocol": {name: r.protocol for name, r in results},
    }
    write_table(tables["documents"], out / "documents.parquet")
    for name in ("summary", "calibration", "temperature"):
        write_table(tables[name], out / f"{name}.csv")
    cal.plot_reliability({name: r.bins for name, r in results}, out / "reliability.png")
    if return_tokens and config.output.per_token:
        tables["tokens"] = pd.read_parquet(out / "tokens.parquet")
    return tables


def _record(config: Config, corpus: Corpus, tables: dict, seconds: float) -> dict:
    summary = tables["summary"]
    return {
        "config": config.to_dict(),
        "protocol": {**PROTOCOL_NOTES, "models": tables.pop("protocol")},
        "versions": versions(),
        "models": {m.name: fingerprint_model(m.path, m.revision) for m in config.models},
        "data": {"path": config.data.path, "fingerprint": corpus.fingerprint,
                 "n_documents": len(corpus.documents), "n_skipped": corpus.n_skipped},
        "seconds": seconds,
        "tokens_per_second": dict(zip(summary.model, summary.tokens_per_second)),
    }  # fmt: skip
