"""A baseline kept as its top-K (`cached_divergence_statistics`, ``lmeval.divergence(...,
baseline_cache="topk")``): the documented bounds hold on every token against the exact
lockstep numbers, the other statistics are exact, and K = V gives the exact values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import lmeval
from conftest import CORPUS
from helpers import finetuned, rounded, write_jsonl
from lmeval.core.divergence import cached_divergence_statistics, divergence_statistics, topk_cache
from lmeval.engine import passes
from lmeval.engine.config import build_config
from lmeval.engine.parts import model_dirname
from lmeval.errors import ConfigError

EXACT = ("topk_overlap", "kl_topk", "delta_p", "nll", "nll_baseline")
TOL = 1e-6  # float32 rounding of the stored log-probabilities


def assert_bounds(cached, exact, exact_at_full: bool = False):
    assert (cached["kl"] <= exact["kl"] + TOL).all()  # LOWER bounds
    assert (cached["kl_reverse"] <= exact["kl_reverse"] + TOL).all()
    assert (cached["acceptance"] >= exact["acceptance"] - TOL).all()  # an UPPER bound
    for key in EXACT + (("kl", "kl_reverse", "acceptance") if exact_at_full else ()):
        np.testing.assert_allclose(cached[key], exact[key], atol=TOL, rtol=1e-6, err_msg=key)
    assert (np.asarray(cached["same_top1"]) == np.asarray(exact["same_top1"])).all()


@pytest.mark.parametrize("k", [10, 100, 299, 300])
def test_bounds_on_synthetic_logits(k):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(80, 300, generator=g) * 2.0
    z = w + torch.randn(80, 300, generator=g) * 0.4
    y = torch.randint(0, 300, (80,), generator=g)
    exact = divergence_statistics(z, w, y, overlap_k=min(k, 10), kl_top_k=k)
    cached = cached_divergence_statistics(z, topk_cache(w, k), exact.nll_baseline, y, min(k, 10), k)
    as_dict = lambda s: {f: getattr(s, f).double().numpy() for f in s.__dataclass_fields__}  # noqa: E731
    assert_bounds(as_dict(cached), as_dict(exact), exact_at_full=k >= 299)  # a tail of one token: exact
    if k <= 100:
        assert (as_dict(exact)["kl"] - as_dict(cached)["kl"]).max() > 1e-4  # a real gap, not equality


def test_cache_k_below_the_statistics_k_is_refused():
    w = torch.randn(4, 50)
    with pytest.raises(ValueError, match="<= the cache's K"):
        cached_divergence_statistics(w, topk_cache(w, 5), torch.zeros(4), torch.zeros(4, dtype=torch.long), 10, 5)


@pytest.mark.parametrize("variant", [lambda m: rounded(m, 4), finetuned])
def test_through_the_scorer_the_bound_holds_on_every_token(variant, tiny_models, bpe_tokenizer):
    base = tiny_models["llama"]
    model = variant(base)
    pair = ((model, bpe_tokenizer), (base, bpe_tokenizer))
    exact = lmeval.divergence(CORPUS, *pair, kl_top_k=20, batch_tokens=64)
    cached = lmeval.divergence(CORPUS, *pair, kl_top_k=20, batch_tokens=64, baseline_cache="topk")
    assert cached[["doc_id", "position", "token_id"]].equals(exact[["doc_id", "position", "token_id"]])
    keys = ("kl", "kl_reverse", "acceptance", "same_top1", *EXACT)
    assert_bounds({k: cached[k].to_numpy(np.float64) for k in keys}, {k: exact[k].to_numpy(np.float64) for k in keys})
    full = lmeval.divergence(CORPUS, *pair, kl_top_k=len(bpe_tokenizer), batch_tokens=64, baseline_cache="topk")
    everything = lmeval.divergence(CORPUS, *pair, kl_top_k=len(bpe_tokenizer), batch_tokens=64)
    for key in ("kl", "kl_reverse", "acceptance"):  # K = V: no tail, the exact values
        np.testing.assert_allclose(full[key], everything[key], atol=TOL, err_msg=key)


# --------------------------------------------------------------------------------------
# lmeval run: compare.baseline_cache: topk
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory, tiny_models, bpe_tokenizer):
    """A tiny Llama, a 4-bit-rounded and a fine-tuned copy of it, saved; a corpus of 12 texts."""
    folder = tmp_path_factory.mktemp("cached_run")
    base = tiny_models["llama"]
    for name, model in (("base", base), ("int4", rounded(base, 4)), ("sft", finetuned(base))):
        model.save_pretrained(folder / name)
        bpe_tokenizer.save_pretrained(folder / name)
    data = write_jsonl(folder / "texts.jsonl", [{"text": t} for t in CORPUS * 2])
    return folder, data


def cached_run(folder, data, out, cache: str, names=("int4", "sft", "base")):
    """A run of the base and two variants; the variants come first in `models:` (under topk the
    baseline's pass must still run first). The YAML is written beside the outputs."""
    models = "\n".join(f"  - {{name: {n}, path: {folder / n}}}" for n in names)
    body = (
        f"models:\n{models}\ndata: {{path: {data}}}\nscoring: {{max_length: 16, batch_tokens: 64}}\n"
        f"compare: {{divergence: true, baseline: base, lockstep: pair, baseline_cache: {cache}, kl_top_k: 8, "
        f"overlap_k: 5, bootstrap: 20}}\nanalysis: {{positions: false}}\noutput: {{dir: {out}, part_chars: 200}}\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def run_yaml(path):
    return lmeval.run(str(path), show_progress=False, return_tokens=False)


def test_a_run_with_the_baseline_kept_as_its_topk_bounds_the_exact_run_on_every_token(
    saved_pair, tmp_path, monkeypatch
):
    folder, data = saved_pair
    loads: list[str] = []
    load = passes.load_model
    monkeypatch.setattr(passes, "load_model", lambda spec: loads.append(spec.name) or load(spec))
    exact = run_yaml(cached_run(folder, data, tmp_path / "exact", "none"))
    loads.clear()
    cached = run_yaml(cached_run(folder, data, tmp_path / "topk", "topk"))
    assert loads == ["base", "int4", "sft"]  # the baseline first, alone, then each model alone
    a = pd.read_parquet(tmp_path / "topk" / "divergence.parquet")
    b = pd.read_parquet(tmp_path / "exact" / "divergence.parquet")
    assert len(a) == len(b) > 100 and a[["model", "doc_id", "position", "token_id"]].equals(
        b[["model", "doc_id", "position", "token_id"]]
    )
    keys = ("kl", "kl_reverse", "acceptance", "same_top1", *EXACT)
    for model in ("int4", "sft"):
        x, y = a[a.model == model], b[b.model == model]
        assert_bounds({k: x[k].to_numpy(np.float64) for k in keys}, {k: y[k].to_numpy(np.float64) for k in keys})
        assert (y.kl.to_numpy() - x.kl.to_numpy()).max() > 1e-4  # K = 8 of 400 ids: a real gap
    # the summaries follow: the mean KL of the kept top-K is below the exact one, the rest equal
    s, t = cached["divergence"].set_index("model"), exact["divergence"].set_index("model")
    assert (s.kl_mean < t.kl_mean).all() and (s.acceptance_mean > t.acceptance_mean).all()
    # how loose the bounds may be: the baseline's mass outside its 8 kept ids, the same for both models
    tail = s.baseline_tail_mass_mean
    assert tail.iloc[0] == tail.iloc[1] and 0 < tail.iloc[0] < 1 and t.baseline_tail_mass_mean.isna().all()
    # The two runs take their nlls from different arithmetic: the kept run from the CPU reductions
    # kernel (both models scored alone), the exact one from the pair's divergence statistics; each
    # is within a float32 ulp or so of float64 per token, and how the kernel's vectorised exp rounds
    # depends on the CPU. ln_ppl_ratio is a difference of two mean nlls (0.03 nats here), so it is
    # compared in nats (7e-8 apart on one machine with AVX-512, where a relative 1e-6 failed).
    np.testing.assert_allclose(s.ln_ppl_ratio, t.ln_ppl_ratio, rtol=0, atol=1e-5)
    run = cached["run"]
    record = run["divergence"]["baseline_cache"]
    assert (record["mode"], record["k"]) == ("topk", 8) and "LOWER bounds" in record["bound"]
    assert exact["run"]["divergence"]["baseline_cache"]["mode"] == "none"
    assert run["divergence"]["lockstep"]["mode"] == "baseline_cache"
    protocols = run["protocol"]["models"]
    assert protocols["int4"]["baseline_cache"]["mode"] == "topk" and protocols["int4"]["baseline"] == "base"
    assert protocols["base"]["baseline_cache"]["k"] == 8


def test_a_resumed_topk_run_reads_the_baseline_parts_left_on_disk(saved_pair, tmp_path, monkeypatch):
    """Stopped in the first model's pass: the resumed run reads the baseline's top-K from the
    parts the first run left (the baseline is not loaded again) and writes the same table."""
    folder, data = saved_pair
    names = ("int4", "base")  # one model: fewer loads
    whole = run_yaml(cached_run(folder, data, tmp_path / "whole", "topk", names))
    path = cached_run(folder, data, tmp_path / "resumed", "topk", names)
    real_write, written = passes.write_part, []
    int4, base = model_dirname("int4"), model_dirname("base")

    def write_then_stop(target, columns, meta):
        if target.parent.name == int4 and any(w.parent.name == int4 for w in written):
            raise KeyboardInterrupt  # the second part of int4's pass
        written.append(target)
        real_write(target, columns, meta)

    monkeypatch.setattr(passes, "write_part", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_yaml(path)
    monkeypatch.setattr(passes, "write_part", real_write)
    base_parts = [w for w in written if w.parent.name == base]
    assert base_parts and {f"cache_ids.{k}" for k in range(8)} <= set(pq.read_schema(base_parts[0]).names)
    loads: list[str] = []
    load = passes.load_model
    monkeypatch.setattr(passes, "load_model", lambda spec: loads.append(spec.name) or load(spec))
    resumed = run_yaml(path)
    assert loads == ["int4"]
    pd.testing.assert_frame_equal(resumed["divergence"], whole["divergence"], check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "resumed" / "divergence.parquet"),
        pd.read_parquet(tmp_path / "whole" / "divergence.parquet"),
    )


def test_baseline_cache_keys_are_validated(tmp_path):
    raw = {
        "models": [{"path": "gpt2"}, {"path": "gpt2", "name": "other"}],
        "data": {"path": "wikitext"},
        "compare": {"baseline_cache": "topk", "overlap_k": 20, "kl_top_k": 10},
    }
    with pytest.raises(ConfigError) as err:
        build_config(raw, tmp_path)
    assert "compare.baseline_cache: topk keeps the baseline for the divergence pass" in str(err.value)
    assert "compare.overlap_k: must be <= compare.kl_top_k" in str(err.value)
    raw["compare"] = {"baseline_cache": "all"}
    with pytest.raises(ConfigError, match=r"compare\.baseline_cache: must be one of none, topk"):
        build_config(raw, tmp_path)
