"""Corrected word surprisal (Pimentel & Meister 2024) and the EOS position.

Oracles: brute-force enumeration of every string of a toy LM (word probabilities as
ratios of string-prefix probabilities), and float64 log-softmaxes of a tiny GPT-2's and a
SentencePiece-style model's full logits, with the word-start set taken from the tokenizer's
own decoder (not from lmeval's piece rules)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import toy_lm
from conftest import build_model
from helpers import train_metaspace
from lmeval.core.continuation import range_windows
from lmeval.core.windows import make_windows
from lmeval.core.words import log_mass, word_start_mask
from lmeval.errors import DataError
from lmeval.model import scorer
from lmeval.model.loading import prepare_model
from lmeval.view.surprisal import aggregate_words, surprisal_table

TOY_TEXTS = ["ab a", "a\nb", " ba b", "\n a", "b", "ab ba", "a b a"]


# --------------------------------------------------------------------------------------
# The toy: enumeration
# --------------------------------------------------------------------------------------


def enumerated_word_probs(text: str, strings: dict[str, float], text_end: str) -> list[float]:
    """p(word k | the text before it) as a ratio of sums over every producible string.

    Word k (with the whitespace before it) covers ``text[a_k:e_k]``. Its numerator is the
    probability of strings that start with ``text[:e_k]`` followed by whitespace (or, under
    eos, by the end); its denominator the same event for ``text[:a_k]`` (the previous words
    are complete), or for the first word that of strings that start the way the text does
    (with whitespace, or without: the empty string too).
    """
    ends = [m.end() for m in re.finditer(r"\S+", text)]

    def complete(prefix: str, allow_end: bool) -> float:
        return sum(
            p
            for s, p in strings.items()
            if s.startswith(prefix)
            and ((len(s) > len(prefix) and s[len(prefix)].isspace()) or (allow_end and len(s) == len(prefix)))
        )

    starts_space = text[0].isspace()
    first = sum(p for s, p in strings.items() if (s[:1].isspace() if starts_space else not s[:1].isspace()))
    out, before = [], first
    for end in ends:
        numerator = complete(text[:end], text_end == "eos")
        out.append(numerator / before)
        before = numerator
    return out


@pytest.fixture(scope="module")
def toy():
    return prepare_model(toy_lm.ToyLM(), toy_lm.build_tokenizer(), name="toy")


@pytest.fixture(scope="module")
def toy_strings():
    strings = toy_lm.all_texts()
    assert math.isclose(sum(strings.values()), 1.0, rel_tol=1e-12)
    return strings


def float64_score_batch(lm, windows, options, compiled=False):
    """The scorer's statistics from the toy's float64 logits, injected at the scoring
    boundary (the windows, the end position and every step after it are lmeval's own)."""
    rows = [
        (w.input_ids[: i + 1], t) for w in windows for i, t in zip(range(w.first_scored, len(w.input_ids)), w.targets)
    ]
    z = torch.tensor(np.array([toy_lm.toy_logits(prefix) for prefix, _ in rows]), dtype=torch.float64)  # (N, V)
    logq = torch.log_softmax(z, dim=1)
    q = logq.exp()
    y = torch.tensor([t for _, t in rows])
    nll = -logq[torch.arange(len(y)), y]
    rank = (logq > logq[torch.arange(len(y)), y][:, None]).sum(1) + 1
    empty = z.new_zeros((len(y), 0))
    out = {
        "nll": nll,
        "entropy": -(q * torch.where(q > 0, logq, 0)).sum(1),
        "max_prob": q.max(1).values,
        "is_top1": rank == 1,
        "rank": rank,
        "sum_q2": (q * q).sum(1),
        "mean_neg_logq": -logq.mean(1),
        "nll_t": empty,
        "max_prob_t": empty,
        "topk_ids": empty.long(),
        "topk_probs": empty,
        "var_logq": empty,
        "log_mass": log_mass(z, torch.from_numpy(options.mass_masks.T.astype(np.float64))),
    }
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("text_end", ["eos", "word"])
def test_toy_word_probabilities_equal_enumeration(toy, toy_strings, monkeypatch, text_end):
    monkeypatch.setattr(scorer, "score_batch", float64_score_batch)
    words = surprisal_table(TOY_TEXTS, toy, words=True, text_end=text_end)
    for doc_id, text in enumerate(TOY_TEXTS):
        expected = enumerated_word_probs(text, toy_strings, text_end)
        got = words[words["doc_id"] == doc_id]
        assert got["word"].tolist() == text.split()
        np.testing.assert_allclose(got["prob"].to_numpy(), expected, rtol=1e-9, atol=0)
        # The plain token sum is a different number: it is what the correction fixes.
        plain = np.exp2(-got["surprisal_bits_token_sum"].to_numpy())
        assert not np.allclose(plain, expected, rtol=1e-3)
    assert words.attrs["word_correction"] == "bow" and words.attrs["text_end"] == text_end


@pytest.mark.parametrize("text_end", ["eos", "word"])
def test_toy_through_the_real_scorer(toy, toy_strings, text_end):
    """The toy as a causal LM through the real scorer (float32 statistics)."""
    words = surprisal_table(TOY_TEXTS, toy, words=True, text_end=text_end)
    expected = np.concatenate([enumerated_word_probs(t, toy_strings, text_end) for t in TOY_TEXTS])
    np.testing.assert_allclose(words["prob"].to_numpy(), expected, rtol=2e-5)


def test_toy_end_window_when_the_text_fills_the_context(toy, toy_strings):
    """max_length = the text's ids: the EOS position needs a window of its own (losing the
    BOS), so the last word's boundary comes from that window; the toy's logits depend on the
    number of tokens seen, so this is checked against the model on exactly that window."""
    text = "ab a"  # BOS a b Ġa: the 3 targets fill max_length = 3, so the end window is [a b Ġa]
    words = surprisal_table([text], toy, words=True, max_length=3)
    ids = [0, 1, 2, 5]
    after = np.exp(toy_lm.log_softmax(toy_lm.toy_logits(ids[1:]))[[0, 3, 4, 5, 6]]).sum()
    assert words["boundary_after_bits"].iloc[-1] == pytest.approx(-math.log2(after), rel=1e-5)


# --------------------------------------------------------------------------------------
# Real tiny models: the identity, word by word, against full float64 logits
# --------------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps on.",
    "  Naïve café owners like it 😀.\n\nCross-entropy equals entropy.",
    "word",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, gpt2_pair):
    out = {"bytelevel": prepare_model(*gpt2_pair, name="tiny-gpt2")}
    tok = train_metaspace(tmp_path_factory.mktemp("sp"), split=True)
    out["metaspace"] = prepare_model(build_model("llama", len(tok)), tok, name="sp")
    return out


def decoder_word_starts(tokenizer, width: int) -> np.ndarray:
    """B from the tokenizer's own decoder: pieces that decode to text starting with
    whitespace after a letter."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    mask = np.zeros(width, dtype=bool)
    for i, piece in enumerate(pieces):
        if i not in tokenizer.all_special_ids:
            mask[i] = tokenizer.convert_tokens_to_string(["a", piece])[1:2].isspace()
    return mask


def marker_word_starts(tokenizer, width: int) -> np.ndarray:
    """B under word_boundary="marker", by the authors' own rule (wordsprobability's
    ``_initialise_bow_mask``): the ids whose vocabulary entry starts with the marker."""
    marker = "Ġ" if any(piece.startswith("Ġ") for piece in tokenizer.get_vocab()) else "▁"
    mask = np.zeros(width, dtype=bool)
    for piece, i in tokenizer.get_vocab().items():
        mask[i] = piece[0] == marker and i not in tokenizer.all_special_ids
    return mask


def float64_log_probs(lm, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()  # (T, V)
    return torch.log_softmax(logits, dim=-1).numpy()


def logsum(logq: np.ndarray, mask: np.ndarray) -> float:
    return float(np.logaddexp.reduce(logq[mask]))


@pytest.mark.parametrize("word_boundary", ["whitespace", "marker"])
@pytest.mark.parametrize("text_end", ["eos", "word"])
@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_words_against_float64_logits(models, style, text_end, word_boundary):
    lm = models[style]
    tok = lm.tokenizer
    starts = {"whitespace": decoder_word_starts, "marker": marker_word_starts}[word_boundary]
    b = starts(tok, lm.vocab_size)
    union = b.copy()
    if text_end == "eos":
        union[tok.eos_token_id] = True
    options = dict(text_end=text_end, word_boundary=word_boundary)
    words = surprisal_table(TEXTS, lm, words=True, **options)
    tokens = surprisal_table(TEXTS, lm, **options)
    assert words.attrs["word_boundary"] == tokens.attrs["word_boundary"] == word_boundary
    bos = tok.bos_token_id
    for doc_id, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        logq = float64_log_probs(lm, [bos] + ids)  # row k predicts ids[k]; the last row is the EOS position
        token_logp = logq[np.arange(len(ids)), ids]
        boundary = np.array([logsum(row, union) for row in logq])  # before token k; [-1]: after the last
        first = logsum(logq[0], b if b[ids[0]] else ~b)
        # The identity: the corrected word log-probs telescope.
        got = words[words["doc_id"] == doc_id]
        total = -got["surprisal_bits"].sum() * math.log(2)
        assert total == pytest.approx(token_logp.sum() + boundary[-1] - first, rel=1e-5)
        # Word by word, from the token table's positions.
        rows = tokens[tokens["doc_id"] == doc_id]
        for word in got.itertuples():
            span = rows[_word_of(rows, text) == word.word_index]["position"].to_numpy()
            i, j = span.min(), span.max()
            start = first if i == 0 else boundary[i]
            expected = token_logp[i : j + 1].sum() + boundary[j + 1] - start
            assert -word.surprisal_bits * math.log(2) == pytest.approx(expected, rel=1e-5, abs=1e-5), (
                doc_id,
                word.word,
                i,
                j,
            )
            assert word.surprisal_bits == pytest.approx(
                word.surprisal_bits_token_sum + word.boundary_after_bits - word.boundary_before_bits
            )


def _word_of(rows, text):
    from lmeval.view.surprisal import assign_words

    return assign_words(text, rows["char_start"].to_numpy(), rows["char_end"].to_numpy())[0]


def test_word_start_rule_matches_the_decoder(models):
    for lm in models.values():
        pieces = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
        mask, marker = word_start_mask(pieces, lm.tokenizer.all_special_ids, lm.vocab_size)
        np.testing.assert_array_equal(mask, decoder_word_starts(lm.tokenizer, lm.vocab_size))
        assert marker in ("Ġ", "▁") and mask.sum() > 10
        # The authors' B is the marked pieces alone: a strict subset, without the newline pieces.
        marked, _ = word_start_mask(pieces, lm.tokenizer.all_special_ids, lm.vocab_size, "marker")
        np.testing.assert_array_equal(marked, marker_word_starts(lm.tokenizer, lm.vocab_size))
        assert (marked <= mask).all() and marked.sum() < mask.sum()
        newline = lm.tokenizer("a\nb", add_special_tokens=False)["input_ids"]
        assert any(mask[i] and not marked[i] for i in newline)


def test_no_correction_restores_the_sum_and_end_of_word_markers_need_none(models, tmp_path):
    lm = models["bytelevel"]
    none = surprisal_table(TEXTS, lm, words=True, word_correction="none")
    bow = surprisal_table(TEXTS, lm, words=True)
    np.testing.assert_allclose(none["surprisal_bits"], bow["surprisal_bits_token_sum"], rtol=1e-6)
    assert (none["boundary_before_bits"] == 0).all() and none.attrs["word_correction"] == "none"
    # An end-of-word-marker BPE ('the</w>'): no piece begins with whitespace.
    tok = _end_of_word_tokenizer(tmp_path)
    marked = prepare_model(build_model("gpt2", len(tok)), tok, name="eow")
    table = surprisal_table(["the dog sleeps"], marked, words=True)
    assert table.attrs["word_correction"] == "none" and "no word-start marker" in table.attrs["word_correction_note"]
    np.testing.assert_allclose(table["surprisal_bits"], table["surprisal_bits_token_sum"])


def _end_of_word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    path = tmp_path / "c.txt"
    path.write_text("\n".join(CORPUS * 5), encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.train(
        [str(path)], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], end_of_word_suffix="</w>")
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


# --------------------------------------------------------------------------------------
# Pieces: the mass reduction, the end window, options
# --------------------------------------------------------------------------------------


def test_log_mass_against_float64_and_underflow():
    torch.manual_seed(0)
    z = torch.randn(6, 50) * 4
    z[0, 10:] = -300.0  # the masked ids lie far below the row's maximum: the exact path
    masks = torch.zeros(50, 3)
    masks[10:30, 0] = 1
    masks[40, 1] = 1
    masks[:10, 2] = 1
    got = log_mass(z, masks)
    logq = torch.log_softmax(z.double(), dim=1)
    for k in range(3):
        expected = torch.logsumexp(logq.masked_fill(masks[:, k] == 0, -torch.inf), dim=1)
        torch.testing.assert_close(got[:, k].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()
    assert torch.isneginf(log_mass(z, torch.zeros(50, 1))).all()


@pytest.mark.parametrize("n, length, stride", [(0, 4, 4), (3, 4, 4), (4, 4, 4), (9, 4, 4), (9, 5, 2), (7, 3, 1)])
def test_end_windows_leave_other_windows_alone(n, length, stride):
    token_ids = list(range(10, 10 + n))
    plain = make_windows(0, token_ids, (1,), length, stride)
    ends = range_windows(0, token_ids, (1,), length, stride, end_id=99)
    scored = [(p, t) for w in ends for p, t in zip(w.positions, w.targets)]
    assert scored == [(p, t) for w in plain for p, t in zip(w.positions, w.targets)] + [(n, 99)]
    s = [1] + token_ids
    for w in ends:  # every output sees the same context as under make_windows, or more
        assert len(w.input_ids) <= length
        last = w.input_ids[-1]
        assert last == s[w.positions[-1]]
    assert ends[-1].input_ids == tuple(s[max(0, len(s) - length) :])


def test_bad_word_options(models):
    with pytest.raises(DataError, match="word_correction"):
        surprisal_table(["a"], models["bytelevel"], words=True, word_correction="yes")
    with pytest.raises(DataError, match="text_end"):
        surprisal_table(["a"], models["bytelevel"], words=True, text_end="sentence")
    with pytest.raises(DataError, match="needs the columns"):
        aggregate_words(surprisal_table(["a b"], models["bytelevel"], word_correction="none"), ["a b"], "bow")


# --------------------------------------------------------------------------------------
# word_boundary="marker" against the authors' package
# --------------------------------------------------------------------------------------

WP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning was the word, and the word was with the model.",
    "Perplexity is the exponential of the average negative log-likelihood.",
    "word",
]


def eos_heavy(model, tok):
    """A copy of the tiny GPT-2 whose EOS is likely after the BOS (its output row set along the
    hidden state there), so that the package's double count of EOS shows."""
    import copy

    heavy = copy.deepcopy(model)
    with torch.no_grad():
        hidden = heavy.transformer(torch.tensor([[tok.bos_token_id]])).last_hidden_state[0, 0]  # (H,)
        top = (heavy.lm_head.weight @ hidden).max()
        heavy.lm_head.weight[tok.eos_token_id] = hidden * (top + 1.0) / hidden.dot(hidden)
    return heavy


@pytest.mark.parametrize("eos_likely", [False, True], ids=["fixture", "eos-heavy"])
def test_marker_equals_wordsprobability(gpt2_pair, monkeypatch, eos_likely):
    """wordsprobability (Pimentel & Meister's package, the bench extra) on a tiny GPT-2: every
    word but a text's first equals lmeval's word_boundary="marker" within 1e-3 bits. The first
    word differs by exactly the package's double count of EOS: its ``bos_fix`` sums the
    'mid', 'punct' and 'eos' masks, and 'mid' (every id not a word start nor punctuation)
    already holds EOS, so its first-word term is log(q(not B) + q(EOS)) where the
    probability that the text starts without a space is log q(not B). On the fixture model
    q(EOS | BOS) is small and the two agree within 1e-3 bits on every word; on a model that
    expects EOS after the BOS the first word is more surprising under the package."""
    pytest.importorskip("wordsprobability")
    from wordsprobability import main as wp_main
    from wordsprobability.models.bow_lm import GPT2BaseModel

    model, tok = gpt2_pair
    model = eos_heavy(model, tok) if eos_likely else model

    class TinyGpt2(GPT2BaseModel):
        model_name = "tiny-gpt2"

        def _initialise_model(self):
            return model, tok

    reference = TinyGpt2()
    assert reference.vocab_masks["mid"][tok.eos_token_id] == 1  # the double count, in the package's masks
    monkeypatch.setattr(wp_main, "get_model", lambda name: reference)
    theirs = wp_main._get_surprisal_per_word(WP_TEXTS, "gpt2-small")  # nats, per (text_id, word_id)
    lm = prepare_model(model, tok, name="tiny-gpt2")
    ours = surprisal_table(WP_TEXTS, lm, words=True, word_boundary="marker")
    b = marker_word_starts(tok, lm.vocab_size)
    logq = float64_log_probs(lm, [tok.bos_token_id])[0]  # after the BOS
    not_b = logsum(logq, ~b)
    double_eos = (np.logaddexp(not_b, logq[tok.eos_token_id]) - not_b) / math.log(2)  # bits
    for text_id, text in enumerate(WP_TEXTS):
        mine = ours[ours["doc_id"] == text_id]
        words = theirs.loc[text_id]
        assert words["word"].tolist() == mine["word"].tolist() == text.split()
        diff = words["surprisal"].to_numpy(np.float64) / math.log(2) - mine["surprisal_bits"].to_numpy()  # bits
        np.testing.assert_allclose(diff[1:], 0, atol=1e-3)
        assert diff[0] == pytest.approx(double_eos, abs=1e-3)
    assert (double_eos > 0.1) if eos_likely else (double_eos < 1e-3)
