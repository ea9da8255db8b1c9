"""The run engine: one pass per model (a model with its baseline in one), the baseline loaded
once, analyses as plug-ins, divergence parts checked on resume like any part, and the in-loop
evaluator scoring chat and context data with the producers `lmeval run` uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmeval
from conftest import CORPUS
from helpers import CONTEXT_TEXTS, CONTEXTS, CONVERSATIONS, finetuned, write_config, write_jsonl
from lmeval.analyses.base import Analysis, ModelResult, Needs, Outputs
from lmeval.engine import passes as passes_module
from lmeval.engine import run as run_module
from lmeval.engine.parts import model_dirname

TEXTS = [f"{i}: {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 3 + 1) % len(CORPUS)]}" for i in range(8)]


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, tiny_models, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("three")
    models = {
        "base": tiny_models["gpt2"],
        "ft1": finetuned(tiny_models["gpt2"], 0.2, seed=1),
        "ft2": finetuned(tiny_models["gpt2"], 0.2, seed=2),
    }
    for name, model in models.items():
        model.save_pretrained(folder / name)
        bpe_tokenizer.save_pretrained(folder / name)
    return {name: folder / name for name in models}


def three_model_config(tmp_path, paths, extra: str = "") -> str:
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    models = ", ".join(f"{{name: {n}, path: {p}}}" for n, p in paths.items())
    return str(
        write_config(
            tmp_path,
            f"""
models: [{models}]
data: {{path: docs.jsonl, id_field: id}}
scoring: {{max_length: 16, batch_tokens: 64}}
output: {{dir: out, part_chars: 400}}
compare: {{baseline: base, divergence: true, bootstrap: 50}}
{extra}""",
        )
    )


@pytest.mark.parametrize("lockstep", ["pair", "auto"])
def test_three_models_with_divergence_cost_three_loads_and_five_passes(
    lockstep, tmp_path, three_checkpoints, monkeypatch
):
    """k = 3 models with divergence: each loaded once, at most 2k - 1 = 5 model passes over the
    corpus pair by pair (the baseline's own, then each variant beside it), and k in lockstep."""
    loads, forwards = [], []
    real_load, real_parts = passes_module.load_model, passes_module.score_parts
    monkeypatch.setattr(passes_module, "load_model", lambda spec: (loads.append(spec.name), real_load(spec))[1])

    def counted(jobs, lm, plans, baseline=None, variants=(), **rest):
        forwards.append((lm.name, None if baseline is None else baseline.name, tuple(v.name for v in variants)))
        return real_parts(jobs, lm, plans, baseline=baseline, variants=variants, **rest)

    monkeypatch.setattr(passes_module, "score_parts", counted)
    config = three_model_config(tmp_path, three_checkpoints)
    text = Path(config).read_text(encoding="utf-8").replace("bootstrap: 50}", f"bootstrap: 50, lockstep: {lockstep}}}")
    Path(config).write_text(text, encoding="utf-8")
    tables = lmeval.run(config, show_progress=False)
    assert sorted(loads) == ["base", "ft1", "ft2"]  # the baseline is loaded once
    if lockstep == "pair":
        assert forwards == [("base", None, ()), ("ft1", "base", ()), ("ft2", "base", ())]
    else:  # auto: three local folders that fit in memory together go in lockstep
        assert forwards == [("base", None, ("ft1", "ft2"))]
        assert tables["run"]["divergence"]["lockstep"]["mode"] == "lockstep"
    model_passes = sum(1 + (base is not None) + len(variants) for _, base, variants in forwards)
    assert model_passes == {"pair": 5, "auto": 3}[lockstep]  # at most 2k - 1
    # The pair pass feeds the model's own tables: the same numbers as a run without divergence.
    alone = lmeval.run(_without_divergence(tmp_path, three_checkpoints), show_progress=False)
    np.testing.assert_allclose(tables["summary"]["nll_sum"], alone["summary"]["nll_sum"], rtol=1e-6)
    np.testing.assert_allclose(tables["tokens"]["entropy"], alone["tokens"]["entropy"], rtol=1e-5, atol=1e-6)
    assert set(tables["divergence"]["model"]) == {"ft1", "ft2"}
    pair = tables["run"]["divergence"]["protocol"]["ft1"]
    assert pair["baseline"] == "base" and pair["baseline_probes"]["batching"] == "padded" and "batching" in pair


def _without_divergence(tmp_path, paths) -> str:
    folder = tmp_path / "alone"
    folder.mkdir()
    path = three_model_config(folder, paths)
    text = Path(path).read_text(encoding="utf-8").replace("divergence: true", "divergence: false")
    Path(path).write_text(text, encoding="utf-8")
    return path


def test_a_flipped_byte_in_a_pair_part_is_rescored_on_resume(tmp_path, three_checkpoints, monkeypatch):
    paths = {k: three_checkpoints[k] for k in ("base", "ft1")}
    config = three_model_config(tmp_path, paths)
    reference = lmeval.run(config, show_progress=False)["divergence"]
    real, written = passes_module.write_part, []

    def stop_after_pair_parts(path, columns, meta):
        real(path, columns, meta)
        written.append(path)
        if path.parent.name == model_dirname("ft1") and sum(p.parent == path.parent for p in written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(passes_module, "write_part", stop_after_pair_parts)
    with pytest.raises(KeyboardInterrupt):
        lmeval.run(config, overwrite=True, fresh=True, show_progress=False)
    monkeypatch.setattr(passes_module, "write_part", real)
    part = sorted((tmp_path / "out" / "parts" / model_dirname("ft1")).glob("*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside the columns
    part.write_bytes(bytes(data))
    resumed = lmeval.run(config, overwrite=True, show_progress=False)["divergence"]  # no traceback: rescored
    numeric = reference.select_dtypes("number").columns
    np.testing.assert_allclose(resumed[numeric], reference[numeric], rtol=1e-6)


class LongTokens(Analysis):
    """A toy analysis defined here, plugged in without touching a library file: per model,
    how many scored tokens had an NLL above 3 nats."""

    name = "long_tokens"

    def needs(self) -> Needs:
        return Needs(token_columns=frozenset({"nll"}))

    def start(self, model):
        return 0

    def update(self, state, part):
        return state + int((part.columns["nll"] > 3.0).sum())

    def merge(self, state, later):
        return state + later

    def finish(self, model, state, run):
        return ModelResult(summary={"n_above_3_nats": state}, tables={"long": {"model": model, "n": state}})

    def outputs(self, results, run):
        frame = pd.DataFrame([r.tables["long"] for r in results.values()])
        return Outputs(files={"long_tokens.csv": frame}, tables={"long_tokens": frame})


def test_a_toy_analysis_plugs_in_without_touching_the_library(tmp_path, three_checkpoints, monkeypatch):
    real = run_module.analyses_for
    monkeypatch.setattr(run_module, "analyses_for", lambda config: (*real(config), LongTokens()))
    config = three_model_config(tmp_path, {"base": three_checkpoints["base"]}, "")
    config_text = (
        Path(config)
        .read_text(encoding="utf-8")
        .replace("compare: {baseline: base, divergence: true, bootstrap: 50}", "")
    )
    Path(config).write_text(config_text, encoding="utf-8")
    tables = lmeval.run(config, show_progress=False)
    expected = int((tables["tokens"]["nll"] > 3.0).sum())
    assert expected > 0
    assert pd.read_csv(tmp_path / "out" / "long_tokens.csv")["n"].tolist() == [expected]
    assert tables["summary"]["n_above_3_nats"].tolist() == [expected]


def test_in_loop_evaluator_scores_chat_turns_like_lmeval_run(tmp_path, chat_lm):
    folder = tmp_path / "chat-model"
    chat_lm.model.save_pretrained(folder)
    chat_lm.tokenizer.save_pretrained(folder)
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])
    data = {"path": str(tmp_path / "chats.jsonl"), "messages_field": "messages"}
    evaluator = lmeval.InLoopEvaluator(data, label="chat")
    got = evaluator.evaluate(chat_lm.model, chat_lm.tokenizer, step=3)
    want = lmeval.run(
        write_config(
            tmp_path,
            json.dumps(
                {"models": [{"path": str(folder), "name": "m"}], "data": data, "output": {"dir": str(tmp_path / "out")}}
            ),
        ),
        show_progress=False,
    )["summary"].iloc[0]
    assert got["n_tokens"] == want["n_tokens"]  # the assistant tokens, not the JSON text of the conversation
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)


def test_in_loop_evaluator_scores_text_given_its_context(tmp_path, gpt2_pair, saved_gpt2):
    model, tokenizer = gpt2_pair
    rows = [{"id": f"d{i}", "context": c, "text": t} for i, (c, t) in enumerate(zip(CONTEXTS, CONTEXT_TEXTS))]
    write_jsonl(tmp_path / "data.jsonl", rows)
    data = {"path": str(tmp_path / "data.jsonl"), "id_field": "id", "context_field": "context"}
    got = lmeval.InLoopEvaluator(data, label="ctx").evaluate(model, tokenizer, step=1)
    expected = lmeval.score_texts(CONTEXT_TEXTS, (model, tokenizer), contexts=CONTEXTS)
    assert got["n_tokens"] == len(expected)
    assert got["nll_sum"] == pytest.approx(float(expected["nll"].astype(np.float64).sum()), rel=1e-6)


def _finished(analysis, model, state, run):
    result = analysis.finish(model, state, run)
    frames = {k: v for k, v in result.tables.items() if isinstance(v, pd.DataFrame)}
    return result.summary, dict(result.documents), frames


def test_states_of_two_stretches_merge_to_the_state_of_the_whole(tmp_path, three_checkpoints, monkeypatch):
    """Every analysis's ``merge``: the parts folded as two stretches scored apart (two ranks),
    each merged part by part, then the two states merged, finish exactly as the whole."""
    from lmeval.analyses.base import RunFacts
    from lmeval.engine import merge as merge_module
    from lmeval.engine.config import load_config

    seen = []
    real_fold = merge_module.Merger._fold
    monkeypatch.setattr(merge_module.Merger, "_fold", lambda self, part: (seen.append(part), real_fold(self, part))[1])
    path = three_model_config(
        tmp_path,
        {"base": three_checkpoints["base"], "ft1": three_checkpoints["ft1"]},
        "analysis: {positions: true, membership: true, bootstrap: 50}",
    )
    text = Path(path).read_text(encoding="utf-8").replace("part_chars: 400", "part_chars: 150")
    Path(path).write_text(text, encoding="utf-8")
    lmeval.run(path, show_progress=False)
    analyses = run_module.analyses_for(load_config(path))
    assert {a.name for a in analyses} == {"documents", "calibration", "positions", "membership", "divergence"}
    run = RunFacts(("base", "ft1"), len(TEXTS), 0, lambda doc_id: TEXTS[int(doc_id[1:])])
    for model in ("base", "ft1"):
        parts = [p for p in seen if p.model == model]
        assert len(parts) >= 3  # part_chars 150: a few parts, so the split is real
        for analysis in analyses:

            def fold(chunk, a=analysis, m=model):
                state = a.start(m)
                for part in chunk:
                    state = a.merge(state, a.update(a.start(m), part))
                return state

            whole = _finished(analysis, model, fold(parts), run)
            split = _finished(analysis, model, analysis.merge(fold(parts[:2]), fold(parts[2:])), run)
            assert split[0] == pytest.approx(whole[0], nan_ok=True), analysis.name
            for key in whole[1]:
                np.testing.assert_array_equal(split[1][key], whole[1][key])
            for key in whole[2]:
                pd.testing.assert_frame_equal(split[2][key], whole[2][key])


def test_the_run_compares_tokens_a_part_at_a_time_as_the_in_memory_comparison_does(
    tmp_path, three_checkpoints, monkeypatch
):
    import pyarrow.parquet as pq

    from lmeval.analyses.compare import compare_tables
    from lmeval.engine.schemas import read_table

    reads = []
    real_read = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: (reads.append(len(groups)), real_read(self, groups, **kw))[1],
    )
    path = three_model_config(tmp_path, three_checkpoints, "compare: {baseline: base, top_k: 7, bootstrap: 50}")
    text = (
        Path(path)
        .read_text(encoding="utf-8")
        .replace("compare: {baseline: base, divergence: true, bootstrap: 50}\n", "")
    )
    Path(path).write_text(text.replace("part_chars: 400", "part_chars: 150"), encoding="utf-8")
    tables = lmeval.run(path, show_progress=False)
    # two models against the baseline, a pair of reads per part and at least 3 parts, one row group each
    assert len(reads) % 4 == 0 and len(reads) >= 12 and max(reads) == 1
    in_memory = compare_tables(
        {"documents": tables["documents"], "tokens": read_table(tmp_path / "out" / "tokens.parquet")},
        tables["run"],
        tables["run"]["config"]["compare"],
    )["compare_tokens"]
    assert len(in_memory) == 14
    pd.testing.assert_frame_equal(tables["compare_tokens"].reset_index(drop=True), in_memory.reset_index(drop=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_background_threads_yield_to_the_model():
    """The part writer and the tokenizer-ahead run niced, so they never take a core from the
    model's intra-op threads; the scoring thread keeps its own priority."""
    import os
    import threading

    from lmeval.engine.prefetch import BACKGROUND_NICENESS, BackgroundWriter, prefetched

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    own, seen = niceness(), []
    with BackgroundWriter() as writer:
        writer.submit(lambda: seen.append(niceness()))
    prepared = [ready for _, ready in prefetched([1, 2], lambda _: niceness())]
    assert seen == [own + BACKGROUND_NICENESS] and prepared == [own + BACKGROUND_NICENESS] * 2
    assert niceness() == own


def test_freed_memory_is_given_back_at_most_once_a_second(monkeypatch):
    from lmeval.engine import memory

    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    monkeypatch.setattr(memory, "_last_trim", [0.0])
    assert memory.release_free_memory() and not memory.release_free_memory()  # the second within a second
    assert memory.release_free_memory(force=True) and calls == [0, 0]


def test_giving_memory_back_empties_arrows_heap_too(monkeypatch):
    """Arrow allocates parts' reads and writes from a heap of its own that malloc_trim does not reach."""
    import pyarrow as pa

    from lmeval.engine import memory

    released = []

    class Pool:
        def release_unused(self):
            released.append(True)

    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: None)
    monkeypatch.setattr(pa, "default_memory_pool", Pool)
    assert memory.release_free_memory(force=True) and released == [True]


def test_a_slow_writer_holds_at_most_two_parts_back():
    """Scoring waits for the part writer once two writes are pending: parts never pile up in memory."""
    import time

    from lmeval.engine.prefetch import BackgroundWriter

    pending, done = [], []
    with BackgroundWriter() as writer:
        for i in range(6):
            writer.submit(lambda i=i: (time.sleep(0.05), done.append(i)))  # slower than these submits
            pending.append(len(writer._futures))
    assert max(pending) == 2 == writer.max_pending and done == list(range(6))  # all written, in order
