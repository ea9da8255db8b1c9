"""A model scored beside a baseline batches the way each model's load-time probes demand.

The pair runs both bodies on the same batches, so the batching must be exact for both: the
stricter of the two probes' choices, and no mask where either model fails on one. Each
padding-sensitive toy of `test_probes`, as the model and as the baseline, is checked
against a float64 oracle over each window alone, and the model's own columns from the
pair pass against scoring it alone."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from conftest import build_model
from helpers import PROBE_TEXTS as TEXTS
from helpers import InferPadding, MaskCrash, RowMixing, finetuned, with_body
from lmeval.core.divergence import PAIR_FIELDS, divergence_statistics
from lmeval.core.losses import token_statistics
from lmeval.core.windows import make_windows
from lmeval.model import pair_scorer, scorer
from lmeval.model.loading import prepare_model
from lmeval.model.probes import BATCHINGS, Probes
from lmeval.model.scorer import ScoreOptions, pair_batching, score_windows
from tiny_arch import LONG_WINDOWS, build_tiny, oracle_nll, sweep_texts

MAX_LENGTH, STRIDE = 16, 5  # S < L: overlapping windows, and shorter final ones
BATCH_TOKENS = (1, 40, 100_000)  # one window a batch, a few, all
OWN = ("entropy", "max_prob", "rank", "sum_q2", "mean_neg_logq")  # the model's single-model columns
TOYS = {
    "InferPadding": (InferPadding, "equal_length"),
    "MaskCrash": (MaskCrash, "equal_length_no_mask"),
    "RowMixing": (RowMixing, "one_window"),
}


def sequences(tokenizer, texts=TEXTS) -> list[list[int]]:
    """Each text's ids after the BOS the scorer prepends (the `oracle_nll` input)."""
    return [[tokenizer.eos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def windows_of(seqs, max_length=MAX_LENGTH, stride=STRIDE):
    return [w for i, s in enumerate(seqs) for w in make_windows(i, s[1:], s[:1], max_length, stride)]


def oracle(model, seqs, max_length=MAX_LENGTH, stride=STRIDE) -> np.ndarray:
    """Every token's float64 NLL from ``model`` on its window alone, in window order."""
    return np.concatenate([oracle_nll(model, s, max_length, stride) for s in seqs])


def oracle_kl(model, baseline, windows) -> np.ndarray:
    """KL(P_baseline || P_model) = sum_v p (log p - log q) of every scored output, from each
    model's full float64 logits on each window alone."""
    out = []
    for w in windows:
        ids = torch.tensor([w.input_ids])
        with torch.no_grad():
            log_q = torch.log_softmax(model(input_ids=ids).logits[0, w.first_scored :].double(), dim=-1)
            log_p = torch.log_softmax(baseline(input_ids=ids).logits[0, w.first_scored :].double(), dim=-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(dim=1).numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def plain(bpe_tokenizer):
    """A plain tiny Llama over the toys' vocabulary, from another seed (so the pair differs)."""
    return build_model("llama", len(bpe_tokenizer), seed=1)


@pytest.mark.parametrize("role", ["model", "baseline"])
@pytest.mark.parametrize("toy_name", sorted(TOYS))
def test_a_padding_sensitive_toy_in_a_pair_matches_the_oracle(toy_name, role, plain, bpe_tokenizer):
    toy, batching = TOYS[toy_name]
    toy_model = with_body(toy.make(), bpe_tokenizer)
    model, base = (toy_model, plain) if role == "model" else (plain, toy_model)
    lm, base_lm = prepare_model(model, bpe_tokenizer, name="model"), prepare_model(base, bpe_tokenizer, name="base")
    assert pair_batching(lm, base_lm) == batching  # the toy's batching, whichever side it is on
    # Alone under the pair's batching: the plain model's float32 rounding moves by an ulp or
    # two between padded and unpadded batches (1.4e-6 on an entropy of 2.9), which is not
    # what is compared here.
    lm_alone = dataclasses.replace(lm, probes=dataclasses.replace(lm.probes, batching=batching))
    seqs = sequences(bpe_tokenizer)
    windows = windows_of(seqs)
    want, want_base, want_kl = oracle(model, seqs), oracle(base, seqs), oracle_kl(model, base, windows)
    for batch_tokens in BATCH_TOKENS:
        options = ScoreOptions(batch_tokens=batch_tokens)
        pair = score_windows(lm, windows, options, baseline=base_lm)  # MaskCrash: no RuntimeError
        where = f"{toy_name} as {role}, batch_tokens={batch_tokens}"
        np.testing.assert_allclose(pair["nll"], want, rtol=0, atol=1e-5, err_msg=f"{where}: nll")
        np.testing.assert_allclose(pair["nll_baseline"], want_base, rtol=0, atol=1e-5, err_msg=f"{where}: nll_baseline")
        np.testing.assert_allclose(pair["kl"], want_kl, rtol=0, atol=1e-5, err_msg=f"{where}: kl")
        alone = score_windows(lm_alone, windows, options)
        for key in OWN:  # the model's own columns are those it gets when scored alone
            np.testing.assert_allclose(pair[key], alone[key], rtol=0, atol=1e-6, err_msg=f"{where}: {key}")


# The sparse-attention indexers of test_sweep, built with index_topk = 24 and scored in
# 40-token windows: padded beyond 24 tokens they keep other keys, so a pair with one of them,
# on either side, must batch equal-length windows only. One runs by default: DeepSeek-V3.2 as
# the baseline (the side whose probes the model's batching must take on).
INDEXED_PAIRS = [("deepseek_v32", "baseline")] + [
    pytest.param(t, role, marks=pytest.mark.slow)
    for t in ("axk2", "deepseek_v32", "deepseek_v4", "dots3_note_text", "glm_moe_dsa", "hy_v4")
    for role in ("model", "baseline")
    if (t, role) != ("deepseek_v32", "baseline")
]


@pytest.mark.parametrize("model_type, role", INDEXED_PAIRS)
def test_an_indexer_in_a_pair_matches_the_oracle(model_type, role, plain, bpe_tokenizer):
    indexer = build_tiny(model_type, len(bpe_tokenizer))
    model, base = (indexer, plain) if role == "model" else (plain, indexer)
    lm, base_lm = prepare_model(model, bpe_tokenizer, name="model"), prepare_model(base, bpe_tokenizer, name="base")
    assert pair_batching(lm, base_lm) == "equal_length"
    (max_length, stride), texts = LONG_WINDOWS[1], sweep_texts(quick=True, long=True)
    seqs = sequences(bpe_tokenizer, texts)
    windows = windows_of(seqs, max_length, stride)
    want, want_base = oracle(model, seqs, max_length, stride), oracle(base, seqs, max_length, stride)
    want_kl = oracle_kl(model, base, windows)
    for batch_tokens in (1, 100, 100_000):
        pair = score_windows(lm, windows, ScoreOptions(batch_tokens=batch_tokens), baseline=base_lm)
        where = f"{model_type} as {role}, batch_tokens={batch_tokens}"
        np.testing.assert_allclose(pair["nll"], want, rtol=0, atol=1e-5, err_msg=f"{where}: nll")
        np.testing.assert_allclose(pair["nll_baseline"], want_base, rtol=0, atol=1e-5, err_msg=f"{where}: nll_baseline")
        np.testing.assert_allclose(pair["kl"], want_kl, rtol=0, atol=1e-5, err_msg=f"{where}: kl")
    # Padded pair batches would move the indexer's NLL: the checks above can fail.
    padded = [dataclasses.replace(x, probes=Probes(batching="padded")) for x in (lm, base_lm)]
    pair = score_windows(padded[0], windows, ScoreOptions(batch_tokens=100_000), baseline=padded[1])
    got, expected = (pair["nll"], want) if role == "model" else (pair["nll_baseline"], want_base)
    assert np.abs(got - expected).max() > 1e-2


def test_the_pair_wrapper_gives_the_old_columns_on_a_mask_crashing_model(plain, bpe_tokenizer):
    """`score_pair_windows`, the callers' entry point, on the toy that raises when given a
    mask for 2+ rows (before: RuntimeError), as the model and as the baseline."""
    toy = prepare_model(with_body(MaskCrash.make(), bpe_tokenizer), bpe_tokenizer, name="toy")
    other = prepare_model(plain, bpe_tokenizer, name="plain")
    seqs = sequences(bpe_tokenizer)
    windows = windows_of(seqs)
    for lm, base in ((toy, other), (other, toy)):
        columns = pair_scorer.score_pair_windows(lm, base, windows, batch_tokens=100_000)
        assert set(PAIR_FIELDS) | {"doc_index", "position", "token_id", "context_len"} <= set(columns)
        np.testing.assert_allclose(columns["nll"], oracle(lm.model, seqs), rtol=0, atol=1e-5)
        np.testing.assert_allclose(columns["nll_baseline"], oracle(base.model, seqs), rtol=0, atol=1e-5)


def test_the_stricter_batching_of_the_two_is_used(tiny_models, bpe_tokenizer):
    lm = prepare_model(tiny_models["llama"], bpe_tokenizer, name="m")
    for a, b in itertools.product(BATCHINGS, repeat=2):
        first = dataclasses.replace(lm, probes=Probes(batching=a))
        second = dataclasses.replace(lm, probes=Probes(batching=b))
        assert pair_batching(first, second) == BATCHINGS[max(BATCHINGS.index(a), BATCHINGS.index(b))]
    assert pair_batching(lm, None) == lm.probes.batching


def test_kl_matches_a_float64_oracle_on_a_plain_model(tiny_models, bpe_tokenizer):
    base = tiny_models["llama"]
    model = finetuned(base)
    lm, base_lm = prepare_model(model, bpe_tokenizer, name="m"), prepare_model(base, bpe_tokenizer, name="b")
    windows = windows_of(sequences(bpe_tokenizer))
    columns = score_windows(lm, windows, ScoreOptions(batch_tokens=40), baseline=base_lm)
    want = oracle_kl(model, base, windows)
    assert 1e-4 < want.mean() < 1.0  # moved, like a fine-tune
    np.testing.assert_allclose(columns["kl"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("twice", ["same object", "two loads"])
def test_kl_of_a_model_against_itself_is_zero(twice, tiny_models, bpe_tokenizer):
    lm = prepare_model(tiny_models["llama"], bpe_tokenizer, name="m")
    other = (
        lm if twice == "same object" else prepare_model(copy.deepcopy(tiny_models["llama"]), bpe_tokenizer, name="c")
    )
    columns = score_windows(lm, windows_of(sequences(bpe_tokenizer)), ScoreOptions(batch_tokens=40), baseline=other)
    assert np.abs(columns["kl"]).max() <= 1e-7 and np.abs(columns["kl_reverse"]).max() <= 1e-7
    assert columns["same_top1"].all() and (columns["delta_p"] == 0).all()
    np.testing.assert_array_equal(columns["nll"], columns["nll_baseline"])


def test_the_model_nll_is_the_same_from_both_reductions():
    """The pair's ``nll`` comes from `token_statistics`; `divergence_statistics` computes it
    too, from the same chunk, and the two must agree."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(64, 300, generator=generator) * 4
    w = torch.randn(64, 300, generator=generator) * 4
    y = torch.randint(0, 300, (64,), generator=generator)
    own = token_statistics(z, y).nll
    pair = divergence_statistics(z, w, y).nll
    torch.testing.assert_close(own, pair, rtol=0, atol=1e-6)


def test_out_of_memory_halves_a_pair_batch_and_loses_nothing(tiny_models, bpe_tokenizer, monkeypatch):
    lm = prepare_model(finetuned(tiny_models["llama"]), bpe_tokenizer, name="m")
    base = prepare_model(tiny_models["llama"], bpe_tokenizer, name="b")
    windows, options = windows_of(sequences(bpe_tokenizer)), ScoreOptions(batch_tokens=4096)
    reference = score_windows(lm, windows, options, baseline=base)
    real, sizes = scorer.score_batch, []

    def tight(lm, windows, options, compiled=False, baseline=None):
        assert baseline is base  # the pair's batches go through the one loop
        if len(windows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(len(windows))
        return real(lm, windows, options, compiled, baseline)

    monkeypatch.setattr(scorer, "score_batch", tight)
    retried = score_windows(lm, windows, options, baseline=base)
    assert sizes and max(sizes) <= 2
    assert set(retried) == set(reference)
    for key, values in reference.items():  # other paddings round float32 logits differently: a few ulps
        atol = 1e-6 if key in PAIR_FIELDS else 1e-5  # entropy subtracts two sums of ~10 nats
        np.testing.assert_allclose(
            retried[key].astype(np.float64), values.astype(np.float64), rtol=1e-6, atol=atol, err_msg=key
        )


def test_nothing_to_score_gives_every_column_with_zero_rows(tiny_models, bpe_tokenizer):
    lm = prepare_model(tiny_models["llama"], bpe_tokenizer, name="m")
    columns = score_windows(lm, [], ScoreOptions(), baseline=lm)
    alone = score_windows(lm, [], ScoreOptions())
    assert set(columns) == set(alone) | set(PAIR_FIELDS)
    assert all(len(v) == 0 for v in columns.values())
