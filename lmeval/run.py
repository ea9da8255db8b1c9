"""Compose the steps: config -> documents -> tokens -> windows -> scores -> tables -> files."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import calibration as cal
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
from .errors import DataError
from .provenance import fingerprint_model, tokenizer_fingerprint, versions
from .report import char_spans, documents_frame, summary_row, tokens_frame

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
) -> pd.DataFrame:
    """Score each text with a causal LM; return one row per scored token.

    ``model`` is a local path, a hub id, or an already loaded ``(model, tokenizer)`` pair.
    ``doc_id`` is the text's index in ``texts``. Columns (``nll`` in nats, ``surprisal_bits``
    in bits): model, doc_id, position, token_id, token, char_start, char_end, context_len,
    nll, surprisal_bits, entropy, max_prob, is_top1, rank, sum_q2, mean_neg_logq, and with
    ``top_k`` > 0 also topk_token_ids, topk_probs. An empty text yields no rows; the frame's
    ``attrs["n_documents"]`` still counts it.
    """
    texts = check_texts(texts)
    options = ScoreOptions(batch_tokens=check_batch_tokens(batch_tokens), top_k=top_k, temperatures=tuple(temperatures))
    lm = as_loaded_model(model, name)
    docs = tokenize_documents([Document(i, t) for i, t in enumerate(texts)], lm.tokenizer, bos)
    columns = score_documents(lm, docs, max_length, stride, options)
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    frame = tokens_frame(lm.name, [d.doc_id for d in docs], columns, lm.tokenizer)
    frame.attrs["n_documents"] = len(texts)
    frame.attrs["n_empty"] = sum(d.n_scored == 0 for d in docs)
    return frame


# --------------------------------------------------------------------------------------
# lmeval run
# --------------------------------------------------------------------------------------


@dataclass
class ModelResult:
    """Everything one model's pass produced."""

    tokens: pd.DataFrame
    documents: pd.DataFrame
    summary: dict
    calibration: pd.DataFrame
    temperature: pd.DataFrame
    bins: cal.ReliabilityBins
    protocol: dict
    fingerprint: dict
    vocab_size: int


def _spec(model: ModelConfig) -> ModelSpec:
    return ModelSpec(
        path=model.path, name=model.name, dtype=model.dtype, device=model.device, revision=model.revision,
        trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle,
    )  # fmt: skip


def _score_independent(lm, corpus: Corpus, config: Config, options, progress):
    docs = tokenize_documents(corpus.documents, lm.tokenizer, config.scoring.bos)
    columns = score_documents(lm, docs, config.scoring.max_length, config.scoring.stride, options, progress)
    spans = char_spans(docs, columns["doc_index"], columns["position"])
    columns["char_start"], columns["char_end"] = spans[:, 0], spans[:, 1]
    return columns, [d.doc_id for d in docs], [d.scored_text() for d in docs]


def _score_concatenated(lm, corpus: Corpus, config: Config, options, progress):
    stream = join_documents(corpus.documents, config.scoring.separator)
    (doc,) = tokenize_documents([stream.document], lm.tokenizer, config.scoring.bos)
    columns = score_documents(lm, [doc], config.scoring.max_length, config.scoring.stride, options, progress)
    spans = char_spans([doc], columns["doc_index"], columns["position"])
    index, start, end, position = split_stream(stream, spans[:, 0], spans[:, 1])
    columns.update(doc_index=index, char_start=start, char_end=end, position=position)
    texts = [d.text for d in corpus.documents]
    if not doc.prefix and len(doc.token_ids):  # the stream's first token only conditions
        texts[0] = texts[0][int(doc.offsets[0, 1]) :]
    texts.append(config.scoring.separator * (len(texts) - 1))
    return columns, [d.doc_id for d in corpus.documents] + [SEPARATOR_ID], texts


def _calibration(name: str, columns: dict, config: Config, vocab_size: int):
    """Calibration summary, reliability bins and temperature curve from the token arrays."""
    c = config.calibration
    sums = cal.calibration_sums(
        columns["nll"], columns["max_prob"], columns["is_top1"], columns["sum_q2"], columns["mean_neg_logq"],
        columns["entropy"], eps_grid=c.label_smoothing, nll_t=columns["nll_t"], max_prob_t=columns["max_prob_t"],
        temperatures=c.temperatures, n_bins=c.bins,
    )  # fmt: skip
    metrics = cal.summarize(sums, vocab_size=vocab_size)
    bins = sums.bins
    if c.binning == "mass":
        bins = cal.reliability_bins(columns["max_prob"], columns["is_top1"], c.bins, scheme="mass")
        metrics.update(ece=cal.expected_calibration_error(bins), mce=cal.max_calibration_error(bins))
    table = bins.to_frame()
    table.insert(0, "model", name)
    temperature = cal.temperature_table(sums, c.temperatures)
    temperature.insert(0, "model", name)
    return metrics, table, temperature, bins


def score_model(model: ModelConfig, corpus: Corpus, config: Config, show_progress: bool = True) -> ModelResult:
    """Load one model, score the corpus under the config's protocol, build its tables."""
    from tqdm.auto import tqdm

    lm = as_loaded_model(_spec(model))
    s = config.scoring
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(s.batch_tokens), temperatures=config.calibration.temperatures, compile=s.compile
    )
    length, stride = resolve_window(lm, s.max_length, s.stride)
    bar = tqdm(desc=f"scoring {lm.name}", unit="tok", disable=not show_progress, dynamic_ncols=True)
    started = time.perf_counter()
    score = _score_concatenated if s.documents == "concatenated" else _score_independent
    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    columns, doc_ids, texts = score(lm, corpus, config, options, progress)
    seconds = time.perf_counter() - started
    bar.close()
    documents = documents_frame(lm.name, doc_ids, texts, columns)
    summary = summary_row(lm.name, documents, n_skipped=corpus.n_skipped, seconds=seconds)
    summary["n_documents"] = len(corpus.documents)
    metrics, calibration, temperature, bins = _calibration(lm.name, columns, config, lm.vocab_size)
    summary.update(metrics)
    protocol = {
        "max_length": length, "stride": stride, "bos": s.bos,
        "bos_token_id": (resolve_prefix(lm.tokenizer, s.bos) or [None])[0],
        "documents": s.documents, "separator": s.separator if s.documents == "concatenated" else None,
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
    }  # fmt: skip
    fingerprint = fingerprint_model(model.path, model.revision, lm.model.config.to_dict())
    result = ModelResult(
        tokens=tokens_frame(lm.name, doc_ids, columns, lm.tokenizer),
        documents=documents, summary=summary, calibration=calibration, temperature=temperature, bins=bins,
        protocol=protocol, fingerprint=fingerprint, vocab_size=lm.vocab_size,
    )  # fmt: skip
    del lm
    gc.collect()
    return result


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


def run(config, overrides: list[str] | None = None, *, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Run a config end to end; write the tables to ``output.dir`` and return them as DataFrames.

    ``config`` is a `Config` or a path to a YAML file (then ``overrides`` apply). Returns a
    dict with ``tokens``, ``documents``, ``summary``, ``calibration``, ``temperature`` and
    the ``run`` record written to run.json.
    """
    from .report import format_summary, prepare_output_dir, write_json, write_table

    if not isinstance(config, Config):
        config = load_config(config, overrides)
    out = prepare_output_dir(config.output.dir, overwrite)
    started = time.time()
    corpus = load_documents(config.data)
    results = [score_model(m, corpus, config, show_progress) for m in config.models]
    tables = {
        "tokens": pd.concat([r.tokens for r in results], ignore_index=True),
        "documents": pd.concat([r.documents for r in results], ignore_index=True),
        "summary": pd.DataFrame([r.summary for r in results]),
        "calibration": pd.concat([r.calibration for r in results], ignore_index=True),
        "temperature": pd.concat([r.temperature for r in results], ignore_index=True),
    }
    if config.output.per_token:
        write_table(tables["tokens"], out / "tokens.parquet")
    write_table(tables["documents"], out / "documents.parquet")
    for name in ("summary", "calibration", "temperature"):
        write_table(tables[name], out / f"{name}.csv")
    cal.plot_reliability({r.summary["model"]: r.bins for r in results}, out / "reliability.png")
    record = {
        "config": config.to_dict(),
        "protocol": {**PROTOCOL_NOTES, "models": {r.summary["model"]: r.protocol for r in results}},
        "versions": versions(),
        "models": {r.summary["model"]: r.fingerprint for r in results},
        "data": {"path": config.data.path, "fingerprint": corpus.fingerprint,
                 "n_documents": len(corpus.documents), "n_skipped": corpus.n_skipped},
        "seconds": time.time() - started,
        "tokens_per_second": {r.summary["model"]: r.summary["tokens_per_second"] for r in results},
    }  # fmt: skip
    write_json(record, out / "run.json")
    tables["run"] = record
    log.info("wrote %s\n%s", out, format_summary(tables["summary"]))
    return tables
