"""The scorer against a float64 log-softmax of the model's own full logits."""

import numpy as np
import pytest
import torch

import lmeval
from conftest import CORPUS, build_model, train_bpe
from lmeval import DataError, ModelError
from lmeval.model.head import OutputHead
from lmeval.model.loading import prepare_model

TEXTS = CORPUS[:4] + ["short", "é 猫 😀 mixed scripts and emoji"]


def oracle_nll(model, ids: list[int]) -> np.ndarray:
    """-log q(s[j+1] | s[:j+1]) for every j, from one full forward in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    log_q = torch.log_softmax(logits, dim=-1)
    return -log_q[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).numpy()


def doc_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def oracle_mean_neg_logq(model, ids: list[int]) -> np.ndarray:
    """mean_v -log q_v at every scored position, from one full forward in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return -torch.log_softmax(logits, dim=-1)[:-1].mean(dim=1).numpy()


def biased_head(model, scale: float) -> torch.nn.Module:
    """``model`` with an lm_head that has a bias and, like Cohere's, a logit multiplier."""
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.normal_(0.0, 0.5)
    model.set_output_embeddings(new)
    model.config.tie_word_embeddings = False
    model.config.logit_scale = scale
    inner = model.forward

    def forward(*args, **kwargs):  # the multiplier, applied after the head as Cohere does
        out = inner(*args, **kwargs)
        out.logits = out.logits * scale
        return out

    model.forward = forward
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "biased-scaled", "gemma2"])
def test_mean_neg_logq_from_the_heads_row_sums_matches_float64(arch, tiny_models, bpe_tokenizer):
    """The eager reductions take sum_v z_v from the head's column sums (no pass over the
    logits) where the head is linear; soft-capped Gemma-2 sums the logits."""
    model = biased_head(build_model("gpt2", len(bpe_tokenizer)), 1.7) if arch == "biased-scaled" else tiny_models[arch]
    lm = prepare_model(model, bpe_tokenizer, name=arch)
    assert lm.head.fast
    states = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        sums = lm.head.logit_sums(states)
        assert (sums is None) == (arch == "gemma2")
        if sums is not None:
            np.testing.assert_allclose(sums, lm.head.project(states).double().sum(1), rtol=1e-5)
    table = lmeval.score_texts(TEXTS, lm, batch_tokens=256, compile=False)
    for i, text in enumerate(TEXTS):
        ids = [bpe_tokenizer.eos_token_id] + doc_ids(bpe_tokenizer, text)
        got = table[table.doc_id == i].mean_neg_logq.to_numpy()
        np.testing.assert_allclose(got, oracle_mean_neg_logq(model, ids), atol=2e-5, rtol=0)


def test_row_sums_follow_weights_that_training_moved(bpe_tokenizer):
    model = build_model("gpt2", len(bpe_tokenizer))
    lm = prepare_model(model, bpe_tokenizer)
    lmeval.score_texts(TEXTS[:1], lm, compile=False)  # caches the column sums
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5).add_(0.3)  # an optimizer step, in place
    table = lmeval.score_texts(TEXTS[:1], lm, compile=False)
    ids = [bpe_tokenizer.eos_token_id] + doc_ids(bpe_tokenizer, TEXTS[0])
    np.testing.assert_allclose(table.mean_neg_logq, oracle_mean_neg_logq(model, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma2"])
def test_nll_matches_float64_full_logits(arch, tiny_models, bpe_tokenizer):
    model = tiny_models[arch]
    table = lmeval.score_texts(TEXTS, (model, bpe_tokenizer), batch_tokens=256)
    bos = bpe_tokenizer.eos_token_id
    for i, text in enumerate(TEXTS):
        ids = doc_ids(bpe_tokenizer, text)
        rows = table[table.doc_id == i]
        assert rows.position.tolist() == list(range(len(ids)))
        assert rows.token_id.tolist() == ids
        np.testing.assert_allclose(rows.nll.to_numpy(), oracle_nll(model, [bos] + ids), atol=1e-5, rtol=0)
        assert rows.context_len.tolist() == list(range(1, len(ids) + 1))
    np.testing.assert_allclose(table.surprisal_bits, table.nll / np.log(2), rtol=1e-12)


def test_gemma2_softcap_is_handled_on_the_fast_path(tiny_models):
    head = OutputHead.for_model(tiny_models["gemma2"])
    assert head.fast and head.softcap == 0.5
    for arch in ("gpt2", "llama", "gpt_neox"):
        assert OutputHead.for_model(tiny_models[arch]).fast


class ScaledGPT2:
    """A model whose logits are post-processed in a way lmeval does not know about."""

    @staticmethod
    def build(vocab):
        from transformers import GPT2LMHeadModel

        class Scaled(GPT2LMHeadModel):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 3.0 + 1.0
                return out

        base = build_model("gpt2", vocab)
        model = Scaled(base.config)
        model.load_state_dict(base.state_dict())
        return model.eval()


def test_unknown_post_processing_falls_back_to_plain_logits(bpe_tokenizer):
    model = ScaledGPT2.build(len(bpe_tokenizer))
    lm = prepare_model(model, bpe_tokenizer, name="scaled")
    assert not lm.head.fast
    table = lmeval.score_texts(TEXTS[:3], lm)
    fast_twin = build_model("gpt2", len(bpe_tokenizer))
    fast_table = lmeval.score_texts(TEXTS[:3], (fast_twin, bpe_tokenizer))
    assert not np.allclose(table.nll, fast_table.nll)  # the scaling matters...
    for i, text in enumerate(TEXTS[:3]):  # ...and the fallback reproduces it exactly
        ids = doc_ids(bpe_tokenizer, text)
        expected = oracle_nll(model, [bpe_tokenizer.eos_token_id] + ids)
        np.testing.assert_allclose(table[table.doc_id == i].nll, expected, atol=1e-5)


def nll_sums(table, n):
    return table.groupby("doc_id").nll.apply(lambda s: s.astype(np.float64).sum()).reindex(range(n)).to_numpy()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_invariant_to_batch_size_order_and_padding(arch, tiny_models, bpe_tokenizer):
    model = tiny_models[arch]
    texts = TEXTS + [" ".join(CORPUS)]  # one document much longer than the others
    pair = (model, bpe_tokenizer)
    reference = nll_sums(lmeval.score_texts(texts, pair, max_length=32, batch_tokens=32), len(texts))
    for batch_tokens in (1, 100, 100_000):
        got = nll_sums(lmeval.score_texts(texts, pair, max_length=32, batch_tokens=batch_tokens), len(texts))
        np.testing.assert_allclose(got, reference, rtol=1e-6)
    reversed_sums = nll_sums(lmeval.score_texts(texts[::-1], pair, max_length=32), len(texts))[::-1]
    np.testing.assert_allclose(reversed_sums, reference, rtol=1e-6)
    alone = nll_sums(lmeval.score_texts([texts[4]], pair, max_length=32), 1)
    np.testing.assert_allclose(alone, reference[4:5], rtol=1e-6)


def expected_context(n_targets: int, max_length: int, stride: int) -> list[int]:
    """Context length of each target under DESIGN.md's rule, written independently."""
    out = []
    for j in range(1, n_targets + 1):  # target j is s[j]; spans end at multiples of S
        end = min(((j - 1) // stride + 1) * stride, n_targets)
        out.append(j - max(0, end - max_length))
    return out


@pytest.mark.parametrize("max_length, stride", [(16, 16), (16, 5), (8, 1)])
def test_long_document_windows(max_length, stride, tiny_models, bpe_tokenizer):
    model = tiny_models["llama"]
    text = " ".join(CORPUS[:3])
    ids = doc_ids(bpe_tokenizer, text)
    s = [bpe_tokenizer.eos_token_id] + ids
    assert len(ids) > 3 * max_length
    table = lmeval.score_texts([text], (model, bpe_tokenizer), max_length=max_length, stride=stride)
    assert table.position.tolist() == list(range(len(ids)))
    assert table.context_len.tolist() == expected_context(len(ids), max_length, stride)
    # Each nll is the model's prediction from exactly `context_len` preceding ids.
    for pos, ctx, nll in zip(table.position, table.context_len, table.nll):
        j = pos + 1
        assert nll == pytest.approx(oracle_nll(model, s[j - ctx : j + 1])[-1], abs=1e-5)


def test_bos_policies(gpt2_pair, bpe_tokenizer):
    model, tokenizer = gpt2_pair
    text = CORPUS[0]
    ids = doc_ids(tokenizer, text)
    auto = lmeval.score_texts([text], gpt2_pair, bos="auto")
    explicit = lmeval.score_texts([text], gpt2_pair, bos=5)
    none = lmeval.score_texts([text], gpt2_pair, bos="none")
    np.testing.assert_allclose(auto.nll, oracle_nll(model, [tokenizer.eos_token_id] + ids), atol=1e-5)
    np.testing.assert_allclose(explicit.nll, oracle_nll(model, [5] + ids), atol=1e-5)
    # With `none` the first token only conditions: it is absent, never a zero loss.
    assert none.position.tolist() == list(range(1, len(ids)))
    np.testing.assert_allclose(none.nll, oracle_nll(model, ids), atol=1e-5)


def test_no_double_bos_when_tokenizer_adds_one(tmp_path, tiny_models):
    from tokenizers import processors

    tokenizer = train_bpe(tmp_path, bos="<|endoftext|>", eos="<|endoftext|>")
    bos_id = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    text = CORPUS[1]
    assert tokenizer(text)["input_ids"][0] == bos_id  # the tokenizer adds BOS by default
    model = tiny_models["llama"]
    table = lmeval.score_texts([text], (model, tokenizer))
    ids = doc_ids(tokenizer, text)
    assert table.token_id.tolist() == ids and ids[0] != bos_id
    np.testing.assert_allclose(table.nll, oracle_nll(model, [bos_id] + ids), atol=1e-5)


def test_char_offsets_slice_back_to_tokens(gpt2_pair):
    text = "Naïve café — 猫 😀 end"
    table = lmeval.score_texts([text], gpt2_pair)
    spans = list(zip(table.char_start, table.char_end))
    assert spans == sorted(spans) and all(0 <= a <= b <= len(text) for a, b in spans)
    # Byte-level BPE splits a multi-byte character over tokens that share its span.
    distinct = [span for i, span in enumerate(spans) if i == 0 or span != spans[i - 1]]
    assert "".join(text[a:b] for a, b in distinct).replace(" ", "") == text.replace(" ", "")


def test_tokenizing_in_batches_of_characters_gives_each_documents_own_tokens(gpt2_pair, monkeypatch):
    from lmeval.engine.data import Document
    from lmeval.producers import text as text_module

    _, tokenizer = gpt2_pair
    texts = [CORPUS[i % len(CORPUS)] * (1 + i % 3) for i in range(12)] + ["", "Naïve café 😀"]
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
    monkeypatch.setattr(text_module, "TOKENIZE_CHARS", 50)  # about a document a call, some alone above it
    batched = text_module.tokenize_documents(docs, tokenizer)
    for doc, got in zip(docs, batched, strict=True):
        alone = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)  # the oracle: one text
        assert got.doc_id == doc.doc_id and got.token_ids.tolist() == alone["input_ids"]
        assert [tuple(o) for o in got.offsets.tolist()] == [tuple(o) for o in alone["offset_mapping"]]


def test_empty_document_is_counted_not_crashed(gpt2_pair):
    table = lmeval.score_texts(["", CORPUS[0]], gpt2_pair)
    assert set(table.doc_id) == {1}
    assert table.attrs["n_documents"] == 2 and table.attrs["n_empty"] == 1


def test_loads_from_local_folder(saved_gpt2, gpt2_pair):
    from_disk = lmeval.score_texts(TEXTS[:2], str(saved_gpt2))
    in_memory = lmeval.score_texts(TEXTS[:2], gpt2_pair)
    np.testing.assert_allclose(from_disk.nll, in_memory.nll, atol=1e-5)  # sdpa vs eager
    assert from_disk.model.iloc[0] == "tiny-gpt2"


@pytest.mark.parametrize(
    "texts, kwargs, error, words",
    [
        ([], {}, DataError, "at least one"),
        (["ok", 3], {}, DataError, "texts[1]"),
        ("a string", {}, DataError, "list of strings"),
        (["ok"], {"stride": 0}, ModelError, "scoring.stride"),
        (["ok"], {"max_length": 16, "stride": 17}, ModelError, "scoring.stride"),
        (["ok"], {"max_length": 65}, ModelError, "64 positions"),
        (["ok"], {"batch_tokens": 0}, DataError, "batch_tokens"),
        (["ok"], {"bos": "first"}, ModelError, "scoring.bos"),
    ],
)
def test_bad_input_is_named(texts, kwargs, error, words, gpt2_pair):
    with pytest.raises(error) as info:
        lmeval.score_texts(texts, gpt2_pair, **kwargs)
    assert words in str(info.value)


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        lmeval.score_texts(["ok"], str(tmp_path / "no-such-model"))


def test_tokenizer_without_bos_or_eos(tmp_path, tiny_models):
    tokenizer = train_bpe(tmp_path, bos=None, eos=None)
    model = build_model("gpt2", len(tokenizer))
    with pytest.raises(ModelError, match="neither"):
        lmeval.score_texts(["ok"], (model, tokenizer))
    assert len(lmeval.score_texts(["ok then"], (model, tokenizer), bos="none")) > 0


def test_out_of_memory_halves_the_batch_and_loses_nothing(gpt2_pair, monkeypatch, caplog):
    import lmeval.model.scorer as scoring

    texts = TEXTS + [" ".join(CORPUS)]
    reference = lmeval.score_texts(texts, gpt2_pair, max_length=16, batch_tokens=4096)
    real = scoring.score_batch
    failed, scored = [], []

    def tight_memory(lm, windows, options, compiled=False):
        if len(windows) > 3:
            failed.append(len(windows))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        scored.append(len(windows))
        return real(lm, windows, options, compiled)

    monkeypatch.setattr(scoring, "score_batch", tight_memory)
    with caplog.at_level("WARNING"):
        retried = lmeval.score_texts(texts, gpt2_pair, max_length=16, batch_tokens=4096)
    assert failed and max(scored) <= 3  # big batches failed, and were retried in smaller pieces
    assert "out of memory" in caplog.text
    pd_equal = retried[["doc_id", "position", "token_id"]].equals(reference[["doc_id", "position", "token_id"]])
    assert pd_equal
    np.testing.assert_allclose(retried.nll, reference.nll, rtol=1e-6)

    def no_memory(lm, windows, options, compiled=False):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(scoring, "score_batch", no_memory)
    with pytest.raises(ModelError, match="single window"):
        lmeval.score_texts(texts[:1], gpt2_pair, max_length=16)


def test_device_map_loading_gives_the_same_numbers(saved_gpt2):
    """accelerate's big-model loading (here onto the CPU) must not change any number."""
    from lmeval.model.loading import load_model
    from lmeval.model.spec import ModelSpec

    plain = lmeval.score_texts(TEXTS[:3], str(saved_gpt2))
    spec = ModelSpec(path=str(saved_gpt2), device_map="auto", max_memory={"cpu": "2GiB"})
    mapped = lmeval.score_texts(TEXTS[:3], load_model(spec))
    np.testing.assert_allclose(mapped.nll, plain.nll, atol=1e-6)
