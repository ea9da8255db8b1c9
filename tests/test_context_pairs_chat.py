"""A continuation given its context, minimal pairs, and chat turns.

Oracles: `score_texts` of the whole string (same tokens, same positions), a float64
log-softmax of the full logits (long contexts), direct sums of `score_texts` NLLs (pairs),
numpy's own resampling (the bootstrap) and the whole rendered conversation (chat)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from helpers import CHATML, CONTEXTS, CONVERSATIONS, interrupted_after
from helpers import CONTEXT_TEXTS as TEXTS
from lmeval.cli import pairs as pairs_cli
from lmeval.cli import surprisal as surprisal_cli
from lmeval.errors import ConfigError, DataError, ModelError
from lmeval.model.loading import prepare_model
from lmeval.producers.chat import score_chats, turn_table


@pytest.fixture(scope="module")
def gpt2_lm(gpt2_pair):
    return prepare_model(*gpt2_pair, name="tiny-gpt2")


# --------------------------------------------------------------------------------------
# Conditional scoring
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", ["auto", "none"])
def test_continuation_equals_whole_string_scoring(gpt2_lm, bos):
    got = lmeval.score_texts(TEXTS, gpt2_lm, contexts=CONTEXTS, bos=bos)
    whole = lmeval.score_texts([c + t for c, t in zip(CONTEXTS, TEXTS)], gpt2_lm, bos=bos)
    for i, (context, text) in enumerate(zip(CONTEXTS, TEXTS)):
        rows, full = got[got["doc_id"] == i], whole[whole["doc_id"] == i]
        # The scored tokens are the whole string's tokens whose span ends past the context.
        kept = full[full["char_end"] > len(context)]
        assert rows["token_id"].tolist() == kept["token_id"].tolist()
        np.testing.assert_allclose(rows["nll"], kept["nll"], rtol=1e-5, atol=1e-6)
        assert rows["context_len"].tolist() == kept["context_len"].tolist()  # BOS once: same context lengths
        # Positions count the text's tokens; without a BOS and a context, token 0 only conditions.
        first = 1 if bos == "none" and not context else 0
        assert rows["position"].tolist() == list(range(first, first + len(rows)))
        for r in rows.itertuples():  # spans are into the text, clipped at its start
            assert 0 <= r.char_start <= r.char_end <= len(text)
    straddling = got[got["crosses_context"]]
    assert set(straddling["doc_id"]) == {2} and got.attrs["n_crossing"] == 1  # 'Ġs' 'lee' 'ps': 'lee' spans 'le|e'
    assert not got.loc[got["doc_id"] != 2, "crosses_context"].any()


def test_long_context_keeps_its_last_tokens(gpt2_lm):
    """A context longer than max_length: the continuation's window (one span, ending at its
    last target) holds the last L ids, so the context keeps its last tokens."""
    tok, model = gpt2_lm.tokenizer, gpt2_lm.model
    context = " ".join(["the lazy dog sleeps on"] * 6)
    text = " and the fox jumps."
    length = 16
    got = lmeval.score_texts([text], gpt2_lm, contexts=[context], max_length=length)
    ids = [tok.eos_token_id] + tok(context + text, add_special_tokens=False)["input_ids"]
    start = len(ids) - 1 - length  # the window is ids[start : len(ids) - 1]
    assert start > 0 and len(got) < length
    with torch.no_grad():
        logq = torch.log_softmax(model(torch.tensor([ids[start:-1]])).logits[0].double(), -1)  # (L, V)
    for row, k in zip(got.itertuples(), range(len(ids) - len(got), len(ids))):
        assert row.nll == pytest.approx(-float(logq[k - 1 - start, ids[k]]), rel=1e-5)
        assert row.context_len == k - start


def test_context_errors(gpt2_lm):
    with pytest.raises(DataError, match="one string per text"):
        lmeval.score_texts(["a", "b"], gpt2_lm, contexts=["x"])
    with pytest.raises(DataError, match="contexts\\[0\\]"):
        lmeval.score_texts(["a"], gpt2_lm, contexts=[3])


def test_surprisal_words_given_context(gpt2_lm):
    words = lmeval.surprisal_table(TEXTS[:2], gpt2_lm, contexts=CONTEXTS[:2], words=True)
    for i, text in enumerate(TEXTS[:2]):
        assert words.loc[words["doc_id"] == i, "word"].tolist() == text.split()
    # Context + text with a space either side of the boundary: the same words, the same values.
    np.testing.assert_allclose(
        words[words.doc_id == 0]["surprisal_bits"], words[words.doc_id == 1]["surprisal_bits"], rtol=1e-5
    )
    first = words[words["word_index"] == 0]
    assert (first["boundary_before_bits"] > 0).all()  # a word boundary after the context, not the text's start


# --------------------------------------------------------------------------------------
# Minimal pairs
# --------------------------------------------------------------------------------------

GOOD = ["The dog sleeps on.", "The fox jumps over the dog.", "In the beginning was the word.", "The dogs sleep."]
BAD = ["The dog sleep on.", "The fox jump over the dog.", "In the beginning were the word.", "The dogs sleeps."]


@pytest.mark.parametrize("with_context", [False, True])
def test_minimal_pairs_against_score_texts(gpt2_lm, with_context):
    contexts = ["Look: "] * 4 if with_context else None
    table = lmeval.minimal_pairs(GOOD, BAD, gpt2_lm, contexts, bootstrap=200, seed=3)
    frame = lmeval.score_texts(GOOD + BAD, gpt2_lm, contexts=None if contexts is None else contexts * 2)
    logp = -frame.groupby("doc_id")["nll"].apply(lambda s: s.astype(np.float64).sum()).to_numpy()
    np.testing.assert_allclose(table["logprob_good"], logp[:4], rtol=1e-12)
    np.testing.assert_allclose(table["delta"], logp[:4] - logp[4:], rtol=1e-9, atol=1e-9)
    wins = logp[:4] > logp[4:]
    assert table["good_wins"].tolist() == wins.tolist()
    assert table.attrs["accuracy"] == wins.mean() and table.attrs["n_pairs"] == 4
    draws = np.random.default_rng(3).integers(0, 4, size=(200, 4))
    low, high = np.percentile(wins[draws].mean(axis=1), [2.5, 97.5])
    assert (table.attrs["ci_low"], table.attrs["ci_high"]) == pytest.approx((low, high))


def test_minimal_pairs_errors(gpt2_lm):
    with pytest.raises(DataError, match="pair up"):
        lmeval.minimal_pairs(GOOD, BAD[:2], gpt2_lm)
    with pytest.raises(DataError, match="must not be empty"):
        lmeval.minimal_pairs(["a", " "], ["b", "c"], gpt2_lm)


def test_pairs_cli(saved_gpt2, gpt2_lm, tmp_path, capsys, monkeypatch):
    path = tmp_path / "blimp.jsonl"
    rows = [{"sentence_good": g, "sentence_bad": b, "id": f"p{i}"} for i, (g, b) in enumerate(zip(GOOD, BAD))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="lmeval")
    pairs_cli.add_parser(parser.add_subparsers(dest="command"))
    assert pairs_cli.main(parser.parse_args(["pairs", str(path), "--model", str(saved_gpt2), "--bootstrap", "50"])) == 0
    out = capsys.readouterr().out
    written = pd.read_csv(tmp_path / "blimp.pairs.csv")
    expected = lmeval.minimal_pairs(GOOD, BAD, gpt2_lm, bootstrap=50)
    assert written["id"].tolist() == ["p0", "p1", "p2", "p3"]
    np.testing.assert_allclose(written["delta"], expected["delta"], rtol=1e-5, atol=1e-4)
    assert f"accuracy {expected.attrs['accuracy']:.4f}" in out and "95% CI" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence_good": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="sentence_bad"):
        pairs_cli.main(parser.parse_args(["pairs", str(bad), "--model", str(saved_gpt2)]))


def test_surprisal_cli_context(saved_gpt2, gpt2_lm, capsys):
    parser = argparse.ArgumentParser(prog="lmeval")
    surprisal_cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["surprisal", "--model", str(saved_gpt2), "--format", "json", "--words", "--context", CONTEXTS[0], TEXTS[0]]
    assert surprisal_cli.main(parser.parse_args(argv)) == 0
    records = json.loads(capsys.readouterr().out)
    expected = lmeval.surprisal_table(TEXTS[:1], gpt2_lm, contexts=CONTEXTS[:1], words=True)
    np.testing.assert_allclose([r["surprisal_bits"] for r in records], expected["surprisal_bits"], rtol=1e-5)
    with pytest.raises(DataError, match="--context"):
        surprisal_cli.main(
            parser.parse_args(["surprisal", "--model", str(saved_gpt2), "--context", "a", "--context", "b", "x"])
        )


# --------------------------------------------------------------------------------------
# Chat turns
# --------------------------------------------------------------------------------------


def test_chat_scores_assistant_turns_only(chat_lm):
    frame = score_chats(CONVERSATIONS, chat_lm)
    rendered = frame.attrs["rendered"]
    assert rendered[0] == chat_lm.tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    whole = lmeval.score_texts(rendered, chat_lm)
    merged = frame.merge(whole, on=["doc_id", "position"], suffixes=("", "_whole"))
    assert len(merged) == len(frame)
    np.testing.assert_allclose(merged["nll"], merged["nll_whole"], rtol=1e-5)
    # Exactly the assistant contents and their end-of-turn tokens, nothing else.
    for doc_id, conversation in enumerate(CONVERSATIONS):
        rows = frame[frame["doc_id"] == doc_id]
        assistant = [m["content"] for m in conversation if m["role"] == "assistant"]
        content = rows[~rows["end_of_turn"]]
        text = rendered[doc_id]
        pieces = [text[g["char_start"].min() : g["char_end"].max()] for _, g in content.groupby("turn")]
        assert pieces == assistant
        assert (rows.loc[rows["end_of_turn"], "token"] == "<|im_end|>").all()
        assert rows["end_of_turn"].sum() == len(assistant)
        assert sorted(set(rows["turn"])) == [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    turns = turn_table(frame)
    eot = frame[frame["end_of_turn"]].set_index(["doc_id", "turn"])["nll"].astype(np.float64)
    np.testing.assert_allclose(
        turns["nll_sum"] - turns["nll_sum_content"], eot.loc[list(zip(turns.doc_id, turns.turn))]
    )
    assert (turns["n_tokens"] == turns["n_tokens_content"] + 1).all()


def test_chat_errors(chat_lm, gpt2_lm):
    with pytest.raises(ModelError, match="no chat template"):
        score_chats(CONVERSATIONS, gpt2_lm)
    with pytest.raises(DataError, match="assistant"):
        score_chats([[{"role": "user", "content": "hi"}]], chat_lm)
    with pytest.raises(DataError, match="role"):
        score_chats([[{"role": "assistant"}]], chat_lm)
    tok = chat_lm.tokenizer
    old = tok.chat_template
    try:  # a template that renders history unlike a live prompt
        tok.chat_template = CHATML.replace(
            "{{ m['content'] }}", "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}"
        )
        with pytest.raises(DataError, match="prefix"):
            score_chats(CONVERSATIONS[:1], chat_lm)
    finally:
        tok.chat_template = old


OPENS_WITH = {
    "assistant": [
        {"role": "assistant", "content": "Hello, the fox jumps."},
        {"role": "user", "content": "Who sleeps?"},
        {"role": "assistant", "content": "The dog sleeps."},
    ],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "The dog sleeps on."},
    ],
    "user": CONVERSATIONS[1],
    "lone assistant": [{"role": "assistant", "content": "The word."}],
}
# A template with a preamble before the first message (a default system line), so that the
# first turn's conditioning is more than the BOS and its own header.
PREAMBLE_CHATML = "<|im_start|>system\nYou are a model.<|im_end|>\n" + CHATML


@pytest.mark.parametrize("template", [CHATML, PREAMBLE_CHATML], ids=["chatml", "preamble"])
@pytest.mark.parametrize("opening", list(OPENS_WITH))
def test_conversations_opening_with_any_role_equal_float64_oracle(chat_lm, opening, template):
    """Every assistant turn, the first message's included, is its tokens in the rendered
    conversation scored with a float64 log-softmax of the full logits given the BOS and
    everything rendered before it: its content and end-of-turn token, nothing else."""
    conversation = OPENS_WITH[opening]
    tok = chat_lm.tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = template
        frame = score_chats([conversation], chat_lm)
        rendered = tok.apply_chat_template(conversation, tokenize=False)
    finally:
        tok.chat_template = old
    assert frame.attrs["rendered"] == [rendered]
    encoded = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], np.array(encoded["offset_mapping"])
    with torch.no_grad():
        logits = chat_lm.model(torch.tensor([[tok.bos_token_id] + ids])).logits[0].double()  # (T + 1, V)
    logq = torch.log_softmax(logits, dim=-1).numpy()
    # The oracle's turns: each assistant content found in the rendered text, in order, by hand.
    expected, cursor = [], 0
    for i, m in enumerate(conversation):
        start = rendered.index(m["content"], cursor)
        cursor = start + len(m["content"])
        if m["role"] != "assistant":
            continue
        content = [k for k, (a, b) in enumerate(offsets) if b > start and a < cursor]
        eot = content[-1] + 1
        assert tok.convert_ids_to_tokens(ids[eot]) == "<|im_end|>"
        expected += [(i, k, k == eot, -logq[k, ids[k]]) for k in content + [eot]]
    assert frame["turn"].tolist() == [e[0] for e in expected]
    assert frame["position"].tolist() == [e[1] for e in expected]
    assert frame["end_of_turn"].tolist() == [e[2] for e in expected]
    np.testing.assert_allclose(frame["nll"].to_numpy(np.float64), [e[3] for e in expected], rtol=2e-5, atol=2e-5)


def test_first_message_whose_content_the_template_rewrites_is_named(chat_lm):
    tok = chat_lm.tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | lower }}")
        with pytest.raises(DataError, match=r"\[0\]: the chat template must write a message's content verbatim"):
            score_chats([OPENS_WITH["assistant"]], chat_lm)
    finally:
        tok.chat_template = old


# --------------------------------------------------------------------------------------
# Through `lmeval run`
# --------------------------------------------------------------------------------------


def _config(tmp_path, model_dir, data: dict):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"models": [{"path": str(model_dir), "name": "m"}], "data": data, "output": {"dir": str(tmp_path / "out")}}
        ),
        encoding="utf-8",
    )
    return path


def test_run_with_context_field(tmp_path, saved_gpt2, gpt2_lm):
    rows = [{"id": f"d{i}", "context": c, "text": t} for i, (c, t) in enumerate(zip(CONTEXTS, TEXTS))]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    config = _config(
        tmp_path, saved_gpt2, {"path": str(tmp_path / "data.jsonl"), "id_field": "id", "context_field": "context"}
    )
    tables = lmeval.run(config, show_progress=False)
    expected = lmeval.score_texts(TEXTS, gpt2_lm, contexts=CONTEXTS)
    assert tables["tokens"]["token"].tolist() == expected["token"].tolist()
    assert tables["tokens"]["context_len"].tolist() == expected["context_len"].tolist(), (
        tables["tokens"][["doc_id", "position", "token", "nll", "context_len"]].to_string(),
        expected[["doc_id", "position", "token", "nll", "context_len"]].to_string(),
    )
    np.testing.assert_allclose(tables["tokens"]["nll"], expected["nll"], rtol=1e-5)
    assert tables["documents"]["n_bytes"].tolist() == [len(t.encode()) for t in TEXTS]
    assert tables["run"]["config"]["data"]["context_field"] == "context"


@pytest.mark.slow
def test_run_with_messages_field(tmp_path, chat_lm):
    folder = tmp_path / "chat-model"
    chat_lm.model.save_pretrained(folder)
    chat_lm.tokenizer.save_pretrained(folder)
    rows = [{"messages": c} for c in CONVERSATIONS]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    config = _config(tmp_path, folder, {"path": str(tmp_path / "chats.jsonl"), "messages_field": "messages"})
    tables = lmeval.run(config, show_progress=False)
    expected = score_chats(CONVERSATIONS, chat_lm)
    assert tables["tokens"]["token_id"].tolist() == expected["token_id"].tolist()
    np.testing.assert_allclose(tables["tokens"]["nll"], expected["nll"], rtol=1e-5)


def test_config_rejects_both_fields(tmp_path):
    from lmeval.engine.config import build_config

    raw = {"models": ["gpt2"], "data": {"path": "x.jsonl", "context_field": "c", "messages_field": "m"}}
    with pytest.raises(ConfigError, match="together"):
        build_config(raw, tmp_path)


def test_two_chat_templates_in_one_run_compare_in_bytes_and_words(tmp_path, chat_lm):
    """Same vocabulary, two templates: the conversations are different token sequences, so the
    comparison falls back to bits per byte and word perplexity, and says why; the run ends
    with exit 0 and writes run.json (it used to align tokens by position and exit 2)."""
    import yaml

    from lmeval.cli import main

    tok = chat_lm.tokenizer
    old = tok.chat_template
    folders = {}
    try:
        for name, template in (("plain", CHATML), ("preamble", PREAMBLE_CHATML)):
            folders[name] = tmp_path / name
            tok.chat_template = template
            chat_lm.model.save_pretrained(folders[name])
            tok.save_pretrained(folders[name])
    finally:
        tok.chat_template = old
    rows = [{"id": f"c{i}", "messages": c} for i, c in enumerate([*CONVERSATIONS, OPENS_WITH["assistant"]])]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    config = tmp_path / "run.yaml"
    body = {
        "models": [{"path": str(f), "name": n} for n, f in folders.items()],
        "data": {"path": str(tmp_path / "chats.jsonl"), "id_field": "id", "messages_field": "messages"},
        "output": {"dir": str(tmp_path / "out")},
        "compare": {"bootstrap": 50},
    }
    config.write_text(yaml.safe_dump(body), encoding="utf-8")
    assert main(["run", str(config), "-q"]) == 0
    out = tmp_path / "out"
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    protocols = record["protocol"]["models"]
    assert record["protocol"]["word_boundary"] is None  # a run writes no word table
    assert protocols["plain"]["tokenizer_sha256"] == protocols["preamble"]["tokenizer_sha256"]
    assert protocols["plain"]["chat_template_sha256"] != protocols["preamble"]["chat_template_sha256"]
    compare = pd.read_csv(out / "compare.csv")
    assert sorted(compare["metric"]) == ["bits_per_byte", "word_ppl"]
    assert compare["note"].str.contains("chat templates differ").all()
    assert not (out / "compare_tokens.csv").exists()
    # The same scored text for both: bytes and words are the identical assistant contents.
    documents = pd.read_parquet(out / "documents.parquet")
    by_model = {m: d.sort_values("doc_id") for m, d in documents.groupby("model")}
    assert by_model["plain"]["n_bytes"].tolist() == by_model["preamble"]["n_bytes"].tolist()


def test_resuming_a_chat_run_after_its_template_changed_is_refused(tmp_path, chat_lm, monkeypatch):
    """The parts of a chat run were scored under one template; a rerun of the same folder
    after the model's template changed must not merge them with the new rendering (the chat
    template was not part of the recorded protocol, so it did)."""
    import yaml

    from lmeval.errors import OutputError

    folder = tmp_path / "chat-model"
    chat_lm.model.save_pretrained(folder)
    chat_lm.tokenizer.save_pretrained(folder)
    chats = [*CONVERSATIONS, OPENS_WITH["assistant"], OPENS_WITH["system"]]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in chats), "utf-8")
    config = tmp_path / "run.yaml"
    body = {
        "models": [{"path": str(folder), "name": "m"}],
        "data": {"path": str(tmp_path / "chats.jsonl"), "messages_field": "messages"},
        "output": {"dir": str(tmp_path / "out"), "part_chars": 260},  # a part per conversation
    }
    config.write_text(yaml.safe_dump(body), encoding="utf-8")
    assert len(interrupted_after(1, config, monkeypatch)) == 1  # one part scored under CHATML
    saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template_file = folder / "chat_template.jinja"
    if template_file.exists():
        template_file.write_text(PREAMBLE_CHATML, encoding="utf-8")
    else:
        saved["chat_template"] = PREAMBLE_CHATML
        (folder / "tokenizer_config.json").write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(OutputError, match="chat_template_sha256"):
        lmeval.run(config, show_progress=False)
