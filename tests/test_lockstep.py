"""N variants against one base in one lockstep pass (`lmeval.model.lockstep`): the same
numbers as pair by pair, and the baseline's body run once per batch (not once per variant)."""

from __future__ import annotations

import numpy as np
import pytest

import lmeval
from conftest import CORPUS
from helpers import finetuned, rounded
from lmeval.model.loading import prepare_model

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
