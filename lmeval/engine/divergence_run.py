"""`compare: {divergence: true}` in `lmeval run`: resumable, data-parallel pair parts, then tables.

Each model other than the baseline is scored WITH the baseline on the run's part groups
(`divergence.score_pair_documents`); a group's per-token divergence is written as soon as
it exists, to ``parts/divergence/<baseline>/<model>/<key>.parquet``, keyed like the run's
own parts, so a killed run resumes where it stopped and ranks share the unfinished groups
exactly as they share the scoring parts. Rank 0 merges them into

- ``divergence.parquet``: one row per scored token and model (`DIVERGENCE` schema);
- ``divergence.csv``: one row per model, `SUMMARY_COLUMNS`, with paired document-bootstrap CIs;
- ``divergence_tokens.csv``: each model's ``compare.top_k`` tokens of largest KL, with text;
- ``divergence.png``: the KL distribution per model, and mean KL against position.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import OutputError
from ..model.loading import load_model
from ..model.spec import ModelSpec
from . import distributed
from .config import Config
from .data import SEPARATOR_ID, Corpus, join_documents, resolve_prefix
from ..producers.divergence import SUMMARY_COLUMNS, TOP_TOKEN_COLUMNS, check_same_tokenizer, document_sums, pair_frame
from ..producers.divergence import resolve_pair_window, score_pair_documents, summarize, top_tokens
from ..analyses.plots import plot_divergence
from .files import TokenWriter, write_figure, write_table
from .merge import check_parts_present
from .parts import finished_keys, model_dirname, part_key, read_columns, read_meta, roundtrip, write_part
from .provenance import tokenizer_fingerprint
from .schemas import string_ids

log = logging.getLogger(__name__)
FILES = ("divergence.parquet", "divergence.csv", "divergence_tokens.csv", "divergence.png")
DEFINITIONS = {
    "kl": "KL(P_baseline || P_model) = sum_v p_v (log p_v - log q_v), nats, per scored token",
    "kl_reverse": "KL(P_model || P_baseline), nats",
    "delta_p": "q_y - p_y: the true token's probability under the model minus under the baseline",
    "same_top1": "both models' argmax token is the same",
    "ln_ppl_ratio": "ln PPL(model) - ln PPL(baseline) = mean(nll - nll_baseline) over the same tokens, nats",
    "intervals": "95% percentile intervals of a paired document bootstrap (documents resampled, both models together)",
    "percentiles": "over all scored tokens, numpy linear interpolation",
}


def pairs(config: Config) -> list[tuple[ModelSpec, ModelSpec]]:
    """(model, baseline) for every model but the baseline; none unless ``compare.divergence``."""
    if not config.compare.divergence:
        return []
    name = config.compare.baseline or config.models[0].name
    baseline = next(m for m in config.models if m.name == name)
    return [(m, baseline) for m in config.models if m.name != name]


def pair_folder(parts: Path, model: str, baseline: str) -> Path:
    """Keyed by the baseline too: another ``compare.baseline`` never reuses these parts."""
    return parts / "divergence" / model_dirname(baseline) / model_dirname(model)


def unfinished(config: Config, parts: Path, group_ids: list[list]) -> dict[str, list[int]]:
    """Per model, the indices of the groups whose divergence part is not written yet (rank 0)."""
    todo = {}
    for model, baseline in pairs(config):
        done = finished_keys(pair_folder(parts, model.name, baseline.name))
        todo[model.name] = [i for i, ids in enumerate(group_ids) if part_key(ids) not in done]
    return todo


def score_share(config: Config, corpus: Corpus, parts: Path, groups, group_ids, todo: dict, ctx, bar) -> None:
    """Score this rank's share of each pair's unfinished groups, balanced by characters."""
    weights = [sum(len(corpus.documents[i].text) for i in g) for g in groups]
    shares = {}
    for model, _ in pairs(config):
        left = todo[model.name]
        share = distributed.assign([groups[i] for i in left], [weights[i] for i in left], ctx.world_size)[ctx.rank]
        shares[model.name] = [left[j] for j in share]
        bar.plan(sum(weights[i] for i in shares[model.name]))
    for model, baseline in pairs(config):
        chosen = shares[model.name]
        if chosen:
            folder = pair_folder(parts, model.name, baseline.name)
            _score_pairs(model, baseline, corpus, config, folder, [(groups[i], group_ids[i]) for i in chosen], bar)


def _score_pairs(model: ModelSpec, baseline: ModelSpec, corpus: Corpus, config: Config, folder: Path, todo, bar) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base, lm = load_model(baseline), load_model(model)
    check_same_tokenizer(lm, base)  # before any scoring: a mismatch costs one load, not a pass
    protocol = _protocol(lm, base, config)
    _check_resumed(folder, protocol, model.name)
    for group, ids in todo:
        started = time.perf_counter()
        bar.group(sum(len(corpus.documents[i].text) for i in group))
        columns = score_pair_documents(lm, base, [corpus.documents[i] for i in group], config.scoring, bar.progress)
        meta = {"doc_ids": ids, "seconds": time.perf_counter() - started, "protocol": protocol}
        write_part(folder / f"{part_key(ids)}.parquet", columns, meta)


def _protocol(lm, base, config: Config) -> dict:
    s = config.scoring
    length, stride = resolve_pair_window(lm, base, s.max_length, s.stride)
    return {
        "baseline": base.name, "max_length": length, "stride": stride, "bos": s.bos,
        "bos_token_id": (resolve_prefix(lm.tokenizer, s.bos) or [None])[0], "documents": s.documents,
        "separator": s.separator if s.documents == "concatenated" else None,
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer), "vocab_size": lm.vocab_size,
        "commit_sha": lm.commit_sha, "baseline_commit_sha": base.commit_sha,
    }  # fmt: skip


def _check_resumed(folder: Path, protocol: dict, name: str) -> None:
    """Finished parts must come from the protocol just resolved (a moved hub branch would
    otherwise mix two checkpoints in one table)."""
    done = sorted(finished_keys(folder))
    if not done:
        return
    previous = read_meta(folder / f"{done[0]}.parquet")["protocol"]
    current = roundtrip(protocol)
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise OutputError(
            f"output.dir: the finished divergence parts of model {name} were scored with another protocol "
            f"({details}). Rerun with --fresh to discard them, or pin `revision` to the commit they were scored with."
        )


# --------------------------------------------------------------------------------------
# Merge (rank 0): tables, plot, run.json entry
# --------------------------------------------------------------------------------------


class _Collected:
    """One pair's merge state: per-document sums, every token's kl and delta_p (for the
    percentiles), KL summed by position (for the plot) and top-k candidates."""

    def __init__(self):
        self.sums, self.kl, self.delta_p, self.top = [], [], [], []
        self.kl_by_position, self.n_by_position = np.zeros(0), np.zeros(0)

    def add(self, frame: pd.DataFrame, columns: dict, n_docs: int, top_k: int, text_of) -> None:
        self.sums.append(document_sums(columns["doc_index"], columns, n_docs))
        self.kl.append(columns["kl"])
        self.delta_p.append(columns["delta_p"])
        self.top.append(top_tokens(frame, top_k, text_of))
        position = columns["position"]
        size = max(len(self.n_by_position), int(position.max()) + 1 if len(position) else 0)
        kl = np.bincount(position, weights=columns["kl"].astype(np.float64), minlength=size)
        n = np.bincount(position, minlength=size)
        self.kl_by_position = np.pad(self.kl_by_position, (0, size - len(self.kl_by_position))) + kl
        self.n_by_position = np.pad(self.n_by_position, (0, size - len(self.n_by_position))) + n


def write_divergence(out: Path, config: Config, corpus: Corpus, parts: Path, group_ids: list[list], record: dict) -> dict:
    """Merge every pair's parts (in corpus order) into the divergence files; add the pairs'
    protocol to ``record`` (run.json). Returns ``divergence`` (the summary) and
    ``divergence_tokens``; empty without ``compare.divergence``."""
    chosen = pairs(config)
    if not chosen:
        return {}
    keys = [part_key(ids) for ids in group_ids]
    paths = {m.name: [pair_folder(parts, m.name, b.name) / f"{k}.parquet" for k in keys] for m, b in chosen}
    check_parts_present(paths, parts)
    texts = {str(d.doc_id): d.text for d in corpus.documents}
    if config.scoring.documents == "concatenated":  # separator tokens' spans point into the whole stream
        texts[SEPARATOR_ID] = join_documents(corpus.documents, config.scoring.separator).document.text
    writer = TokenWriter(out / "divergence.parquet") if config.output.per_token else None
    rows, tops, collected, protocols = [], [], {}, {}
    for model, baseline in chosen:
        acc = collected[model.name] = _Collected()
        for path in paths[model.name]:
            meta, columns = read_meta(path), read_columns(path)
            frame = pair_frame(model.name, baseline.name, string_ids(meta["doc_ids"]), columns)
            if writer is not None:
                writer.write(frame)
            acc.add(frame, columns, len(meta["doc_ids"]), config.compare.top_k, texts.__getitem__)
        protocols[model.name] = meta["protocol"]
        kl, delta_p = np.concatenate(acc.kl), np.concatenate(acc.delta_p)
        summary = summarize(np.concatenate(acc.sums), kl, delta_p, config.compare.bootstrap, config.compare.seed)
        rows.append({"model": model.name, "baseline": baseline.name, **summary})
        tops.append(pd.concat(acc.top).sort_values("kl", ascending=False, kind="stable").head(config.compare.top_k))
    if writer is not None:
        writer.close()
    tables = {
        "divergence": pd.DataFrame(rows, columns=SUMMARY_COLUMNS),
        "divergence_tokens": pd.concat(tops, ignore_index=True)[TOP_TOKEN_COLUMNS],
    }
    write_table(tables["divergence"], out / "divergence.csv")
    write_table(tables["divergence_tokens"], out / "divergence_tokens.csv")
    figure = plot_divergence({name: (np.concatenate(a.kl), a.kl_by_position, a.n_by_position)
                              for name, a in collected.items()}, chosen[0][1].name)  # fmt: skip
    write_figure(figure, out / "divergence.png")
    record["divergence"] = {"baseline": chosen[0][1].name, "models": [m.name for m, _ in chosen],
                            "definitions": DEFINITIONS, "protocol": protocols}  # fmt: skip
    return tables
