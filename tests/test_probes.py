"""The load-time probes (causality, padding invariance, mask support) and what they choose,
each checked against a float64 log-softmax of the model's own logits on each window alone."""

import dataclasses
import gc
import json
import weakref
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from conftest import CORPUS, build_model
from helpers import PROBE_TEXTS as TEXTS
from helpers import InferPadding, MaskCrash, RowMixing, with_body
from lmeval import ModelError
from lmeval.core.windows import Window
from lmeval.model import loading, probes
from lmeval.model.head import OutputHead
from lmeval.model.loading import prepare_model
from lmeval.model.probes import ProbePlan, Probes, probe_plan
from lmeval.model.scorer import pack_batches
from tiny_arch import build_tiny, oracle_nll, reinitialise


def max_error(table, model, tokenizer, texts, max_length, stride) -> float:
    """Largest |lmeval NLL - oracle NLL| over every token, in nats."""
    worst = 0.0
    for i, text in enumerate(texts):
        s = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        got = table.nll[table.doc_id == i].to_numpy(dtype=np.float64)
        want = oracle_nll(model, s, max_length, stride)
        assert len(got) == len(want)
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


@pytest.mark.parametrize(
    "toy, batching", [(InferPadding, "equal_length"), (MaskCrash, "equal_length_no_mask"), (RowMixing, "one_window")]
)
def test_padding_sensitive_models_are_exact_at_every_batch_size(toy, batching, bpe_tokenizer):
    model = with_body(toy.make(), bpe_tokenizer)
    lm = prepare_model(model, bpe_tokenizer, name="toy")
    assert lm.probes.batching == batching and lm.probes.causal
    for batch_tokens in (1, 40, 100_000):  # S < L: full windows, and shorter final ones
        table = lmeval.score_texts(TEXTS, lm, max_length=16, stride=5, batch_tokens=batch_tokens)
        assert table.attrs["batching"] == batching
        assert max_error(table, model, bpe_tokenizer, TEXTS, 16, 5) <= 1e-5


def test_padded_batches_would_be_wrong_for_the_padding_sensitive_toy(bpe_tokenizer):
    """The toy really depends on padding: forced into padded batches it is off by far more."""
    model = with_body(InferPadding.make(), bpe_tokenizer)
    lm = dataclasses.replace(prepare_model(model, bpe_tokenizer, name="toy"), probes=Probes(batching="padded"))
    table = lmeval.score_texts(TEXTS, lm, max_length=16, batch_tokens=100_000)
    assert max_error(table, model, bpe_tokenizer, TEXTS, 16, 16) > 1e-2


def bidirectional_bert(tokenizer):
    """BertLMHeadModel without is_decoder: every position attends to every other."""
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        is_decoder=False,
        pad_token_id=None,
    )
    return reinitialise(BertLMHeadModel(config)).eval()  # wide weights: the leak is not subtle


def test_bidirectional_model_is_refused_naming_probe_and_opt_in(bpe_tokenizer):
    model = bidirectional_bert(bpe_tokenizer)
    with pytest.raises(ModelError, match="causality probe") as caught:
        prepare_model(model, bpe_tokenizer, name="tiny-bert")
    message = str(caught.value)
    assert "allow_noncausal: true" in message and "model tiny-bert" in message and "is_decoder" in message
    with pytest.raises(ModelError, match="causality probe"):  # score_texts on a pair refuses it too
        lmeval.score_texts(["some text"], (model, bpe_tokenizer))
    lm = prepare_model(model, bpe_tokenizer, name="tiny-bert", allow_noncausal=True)
    table = lmeval.score_texts(TEXTS[:2], lm, max_length=16)
    assert table.attrs["causal"] is False and table.attrs["allow_noncausal"] is True
    assert lm.probes.causal_change > 1e-2


def test_causal_models_record_the_probes(tiny_models, bpe_tokenizer):
    table = lmeval.score_texts(TEXTS[:2], (tiny_models["llama"], bpe_tokenizer), max_length=16)
    assert {k: table.attrs[k] for k in ("causal", "allow_noncausal", "batching")} == {
        "causal": True,
        "allow_noncausal": False,
        "batching": "padded",
    }


def test_opt_in_is_a_config_key_recorded_in_run_json(tmp_path, bpe_tokenizer):
    folder = tmp_path / "bert"
    bidirectional_bert(bpe_tokenizer).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"models:\n  - {{name: bert, path: {folder}, allow_noncausal: true}}\n"
        "data: {path: docs.jsonl}\nscoring: {max_length: 16}\noutput: {dir: out}\n",
        encoding="utf-8",
    )
    lmeval.run(str(config), show_progress=False, return_tokens=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    protocol = record["protocol"]["models"]["bert"]
    assert protocol["causal"] is False and protocol["allow_noncausal"] is True and protocol["batching"] == "padded"
    assert record["config"]["models"][0]["allow_noncausal"] is True


def test_probes_run_once_per_loaded_model(monkeypatch, tiny_models, bpe_tokenizer):
    calls = []
    real = loading.probe_model
    monkeypatch.setattr(loading, "probe_model", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(loading, "_PROBED", weakref.WeakKeyDictionary())
    lm = prepare_model(tiny_models["gpt2"], bpe_tokenizer)
    for _ in range(3):
        lmeval.score_texts(TEXTS[:2], lm, max_length=16)
    assert len(calls) == 1


def test_a_pair_scored_again_is_not_probed_again(monkeypatch, bpe_tokenizer):
    calls = []
    real = loading.probe_model
    monkeypatch.setattr(loading, "probe_model", lambda *a: calls.append(1) or real(*a))
    model = build_model("gpt2", len(bpe_tokenizer))
    first = lmeval.score_texts(TEXTS[:2], (model, bpe_tokenizer), max_length=16)
    again = lmeval.score_texts(TEXTS[:2], (model, bpe_tokenizer), max_length=16)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, again)
    model.double()  # cast: what the probes found may no longer hold, so they run again
    lmeval.score_texts(TEXTS[:2], (model, bpe_tokenizer), max_length=16)
    assert len(calls) == 2


def test_the_probe_cache_keeps_no_model_alive(bpe_tokenizer):
    model = build_model("gpt2", len(bpe_tokenizer))
    prepare_model(model, bpe_tokenizer)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_equal_length_batches_never_mix_lengths():
    lengths = [5, 5, 3, 5, 3, 7, 3, 3]
    windows = [Window(0, tuple(range(n)), 0, tuple(range(n)), tuple(range(n))) for n in lengths]
    batches = pack_batches(windows, batch_tokens=10, equal_length=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every window once
    for batch in batches:
        assert len({lengths[i] for i in batch}) == 1
        assert len(batch) == 1 or len(batch) * lengths[batch[0]] <= 10
    assert any(len({lengths[i] for i in b}) > 1 for b in pack_batches(windows, batch_tokens=100))  # padded mixes


# Every post-head transform the issue names, set to a value that visibly changes the logits.
TRANSFORMS = {
    "recurrent_gemma": ({"logits_soft_cap": 0.7}, "softcap", 0.7),
    "xlstm": ({"output_logit_soft_cap": 0.7}, "softcap", 0.7),
    "falcon_h1": ({"lm_head_multiplier": 3.0}, "scale", None),  # x the model's own multipliers
    "hyperclovax": ({"logits_scaling": 3.0}, "scale", 3.0),  # multiplies
    "granite": ({"logits_scaling": 3.0}, "divisor", 3.0),  # divides
    "cohere": ({"logit_scale": 3.0}, "scale", 3.0),
    "llama4_text": ({}, "body_module", None),  # body at .model, not at base_model
}


@pytest.mark.parametrize("model_type", sorted(TRANSFORMS))
def test_post_head_transforms_take_the_fast_path_and_match(model_type, bpe_tokenizer):
    overrides, attribute, value = TRANSFORMS[model_type]
    model = build_tiny(model_type, len(bpe_tokenizer), overrides=overrides)
    lm = prepare_model(model, bpe_tokenizer, name=model_type)
    assert lm.head.fast
    if attribute == "body_module":
        assert lm.head.body_module is model.model and model.base_model is not model.model
    else:
        got = getattr(lm.head, attribute)
        assert got is not None and (value is None or got == pytest.approx(value))
    table = lmeval.score_texts(TEXTS, lm, max_length=16, stride=5, batch_tokens=40)
    # float32 rounding of scaled logits: 1.17e-5 nats measured for cohere, falcon_h1 and
    # hyperclovax under transformers 5.25 (1e-5 held under the previous release); a missed
    # transform or a padding leak is off by 1e-2 or more.
    assert max_error(table, model, bpe_tokenizer, TEXTS, 16, 5) <= 3e-5


def config(**fields):
    return SimpleNamespace(**{"max_position_embeddings": 32768, **fields})


@pytest.mark.parametrize(
    "fields, groups, floor, reason",
    [
        ({}, (), "padded", ""),
        ({"sliding_window": 8, "chunk_size": 8}, (), "padded", ""),  # the short rows cross it
        ({"sliding_window": 4096}, ((4112, 4105, 4098),), "padded", ""),  # probed beyond it
        ({"sliding_window": [512, 4096, 512]}, ((4112, 4105, 4098),), "padded", ""),  # per layer: the longest
        ({"sliding_window": 32768}, (), "padded", ""),  # no window reaches it
        ({"attention_chunk_size": 8192}, (), "equal_length", "attention_chunk_size=8192"),  # too long to probe
        ({"index_topk": 2048}, ((2064, 2057, 2050),), "equal_length", "index_topk=2048"),  # a selection
        # DeepSeek-V4 ranks keys compressed 4 to 1; MiniMax-M3 keeps blocks of 128 keys
        (
            {"index_topk": 512, "compress_rates": {"compressed_sparse_attention": 4}},
            ((2064, 2057, 2050),),
            "equal_length",
            "index_topk=2048",
        ),
        (
            {"index_topk_blocks": 15, "index_local_blocks": 1, "index_block_size": 128},
            ((2064, 2057, 2050),),
            "equal_length",
            "index_topk_blocks=2048",
        ),
        (
            {"index_topk": 4000, "max_position_embeddings": 4010},
            ((4010, 4009, 4002),),
            "equal_length",
            "index_topk=4000",
        ),  # rows within the context
    ],
)
def test_the_padding_probe_plan_crosses_every_declared_length(fields, groups, floor, reason):
    plan = probe_plan(config(**fields))
    assert plan.groups == (probes._LENGTHS, *groups) and plan.floor == floor and plan.reason == reason


@pytest.mark.parametrize("topk, context", [(24, 64), (260, 512)])  # 260: rows beyond _CHUNK, compared chunk by chunk
def test_the_probe_beyond_index_topk_sees_what_short_rows_miss(topk, context, bpe_tokenizer):
    """DeepSeek-V3.2 with index_topk = 24: rows padded beyond 24 tokens move, the short rows
    (19 tokens at most) do not; the config alone already asks for equal-length batches
    (`test_sweep` checks the verdict and the scores)."""
    overrides = {"index_topk": topk, "max_position_embeddings": context}
    model = build_tiny("deepseek_v32", len(bpe_tokenizer), overrides=overrides)
    plan = probe_plan(model.config)
    assert plan.floor == "equal_length" and plan.groups[-1] == (topk + 16, topk + 9, topk + 2)
    head = OutputHead.for_model(model)
    with torch.inference_mode():
        assert probes._batching(model, head, dataclasses.replace(plan, floor="padded")) == "equal_length"
        assert probes._batching(model, head, ProbePlan((probes._LENGTHS,))) == "padded"


def test_a_sliding_window_is_probed_beyond_and_stays_padded(bpe_tokenizer):
    """Probing beyond a declared span costs a model that handles it nothing: Mistral with a
    24-token window keeps padded batches and is exact in 40-token windows."""
    model = build_tiny("mistral", len(bpe_tokenizer), overrides={"sliding_window": 24})
    assert probe_plan(model.config).groups[-1] == (40, 33, 26)
    lm = prepare_model(model, bpe_tokenizer, name="mistral")
    assert lm.probes.batching == "padded"
    texts = [" ".join(CORPUS[:3]), CORPUS[5], "short"]
    for batch_tokens in (40, 100, 100_000):
        table = lmeval.score_texts(texts, lm, max_length=40, stride=13, batch_tokens=batch_tokens)
        assert max_error(table, model, bpe_tokenizer, texts, 40, 13) <= 1e-5
