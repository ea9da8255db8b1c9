"""Passes: one pass per model over its unfinished parts, a model with its baseline in one pass.

A run of k models with ``compare.divergence`` makes k passes: the baseline's own, and one per
other model in which the baseline's body and head run beside the model's (the pair's logits
meet a chunk at a time), so the pair pass also feeds that model's own analyses. Every model,
the baseline included, is loaded once: at most 2k - 1 model forwards over the corpus, where
scoring each model, then each pair, took 3k - 2.

Each part is scored by the config's producer, its text facts recorded, its columns trimmed to
what the tables and analyses read, written atomically in the background, and handed to the
`Merger` at once, so the merge keeps pace with scoring.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..analyses.base import Part
from ..analyses.divergence import TOPK_BOUND
from ..errors import OutputError, option
from ..model.fingerprint import chat_template_fingerprint
from ..model.loading import load_model
from ..model.quantization import resident_bytes, size_record
from ..model.scorer import CACHE_COLUMNS, ScoreOptions, decide_compile, pair_batching, resolve_window
from ..model.spec import ModelSpec
from ..producers import producer_for
from ..producers.divergence import check_same_tokenizer, resolve_pair_window
from ..producers.score import check_batch_tokens
from ..producers.tables import document_sums
from ..producers.text import resolve_prefix
from ..producers.words import with_word_masses
from .config import Config
from .data import Corpus
from .memory import release_free_memory
from .parts import finished_keys, model_dirname, read_columns, read_meta, roundtrip, write_part
from .plan import PartPlan, part_doc_ids, plan_key
from .prefetch import BackgroundWriter, prefetched
from .progress import ScoringProgress
from .provenance import tokenizer_fingerprint

# Tokens are counted only once a part is tokenized; English BPE averages about 4 characters
# a token (code and CJK fewer, so the estimate errs toward the eager reductions).
CHARS_PER_TOKEN = 4
ALWAYS_KEPT = frozenset({"doc_index"})


@dataclass(frozen=True)
class Pass:
    """One model's pass; with a ``baseline``, the pair's divergence columns come with it. A
    lockstep pass is the baseline's (``model``) with every other model in ``variants``."""

    model: ModelSpec
    baseline: ModelSpec | None = None
    variants: tuple[ModelSpec, ...] = ()


def plan_passes(config: Config) -> list[Pass]:
    """One pass per model, in config order (the token tables list models in that order); with
    divergence in lockstep, one pass for the baseline and every variant."""
    if not config.compare.divergence:
        return [Pass(m) for m in config.models]
    base = baseline_spec(config)
    others = tuple(m for m in config.models if m.name != base.name)
    if config.compare.baseline_cache == "topk":  # the baseline first, keeping its top-K; then each model alone
        return [Pass(base), *(Pass(m) for m in others)]
    if lockstep_decision(config)[0] == "lockstep":
        return [Pass(base, variants=others)]
    return [Pass(m, None if m.name == base.name else base) for m in config.models]


# Of the memory free when the run starts, the share all the models' weights may take together
# in lockstep (the rest: activations, chunks of logits, the tokenizer, the data).
LOCKSTEP_SHARE = 0.6


def lockstep_decision(config: Config) -> tuple[str, str]:
    """("lockstep" | "pair", why) for ``compare.lockstep`` (recorded in run.json)."""
    from ..producers.score import score_group, score_stream

    c = config.compare
    if not c.divergence or len(config.models) < 3:
        return "pair", "one model against the baseline: a pair is already one pass"
    if c.baseline_cache == "topk":
        return "baseline_cache", "compare.baseline_cache: topk: the baseline alone first, then each model alone"
    if c.lockstep == "pair":
        return "pair", "compare.lockstep: pair"
    if producer_for(config) not in (score_group, score_stream):
        return "pair", "lockstep scores documents and streams only (not contexts or conversations)"
    sizes = [resident_bytes(m) for m in config.models]
    if any(size is None for size in sizes):
        return "pair", "the size of a model's weights is unknown before loading (not a local folder)"
    free = free_memory(config.models[0].device)
    need = sum(s for s in sizes if s is not None)
    if free is None or need > LOCKSTEP_SHARE * free:
        return "pair", f"the weights ({need / 2**30:.1f} GiB) do not fit {LOCKSTEP_SHARE:.0%} of free memory together"
    return "lockstep", f"the weights ({need / 2**30:.2f} GiB) fit {LOCKSTEP_SHARE:.0%} of free memory together"


def free_memory(device: str) -> int | None:
    """Free bytes where the models will live: the CUDA device's, else the machine's available RAM."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = torch.device(device).index if device not in ("auto", "cuda") else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def baseline_spec(config: Config) -> ModelSpec:
    name = config.compare.baseline or config.models[0].name
    return next(m for m in config.models if m.name == name)


class Models:
    """Loads a pass's models when it starts; the baseline stays loaded for the run (loaded once),
    except under ``compare.baseline_cache: topk``, where its parts hold what the others need."""

    def __init__(self, config: Config):
        c = config.compare
        self.keep = baseline_spec(config).name if c.divergence and c.baseline_cache != "topk" else None
        self.kept: dict = {}

    def get(self, spec: ModelSpec):
        if spec.name in self.kept:
            return self.kept[spec.name]
        lm = load_model(spec)
        if spec.name == self.keep:
            self.kept[spec.name] = lm
        return lm


def check_tokenizers(config: Config, passes: list[Pass]) -> None:
    """Refuse a pair whose tokenizers differ before any scoring (the tokenizers alone are loaded)."""
    from types import SimpleNamespace

    from ..model.loading import load_tokenizer

    pairs = [(p.model, p.baseline) for p in passes if p.baseline is not None]
    if config.compare.baseline_cache == "topk":  # each model meets the baseline's kept top-K
        kept = baseline_spec(config)
        pairs = [(m, kept) for m in config.models if m.name != kept.name]
    if not pairs:
        return
    baseline = pairs[0][1]
    base = SimpleNamespace(name=baseline.name, tokenizer=load_tokenizer(baseline))
    for model, _ in pairs:
        check_same_tokenizer(SimpleNamespace(name=model.name, tokenizer=load_tokenizer(model)), base)


class PartSink(Protocol):
    """Where a scored part goes: rank 0's `Merger`, a no-op on the other ranks."""

    def add(self, model: str, index: int, part: Part) -> None: ...


@dataclass
class PassJob:
    """What scoring a pass's share needs besides the models."""

    config: Config
    corpus: Corpus
    analyses: tuple
    identity_hash: str
    folder: Path | None  # where its parts are written (None: in memory only, no resume)
    merger: PartSink
    bar: ScoringProgress


def score_share(job: PassJob, lm, base, plans: list[tuple[int, PartPlan]]) -> None:
    """Score this rank's unfinished parts of one pass (``(index, plan)`` in corpus order): one
    model, or a model with its ``base``line. Under ``compare.baseline_cache: topk`` a model other
    than the baseline reads the baseline's kept top-K from the baseline's parts."""
    c = job.config.compare
    cached = None
    if c.divergence and c.baseline_cache == "topk" and base is None and lm.name != baseline_spec(job.config).name:
        if job.folder is None:
            raise OutputError("compare.baseline_cache: topk reads the baseline's parts, so it needs a run folder.")
        cached = job.folder.parent / model_dirname(baseline_spec(job.config).name)
    score_parts({lm.name: job}, lm, plans, baseline=base, cached_from=cached)


def score_lockstep_share(
    jobs: dict[str, PassJob], base, variants: list, plans: list[tuple[int, PartPlan]], wanted: dict[str, set]
) -> None:
    """Score the baseline and every variant in lockstep over ``plans``; a model's part is
    written and merged only where ``wanted[model]`` holds its index (the others are done)."""
    score_parts(jobs, base, plans, variants=tuple(variants), wanted=wanted)


def score_parts(
    jobs: dict[str, PassJob],
    lm,
    plans: list[tuple[int, PartPlan]],
    baseline=None,
    variants: tuple = (),
    wanted: dict[str, set] | None = None,
    cached_from: Path | None = None,
) -> None:
    """The one part loop of every pass: each part's documents are produced into columns for
    ``lm`` (with its ``baseline``, or in lockstep as the baseline of ``variants``, or against
    the baseline's top-K kept in the parts under ``cached_from``), and each model's part is
    written and handed to its job's merger in the background, in order."""
    if not plans:
        return
    job = jobs[lm.name]
    config, models = job.config, [lm, *variants]
    options = _options(job, lm, sum(plan.weight for _, plan in plans))
    if variants:
        options = dataclasses.replace(options, compile=False)  # the lockstep reductions run eager
    # also checks the window, before any scoring
    protocols = {m.name: protocol_record(m, config, baseline if m is lm else lm) for m in models}
    if cached_from is not None:  # the kept baseline's identity, window and tokenizer (refused if they differ)
        protocols[lm.name].update(cached_baseline(cached_from, protocols[lm.name], lm.name, config))
    for m in models:
        folder = jobs[m.name].folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            check_protocol(folder, protocols[m.name], m.name)
    produce = producer_for(config)
    cache: dict = {}  # the producer's, across the parts of this pass
    keep = _kept_columns(job.analyses)
    if options.cache_k:  # the baseline under compare.baseline_cache: topk keeps its top-K for the later passes
        keep = keep.union(CACHE_COLUMNS, BASELINE_KEPT)
    tokenize = _tokenizer_ahead(config, job.corpus, lm, produce)
    partners = {"variants": variants} if variants else {"baseline": baseline}
    with BackgroundWriter() as writer:
        for (index, plan), ready in prefetched(plans, lambda item: tokenize(item[1])):
            started = time.perf_counter()
            job.bar.group(plan.weight, tokenizing=not ready and (plan.piece == 0 or not cache))
            calls = dict(lm.workspace.calls)
            documents = job.corpus.take(plan.docs)
            rows, tail, part_options = None, None, options
            if cached_from is not None:  # this part's rows of the baseline: its top-K, tail and nll
                key = plan_key(job.corpus, plan, config.scoring.documents)
                kept_baseline, rows = read_baseline_part(cached_from / f"{key}.parquet", lm.name)
                part_options = dataclasses.replace(options, baseline_cache=kept_baseline)
                tail = np.exp(kept_baseline["cache_log_tail"].astype(np.float64))
            out, texts = produce(
                lm, documents, config, part_options, job.bar.progress, piece=plan, cache=cache, **partners, **ready
            )
            if rows is not None:
                check_aligned(out, rows, lm.name)
                # the baseline's mass outside its kept K, per token: how far below the exact KL the bound may be
                out["baseline_tail_mass"] = tail
            # how the reductions ran (kernel, eager, compiled), and whether in lockstep
            reductions = lm.workspace.mode_since(calls) + (", lockstep" if variants else "")
            for m, columns in zip(models, out if variants else [out]):
                if wanted is not None and index not in wanted[m.name]:
                    continue  # this model's part is already done
                own = jobs[m.name]
                meta = _meta(own, plan, columns, texts, protocols[m.name], reductions, started)
                kept = {k: v for k, v in columns.items() if k in keep}
                if "cache_ids" in kept:  # ids below 2^31: half the bytes on disk
                    kept["cache_ids"] = kept["cache_ids"].astype(np.int32)
                if own.folder is not None:
                    key = plan_key(own.corpus, plan, config.scoring.documents)
                    writer.submit(write_part, own.folder / f"{key}.parquet", kept, meta)
                kept = {k: v for k, v in kept.items() if k not in CACHE_COLUMNS}  # for the later passes only
                # folded after its write, by the same niced thread: merging is off the scoring thread too
                writer.submit(
                    own.merger.add, m.name, index, Part(m.name, [str(d) for d in meta["doc_ids"]], kept, meta)
                )
            # This part's arrays die now (the writer holds what it writes), not when the next part's
            # scoring rebinds the names: else two parts' columns are alive through every batch.
            out = texts = documents = ready = columns = kept = None  # type: ignore[assignment]
            release_free_memory()  # the batches' freed logits, before the next part allocates its own


# What a baseline's part keeps under compare.baseline_cache: topk besides CACHE_COLUMNS: its nll
# (the pair's nll_baseline) and where each row is, to check that a later pass's rows are the same.
BASELINE_KEPT = frozenset({"nll", "doc_index", "position", "token_id"})


def read_baseline_part(path: Path, model: str) -> tuple[dict, np.ndarray]:
    """A baseline part's kept top-K with its nll as ``nll_baseline`` (`ScoreOptions.baseline_cache`),
    and its rows' (doc_index, position, token_id)."""
    if not path.exists():
        raise OutputError(
            f"output.dir: model {model} is scored against the baseline's kept top-K (compare.baseline_cache: topk), "
            f"and the baseline's part {path.name} must be there (got none). Rerun with {option('fresh')}."
        )
    columns = read_columns(path, [*CACHE_COLUMNS, *BASELINE_KEPT])
    if any(k not in columns for k in CACHE_COLUMNS):
        raise OutputError(
            f"output.dir: the baseline's part {path.name} must keep its top-K (got a part scored without "
            f"compare.baseline_cache: topk). Rerun with {option('fresh')}."
        )
    kept = {k: columns[k] for k in CACHE_COLUMNS}
    kept["cache_ids"] = kept["cache_ids"].astype(np.int64)
    kept["nll_baseline"] = columns["nll"]
    return kept, _rows(columns)


def _rows(columns: dict) -> np.ndarray:
    return np.stack([columns["doc_index"], columns["position"], columns["token_id"]], axis=1)


def check_aligned(columns: dict, rows: np.ndarray, model: str) -> None:
    """The model's rows of a part are the baseline's, token for token (same documents, windows, ids)."""
    if _rows(columns).shape != rows.shape or not np.array_equal(_rows(columns), rows):
        raise OutputError(
            f"model {model}: its scored tokens must be the baseline's, token for token, to be read against the "
            "baseline's kept top-K (got other documents, positions or token ids). Use one tokenizer and one window "
            "for both (scoring.max_length), or compare.baseline_cache: none."
        )


def cached_baseline(folder: Path, protocol: dict, model: str, config: Config) -> dict:
    """What a model's protocol says of the baseline it meets as kept top-K (from the baseline's
    finished parts), after checking their tokenizer and window are the model's."""
    done = sorted(finished_keys(folder))
    if not done:
        raise OutputError(
            f"output.dir: model {model} needs the baseline's parts with its kept top-K in {folder.name}/ "
            f"(got none: the baseline's pass must run first). Rerun with {option('fresh')}."
        )
    base = read_meta(folder / f"{done[0]}.parquet")["protocol"]
    for key in ("tokenizer_sha256", "max_length", "stride"):
        if base.get(key) != protocol.get(key):
            raise OutputError(
                f"model {model}: its {key} must be the baseline's to be read against the baseline's kept top-K "
                f"(got {protocol.get(key)!r}, the baseline's {base.get(key)!r}). "
                + (
                    "Set scoring.max_length (and stride) to a window both models take."
                    if key != "tokenizer_sha256"
                    else "Compare models that share one tokenizer."
                )
            )
    c = config.compare
    return {
        "baseline": baseline_spec(config).name,
        "baseline_commit_sha": base.get("commit_sha"),
        "baseline_probes": {k: base.get(k) for k in ("causal", "allow_noncausal", "batching")},
        "baseline_cache": {"mode": "topk", "k": c.kl_top_k, "bound": TOPK_BOUND},
    }


def _options(job: PassJob, lm, n_chars: float) -> ScoreOptions:
    needs = [a.needs() for a in job.analyses]
    s = job.config.scoring
    options = ScoreOptions(
        batch_tokens=check_batch_tokens(s.batch_tokens),
        # the grid only where an analysis reads it (not under output.documents_only)
        temperatures=next((n.temperatures for n in needs if n.temperatures), ()),
        compile=s.compile,
        moments=any(n.moments for n in needs),
        overlap_k=job.config.compare.overlap_k,
        kl_top_k=job.config.compare.kl_top_k,
    )
    words = next((n.word_masses for n in needs if n.word_masses), None)
    if words is not None:  # B's mass per token and at each document's END (analysis.words)
        options = with_word_masses(options, lm, *words)
    c = job.config.compare
    if c.divergence and c.baseline_cache == "topk" and lm.name == baseline_spec(job.config).name:
        options = dataclasses.replace(options, cache_k=c.kl_top_k)  # kept per token for the other models' passes
    # `compile: auto` is settled once for this rank's whole share, from its characters.
    return decide_compile(lm, options, int(n_chars / CHARS_PER_TOKEN))


def _kept_columns(analyses: tuple) -> frozenset:
    """The per-token columns a part keeps: what the analyses and token tables read."""
    return ALWAYS_KEPT.union(*(a.needs().token_columns for a in analyses))


def _tokenizer_ahead(config: Config, corpus: Corpus, lm, produce):
    """Independent documents: the next part is tokenized while one is scored (pieces after the
    first reuse their document's tokens); other producers tokenize in their own call."""
    from ..producers.score import score_group
    from ..producers.text import tokenize_documents

    if produce is not score_group:
        return lambda plan: {}
    return lambda plan: (
        {"docs": tokenize_documents(corpus.take(plan.docs), lm.tokenizer, config.scoring.bos)}
        if plan.piece == 0
        else {}
    )


def _meta(
    job: PassJob, plan: PartPlan, columns: dict, texts: list[str], protocol: dict, reductions: str, started: float
) -> dict:
    n_tokens, nll_sum = document_sums(columns["doc_index"], columns["nll"], len(texts))
    facts = {}
    for analysis in job.analyses:
        facts.update(analysis.text_facts(texts))
    return {
        "doc_ids": part_doc_ids(job.corpus, plan, job.config.scoring.documents),
        "piece": [plan.piece, plan.n_pieces],
        "n_tokens": n_tokens.tolist(),
        "nll_sum": nll_sum.tolist(),
        **facts,
        "seconds": time.perf_counter() - started,
        "identity": job.identity_hash,
        "protocol": {**protocol, "reductions": reductions},  # how they ran: compiled or eager
    }


def protocol_record(lm, config: Config, baseline=None) -> dict:
    """The resolved protocol of one model in a run: what its numbers mean (also the in-loop
    evaluator's). With a baseline: the pair's window, the batching both probes allow, and the
    baseline's identity and probe verdicts."""
    s = config.scoring
    length, stride = (
        resolve_window(lm, s.max_length, s.stride)
        if baseline is None
        else resolve_pair_window(lm, baseline, s.max_length, s.stride)
    )
    record = {
        "max_length": length,
        "stride": stride,
        "bos": s.bos,
        "bos_token_id": (resolve_prefix(lm.tokenizer, s.bos) or [None])[0],
        "documents": s.documents,
        "separator": s.separator if s.documents == "concatenated" else None,
        **_chunk_record(config, length),
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
        # With conversations, the chat template is part of the tokenizer's identity: the same
        # conversation is another token sequence under another template (None: no conversations).
        "chat_template_sha256": chat_template_fingerprint(lm.tokenizer) if config.data.messages_field else None,
        "vocab_size": lm.vocab_size,
        "commit_sha": lm.commit_sha,
        **lm.probes.protocol(),
        "quantization": lm.quantization,  # how a quantized checkpoint was loaded (None: a float model)
    }
    if config.compare.divergence:  # the size of each model for divergence.csv and divergence_bpw.png
        record.update(size_record(lm.model, lm.spec, lm.quantization))
        if config.compare.baseline_cache == "topk" and baseline is None and lm.name == baseline_spec(config).name:
            record["baseline_cache"] = {"mode": "topk", "k": config.compare.kl_top_k, "kept": "for the other models"}
    if baseline is not None:
        record.update(
            baseline=baseline.name,
            baseline_commit_sha=baseline.commit_sha,
            baseline_probes=baseline.probes.protocol(),
            batching=pair_batching(lm, baseline),
        )
    return record


def _chunk_record(config: Config, length: int) -> dict:
    """The preset and, under ``windows: chunks``, the chunk rule (and why bytes and words are NaN)."""
    s = config.scoring
    record: dict = {"preset": config.preset} if config.preset else {}
    if s.windows == "chunks":
        context = length // 2 + 1 if s.chunk_context == "half" else s.chunk_context
        record.update(
            windows="chunks",
            chunk_context=context,
            chunk_bos=s.chunk_bos,
            normalisers="bits_per_byte, byte_ppl and word_ppl are NaN: the chunks drop a remainder and leave each "
            "chunk's first chunk_context ids unscored, so no byte or word count matches the scored tokens",
        )
    return record


def check_protocol(folder: Path, protocol: dict, name: str) -> None:
    """Finished parts of a model must have been scored with the protocol just resolved. A hub
    model whose branch moved (another commit) passes the identity check, which is made before
    loading; mixing it with the parts of the old commit would put two models in one table."""
    done = sorted(finished_keys(folder))
    if not done:
        return
    previous = read_meta(folder / f"{done[0]}.parquet")["protocol"]
    # How the reductions ran (compiled or eager) is recorded, but changes no number.
    changed = sorted(
        k for k in (set(previous) | set(protocol)) - {"reductions"} if previous.get(k) != roundtrip(protocol).get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {protocol.get(k)!r}" for k in changed)
        raise OutputError(
            f"output.dir: the finished parts of model {name} were scored with another protocol ({details}). "
            f"Rerun with {option('fresh')} to discard them, or pin `revision` to the commit they were scored with."
        )
