"""N variants against one base in one lockstep pass (`lmeval.model.lockstep`): the same
numbers as pair by pair, and the baseline's body run once per batch (not once per variant)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

import lmeval
from conftest import CORPUS
from helpers import finetuned, rounded, write_jsonl
from lmeval.engine.config import build_config
from lmeval.model.head import OutputHead
from lmeval.model.loading import load_model, prepare_model
from lmeval.model.spec import ModelSpec

TEXTS = CORPUS[:4] + ["short"]
PAIR = ("kl", "kl_reverse", "delta_p", "nll", "nll_baseline", "acceptance", "topk_overlap", "kl_topk")


def counted(lm):
    """``lm`` with its body's and head's calls counted (the fast head path)."""
    calls = {"body": 0, "project": 0}
    body, project = lm.head.body, lm.head.project

    def counting_body(*args, **kwargs):
        calls["body"] += 1
        return body(*args, **kwargs)

    def counting_project(*args, **kwargs):
        calls["project"] += 1
        return project(*args, **kwargs)

    lm.head.body, lm.head.project = counting_body, counting_project
    return lm, calls


@pytest.fixture(scope="module")
def variants(tiny_models, bpe_tokenizer):
    base = tiny_models["gpt2"]
    models = {"int8": rounded(base, 8), "int4": rounded(base, 4), "sft": finetuned(base)}
    return base, {name: prepare_model(m, bpe_tokenizer, name=name) for name, m in models.items()}


def test_three_variants_in_lockstep_equal_three_pairs_and_run_the_base_once(variants, bpe_tokenizer):
    base_model, loaded = variants
    base, calls = counted(prepare_model(base_model, bpe_tokenizer, name="base"))
    assert base.head.fast
    table = lmeval.divergence(TEXTS, list(loaded.values()), base, max_length=8, batch_tokens=1)
    n_windows = calls["body"]  # batch_tokens=1: one window per batch
    assert n_windows > len(TEXTS)  # several windows a text at max_length 8
    assert calls["project"] == n_windows  # one chunk per window here: the head once per chunk
    assert table.model.unique().tolist() == ["int8", "int4", "sft"]
    calls["body"] = 0
    for name, variant in loaded.items():
        pair = lmeval.divergence(TEXTS, variant, base, max_length=8, batch_tokens=1)
        rows = table[table.model == name].reset_index(drop=True)
        assert rows[["doc_id", "position", "token_id"]].equals(pair[["doc_id", "position", "token_id"]])
        for key in PAIR:
            np.testing.assert_allclose(rows[key], pair[key], atol=1e-6, rtol=1e-6, err_msg=f"{name}: {key}")
        assert (rows.same_top1 == pair.same_top1).all()
    assert calls["body"] == 3 * n_windows  # pair by pair: the base once per window per variant
    assert table[table.model == "int4"].kl.mean() > table[table.model == "int8"].kl.mean()


def test_lockstep_batches_many_windows_together(variants, bpe_tokenizer):
    base_model, loaded = variants
    base, calls = counted(prepare_model(base_model, bpe_tokenizer, name="base"))
    lmeval.divergence(TEXTS, list(loaded.values()), base, max_length=8, batch_tokens=4096)
    assert calls["body"] == 1  # every window fits one batch


# --------------------------------------------------------------------------------------
# lmeval run: compare.lockstep
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_variants(tmp_path_factory, variants, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("lockstep")
    base_model, loaded = variants
    for name, model in [("base", base_model), *((n, lm.model) for n, lm in loaded.items())]:
        model.save_pretrained(folder / name)
        bpe_tokenizer.save_pretrained(folder / name)
    data = write_jsonl(folder / "texts.jsonl", [{"text": t} for t in CORPUS * 2])
    return folder, data


def run_divergence(folder, data, out, lockstep: str):
    models = "\n".join(f"  - {{name: {n}, path: {folder / n}}}" for n in ("base", "int8", "int4", "sft"))
    config = build_config(
        yaml.safe_load(
            f"models:\n{models}\ndata: {{path: {data}}}\nscoring: {{max_length: 16, batch_tokens: 64}}\n"
            f"compare: {{divergence: true, baseline: base, lockstep: {lockstep}, bootstrap: 50}}\n"
            f"analysis: {{positions: false}}\noutput: {{dir: {out}}}\n"
        ),
        folder,
    )
    return lmeval.run(config, show_progress=False, return_tokens=False, overwrite=True)


def test_a_run_scores_the_variants_in_lockstep_with_the_same_numbers(saved_variants, tmp_path, monkeypatch):
    folder, data = saved_variants
    calls: dict = {}  # body calls per loaded head (load-time probes included: the same in both modes)
    body = OutputHead.body

    def counting(self, *args, **kwargs):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return body(self, *args, **kwargs)

    monkeypatch.setattr(OutputHead, "body", counting)
    tables, counts = {}, {}
    for mode in ("auto", "pair"):
        calls.clear()
        tables[mode] = run_divergence(folder, data, tmp_path / mode, mode)
        counts[mode] = sorted(calls.values())
    lockstep, pair = tables["auto"], tables["pair"]
    assert lockstep["run"]["divergence"]["lockstep"]["mode"] == "lockstep"
    assert pair["run"]["divergence"]["lockstep"]["mode"] == "pair"
    # lockstep: every model's body, the base's included, once per batch; pair by pair the
    # base's runs in its own pass and again in each of the 3 pairs
    calls.clear()
    load_model(ModelSpec(path=str(folder / "base")))
    (probes,) = calls.values()  # the load-time probes' bodies
    batches = counts["auto"][0] - probes
    assert batches > 0 and counts["auto"] == [probes + batches] * 4
    assert counts["pair"] == [probes + batches] * 3 + [probes + 4 * batches]
    a, b = lockstep["divergence"].set_index("model"), pair["divergence"].set_index("model")
    assert list(a.index) == ["int8", "int4", "sft"]
    for column in ("kl_mean", "acceptance_mean", "topk_overlap_mean", "kl_topk_mean", "kl_mean_ci_low"):
        np.testing.assert_allclose(a[column], b.loc[a.index, column], rtol=1e-5, atol=1e-9, err_msg=column)
    # ln_ppl_ratio is a difference of two pooled nlls (here ~7e-3 of ~5 nats): the two passes'
    # float32 nll arithmetic (the CPU reductions kernel alone, or beside the baseline) may differ
    # in the last bit per token, so it is compared on the nll scale, in nats
    np.testing.assert_allclose(a.ln_ppl_ratio, b.loc[a.index, "ln_ppl_ratio"], rtol=0, atol=1e-6)
    # each variant's size: float32 weight files are ~32 bits a weight (plus the files' headers)
    assert ((a.bits_per_weight > 32) & (a.bits_per_weight < 36)).all()
    assert (a.weight_bytes * 8 / a.n_parameters == a.bits_per_weight).all()
    assert (tmp_path / "auto" / "divergence_bpw.png").exists()
    pd.testing.assert_frame_equal(
        lockstep["summary"].drop(columns="tokens_per_second"), pair["summary"].drop(columns="tokens_per_second"),
        check_exact=False, rtol=1e-6,
    )  # fmt: skip
