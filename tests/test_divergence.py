"""Divergence from a baseline through the pair scorer: against a float64 oracle from both
models' full logits, a model against itself, invariance to batching, refused mismatches,
and summaries that equal a direct numpy computation over the per-token table."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from conftest import CORPUS, build_model, train_bpe
from helpers import finetuned, numpy_summary, rounded
from lmeval import ModelError, TokenizerMismatchError
from lmeval.model import pair_scorer, scorer
from lmeval.model.loading import prepare_model

TEXTS = CORPUS[:4] + ["short", "é 猫 😀 mixed scripts and emoji"]
FEW = [TEXTS[0], TEXTS[3], TEXTS[5]]  # for the slower checks (bfloat16 on CPU, many variants)
STATS = ("kl", "kl_reverse", "delta_p", "nll", "nll_baseline")


def top_set(x: np.ndarray, k: int) -> np.ndarray:
    """(N, k) ids of each row's k largest values, a tie to the lower id."""
    ids = np.arange(x.shape[1])
    return np.stack([np.lexsort((ids, -row))[:k] for row in x])


def oracle(model, baseline, ids: list[int], k: int = 10, big_k: int = 100) -> dict[str, np.ndarray]:
    """Every statistic for s[1:], from each model's full forward over ``ids``, in float64."""
    with torch.no_grad():
        z = model(torch.tensor([ids])).logits[0, :-1].double()  # (T-1, V)
        w = baseline(torch.tensor([ids])).logits[0, :-1].double()
    log_q, log_p = torch.log_softmax(z, dim=-1), torch.log_softmax(w, dim=-1)
    y = torch.tensor(ids[1:])[:, None]
    q_y, p_y = log_q.gather(1, y).squeeze(1).exp(), log_p.gather(1, y).squeeze(1).exp()
    top_q, top_p = top_set(z.numpy(), k), top_set(w.numpy(), big_k)
    top_p_t = torch.from_numpy(top_p)
    lp_s, lq_s = torch.log_softmax(w.gather(1, top_p_t), 1), torch.log_softmax(z.gather(1, top_p_t), 1)
    return {
        "kl": (log_p.exp() * (log_p - log_q)).sum(1).numpy(),
        "kl_reverse": (log_q.exp() * (log_q - log_p)).sum(1).numpy(),
        "delta_p": (q_y - p_y).numpy(),
        "same_top1": top_q[:, 0] == top_p[:, 0],
        "nll": -q_y.log().numpy(),
        "nll_baseline": -p_y.log().numpy(),
        "acceptance": torch.minimum(log_p.exp(), log_q.exp()).sum(1).numpy(),
        "topk_overlap": np.array([len(set(a) & set(b)) for a, b in zip(top_q, top_p[:, :k])]) / k,
        "kl_topk": (lp_s.exp() * (lp_s - lq_s)).sum(1).numpy(),
    }


ABSOLUTE = ("kl", "kl_reverse", "delta_p", "acceptance", "topk_overlap", "kl_topk")


def assert_matches_oracle(table, model, base, tokenizer, texts, atol=1e-6, rtol=0.0):
    bos = tokenizer.eos_token_id
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = table[table.doc_id == i]
        assert rows.position.tolist() == list(range(len(ids))) and rows.token_id.tolist() == ids
        expected = oracle(model, base, [bos] + ids)
        for key in ABSOLUTE:
            np.testing.assert_allclose(rows[key].to_numpy(np.float64), expected[key], atol=atol, rtol=rtol, err_msg=key)
        for key in ("nll", "nll_baseline"):  # float32 itself is 1e-6 coarse near 10 nats: relative
            np.testing.assert_allclose(rows[key].to_numpy(np.float64), expected[key], rtol=1e-6, atol=1e-6, err_msg=key)
        np.testing.assert_array_equal(rows.same_top1.to_numpy(), expected["same_top1"])


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("gpt2", torch.float32),
        ("gpt2", torch.bfloat16),
        ("llama", torch.float32),
        pytest.param("llama", torch.bfloat16, marks=pytest.mark.slow),  # bfloat16 is slow on CPU
    ],
)
def test_matches_float64_oracle_from_full_logits(arch, dtype, tiny_models, bpe_tokenizer):
    """A checkpoint nudged from its base, in float32 and bfloat16 weights: kl, kl_reverse
    and delta_p within 1e-6 nats of the float64 computation on each model's full logits."""
    base = copy.deepcopy(tiny_models[arch]).to(dtype)
    model = finetuned(tiny_models[arch]).to(dtype)
    texts = TEXTS if dtype == torch.float32 else FEW
    table = lmeval.divergence(texts, (model, bpe_tokenizer), (base, bpe_tokenizer), batch_tokens=1)
    assert 1e-4 < table.kl.mean() < 1.0  # moved, but like a fine-tune, not a different model
    assert_matches_oracle(table, model, base, bpe_tokenizer, texts)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_weight_rounded_copy_matches_the_oracle(arch, tiny_models, bpe_tokenizer):
    """Every weight matrix rounded to 8 bits (a quantization's small moves): all nine per-token
    statistics within 1e-6 of the float64 oracle on both models' full logits."""
    base = tiny_models[arch]
    model = rounded(base)
    table = lmeval.divergence(TEXTS, (model, bpe_tokenizer), (base, bpe_tokenizer), batch_tokens=64)
    assert 0 < table.kl.mean() < 1e-2 and table.acceptance.min() < 1.0  # moved, a little
    assert_matches_oracle(table, model, base, bpe_tokenizer, TEXTS)


@pytest.mark.slow
def test_unrelated_models_match_the_oracle_to_float32_precision(tiny_models, bpe_tokenizer):
    """Two independent inits: KL near 10 nats, where float32 itself is spaced 1e-6 apart, so
    the bound is 1e-6 plus float32's relative precision."""
    model, base = tiny_models["gpt2"], build_model("gpt2", len(bpe_tokenizer), seed=1)
    table = lmeval.divergence(FEW, (model, bpe_tokenizer), (base, bpe_tokenizer), batch_tokens=1)
    assert table.kl.mean() > 1.0
    assert_matches_oracle(table, model, base, bpe_tokenizer, FEW, atol=1e-6, rtol=3e-7)


def test_independent_of_batching_chunks_head_path_and_order(tiny_models, bpe_tokenizer):
    model, base = finetuned(tiny_models["gpt2"]), tiny_models["gpt2"]
    reference = lmeval.divergence(FEW, (model, bpe_tokenizer), (base, bpe_tokenizer), max_length=8, batch_tokens=4096)
    plain = prepare_model(model, bpe_tokenizer, name="plain")
    plain.head.fast = False  # the model(...).logits path
    variants = {
        "one window per batch": lmeval.divergence(
            FEW, (model, bpe_tokenizer), (base, bpe_tokenizer), max_length=8, batch_tokens=1
        ),
        "plain head path": lmeval.divergence(FEW, plain, (base, bpe_tokenizer), max_length=8, batch_tokens=64),
    }
    backwards = lmeval.divergence(
        FEW[::-1], (model, bpe_tokenizer), (base, bpe_tokenizer), max_length=8, batch_tokens=64
    )
    backwards["doc_id"] = len(FEW) - 1 - backwards["doc_id"]
    variants["documents reversed"] = backwards.sort_values(["doc_id", "position"]).reset_index(drop=True)
    for name, table in variants.items():
        assert table[["doc_id", "position", "token_id"]].equals(reference[["doc_id", "position", "token_id"]]), name
        for key in STATS:
            np.testing.assert_allclose(table[key], reference[key], atol=1e-6, rtol=1e-6, err_msg=f"{name}: {key}")
        assert (table.same_top1 == reference.same_top1).all(), name


@pytest.mark.slow
def test_small_chunks_give_the_same_numbers(tiny_models, bpe_tokenizer):
    model, base = (
        prepare_model(finetuned(tiny_models["llama"]), bpe_tokenizer),
        prepare_model(tiny_models["llama"], bpe_tokenizer),
    )
    from lmeval.core.windows import make_windows

    ids = bpe_tokenizer(" ".join(CORPUS), add_special_tokens=False)["input_ids"]
    windows = make_windows(0, ids, [0], 32, 32)
    whole = pair_scorer.score_pair_windows(model, base, windows, batch_tokens=4096)
    chunked = pair_scorer.score_pair_windows(model, base, windows, batch_tokens=4096, chunk_bytes=1)  # one row a chunk
    for key in STATS:
        np.testing.assert_allclose(chunked[key], whole[key], atol=1e-6, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("twice", ["same object", "two loads"])
def test_a_model_against_itself_is_zero_everywhere(twice, tiny_models, bpe_tokenizer):
    lm = prepare_model(tiny_models["gpt2"], bpe_tokenizer, name="m")
    other = (
        lm if twice == "same object" else prepare_model(copy.deepcopy(tiny_models["gpt2"]), bpe_tokenizer, name="m2")
    )
    table = lmeval.divergence(TEXTS, lm, other, batch_tokens=64)
    assert table.kl.abs().max() <= 1e-7 and table.kl_reverse.abs().max() <= 1e-7
    assert table.same_top1.all() and (table.delta_p == 0).all()
    summary = lmeval.divergence_summary(table).iloc[0]
    assert (summary.kl_mean, summary.kl_mean_ci_low, summary.kl_mean_ci_high) == (0.0, 0.0, 0.0)
    assert (summary.same_top1, summary.same_top1_ci_low, summary.same_top1_ci_high) == (1.0, 1.0, 1.0)
    assert (summary.ln_ppl_ratio_ci_low, summary.ln_ppl_ratio_ci_high) == (0.0, 0.0)
    assert (table.acceptance == 1).all() and (table.topk_overlap == 1).all() and (table.kl_topk == 0).all()


def test_mixed_tokenizers_are_refused_by_name(tmp_path, tiny_models, bpe_tokenizer):
    other_tokenizer = train_bpe(tmp_path, vocab_size=300)
    other = build_model("gpt2", len(other_tokenizer))
    with pytest.raises(TokenizerMismatchError, match=r"identical tokenizers.*bits_per_byte"):
        lmeval.divergence(["hello there"], (other, other_tokenizer), (tiny_models["gpt2"], bpe_tokenizer))
    assert issubclass(TokenizerMismatchError, lmeval.LmevalError)


def test_logits_of_different_widths_are_refused(tiny_models, bpe_tokenizer):
    wider = build_model("gpt2", len(bpe_tokenizer) + 16)
    with pytest.raises(ModelError, match="as wide as the baseline"):
        lmeval.divergence(["hello there"], (wider, bpe_tokenizer), (tiny_models["gpt2"], bpe_tokenizer))


def test_non_finite_logits_name_the_model(tiny_models, bpe_tokenizer):
    broken = copy.deepcopy(tiny_models["gpt2"])
    with torch.no_grad():
        broken.get_output_embeddings().weight[3] = float("nan")
    with pytest.raises(ModelError, match="model broken: non-finite logits at document 0"):
        lmeval.divergence(["hello there"], (broken, bpe_tokenizer), (tiny_models["gpt2"], bpe_tokenizer), name="broken")
    with pytest.raises(ModelError, match="model broken: non-finite"):
        lmeval.divergence(
            ["hello there"], (tiny_models["gpt2"], bpe_tokenizer), (broken, bpe_tokenizer), baseline_name="broken"
        )


@pytest.mark.slow
def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_models, bpe_tokenizer, monkeypatch):
    model, base = (finetuned(tiny_models["gpt2"]), bpe_tokenizer), (tiny_models["gpt2"], bpe_tokenizer)
    reference = lmeval.divergence(TEXTS, model, base, max_length=16, batch_tokens=4096)
    real, sizes = scorer.score_batch, []

    def tight(lm, windows, options, compiled=False, baseline=None):
        if len(windows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(len(windows))
        return real(lm, windows, options, compiled, baseline)

    monkeypatch.setattr(scorer, "score_batch", tight)
    retried = lmeval.divergence(TEXTS, model, base, max_length=16, batch_tokens=4096)
    assert sizes and max(sizes) <= 2
    pd.testing.assert_frame_equal(retried, reference, check_exact=False, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------
# The summary against numpy over the per-token table
# --------------------------------------------------------------------------------------


def test_summary_equals_numpy_over_the_token_table(tiny_models, bpe_tokenizer):
    texts = [f"{i}: {CORPUS[i % 6]} {CORPUS[(i * 5 + 1) % 6]}" for i in range(9)]
    table = lmeval.divergence(
        texts, (finetuned(tiny_models["gpt2"], 0.2), bpe_tokenizer), (tiny_models["gpt2"], bpe_tokenizer)
    )
    summary = lmeval.divergence_summary(table, bootstrap=300, seed=5).iloc[0]
    for key, value in numpy_summary(table, 300, 5).items():
        assert summary[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert summary.kl_mean_ci_low < summary.kl_mean < summary.kl_mean_ci_high
    assert summary.ppl_ratio == pytest.approx(np.exp(summary.ln_ppl_ratio))
