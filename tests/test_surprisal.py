"""Surprisal tables, word aggregation, terminal/HTML rendering and the `surprisal` CLI.

Oracles: the ``\\S+`` runs of the text (words), the tokenizer's own decoding (spans), a
float64 softmax of the model's full logits (top-k), hand-built token tables (the word
assignment rules), and Python's JSON/CSV parsers (CLI output)."""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import build_model
from helpers import train_metaspace
from lmeval.cli import surprisal as surprisal_cli
from lmeval.engine import demo
from lmeval.engine.demo import demo_model_path
from lmeval.errors import DataError, ModelError, OutputError
from lmeval.model.loading import prepare_model
from lmeval.view.render import render_html, render_terminal, script_json, write_html
from lmeval.view.surprisal import aggregate_words, surprisal_table

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps on.",
    "  Naïve café owners —  猫 and 犬 like it 😀.\n\nCross-entropy equals entropy plus KL. ",
    "word",
    "   \n",
]
NON_ASCII = "Naïve café — crème brûlée, 猫と犬 and 😀🦜 emoji."


@pytest.fixture(scope="module")
def gpt2_lm(gpt2_pair):
    """The tiny GPT-2 prepared once (its load-time probe is the slow part of a call)."""
    return prepare_model(*gpt2_pair, name="tiny-gpt2")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, gpt2_lm):
    """A prepared tiny model per tokenizer style."""
    out = {"bytelevel": gpt2_lm}
    for name, split in (("metaspace", True), ("metaspace_merged", False)):
        tok = train_metaspace(tmp_path_factory.mktemp(name), split)
        out[name] = prepare_model(build_model("llama", len(tok)), tok, name=name)
    return out


# --------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", ["auto", "none"])
@pytest.mark.parametrize("style", ["bytelevel", "metaspace", "metaspace_merged"])
def test_word_total_equals_token_total(pairs, style, bos):
    tokens = surprisal_table(TEXTS, pairs[style], bos=bos)
    words = aggregate_words(tokens, TEXTS)
    token_sum = tokens.groupby("doc_id")["nll"].apply(lambda s: s.astype(np.float64).sum() / math.log(2))
    # The plain token sum (the corrected surprisal_bits telescopes instead: test_words_correction.py).
    word_sum = words.groupby("doc_id")["surprisal_bits_token_sum"].sum()
    np.testing.assert_allclose(word_sum.to_numpy(), token_sum.to_numpy(), rtol=1e-9)
    assert list(word_sum.index) == list(token_sum.index)
    # Every token counted once: shared spans and empty spans included.
    assert words["n_tokens"].sum() == len(tokens)
    for row in words.itertuples():
        runs = TEXTS[row.doc_id].split() or [TEXTS[row.doc_id]]
        assert row.word == runs[row.word_index] == TEXTS[row.doc_id][row.char_start : row.char_end]
    if style == "metaspace_merged":
        assert words["crosses_word"].any(), "the merged tokenizer must exercise a token spanning words"


@pytest.mark.parametrize(
    "text, spans, positions, expected",
    [
        # leading space -> next word; "a b" in one token -> first word; empty span and the
        # byte tokens sharing a span -> the word after; trailing newline -> last word.
        (
            " a b  c.\n",
            [(0, 1), (1, 4), (5, 5), (6, 7), (7, 8), (7, 8), (8, 9)],
            range(7),
            {0: ("a", 2, 1 + 2, True, True), 2: ("c.", 5, 4 + 8 + 16 + 32 + 64, False, True)},
        ),
        # a text of whitespace alone has no word, and no row (lmeval run skips such a document)
        ("  \n", [(0, 2), (2, 3)], range(2), {}),
        # bos="none": position 0 has no row, so word 0 is incomplete
        ("ab cd", [(1, 2), (2, 5)], [1, 2], {0: ("ab", 1, 1, False, False), 1: ("cd", 1, 2, False, True)}),
    ],
)
def test_word_assignment_rules(text, spans, positions, expected):
    nll = 2.0 ** np.arange(len(spans))
    tokens = pd.DataFrame(
        {
            "doc_id": 0,
            "position": list(positions),
            "char_start": [s for s, _ in spans],
            "char_end": [e for _, e in spans],
            "nll": nll,
            "entropy": 1.0,
            "rank": np.arange(1, len(spans) + 1),
        }
    )
    words = aggregate_words(tokens, [text]).set_index("word_index")
    assert sorted(words.index) == sorted(expected)
    for index, (word, n_tokens, nll_sum, crosses, complete) in expected.items():
        row = words.loc[index]
        assert (row["word"], row["n_tokens"], row["nll"]) == (word, n_tokens, nll_sum)
        assert (bool(row["crosses_word"]), bool(row["complete"])) == (crosses, complete)
        assert row["surprisal_bits"] == pytest.approx(nll_sum / math.log(2))
        assert row["prob"] == pytest.approx(math.exp(-nll_sum))
    assert words["nll"].sum() == (nll.sum() if expected else 0)


def test_words_table_from_api_matches_aggregate(pairs):
    tokens = surprisal_table(TEXTS[:2], pairs["bytelevel"])
    words = surprisal_table(TEXTS[:2], pairs["bytelevel"], words=True)
    pd.testing.assert_frame_equal(words, aggregate_words(tokens, TEXTS[:2]))


@pytest.mark.parametrize("doc_id, span", [(5, (0, 1)), (0, (0, 99))])
def test_aggregate_words_rejects_mismatched_texts(doc_id, span):
    tokens = pd.DataFrame(
        {
            "doc_id": [doc_id],
            "position": [0],
            "char_start": [span[0]],
            "char_end": [span[1]],
            "nll": [1.0],
            "entropy": [1.0],
            "rank": [1],
        }
    )
    with pytest.raises(DataError, match="same texts"):
        aggregate_words(tokens, ["short"])


# --------------------------------------------------------------------------------------
# Tokens: spans, top-k, BOS
# --------------------------------------------------------------------------------------


def test_spans_slice_the_original_text(pairs):
    """Byte-level BPE: each run of tokens with overlapping spans decodes to exactly that
    slice (the byte tokens of a split multi-byte character share its span), and every
    non-space character of the text lies in some span."""
    tok = pairs["bytelevel"].tokenizer
    table = surprisal_table([NON_ASCII], pairs["bytelevel"])
    ids = tok(NON_ASCII, add_special_tokens=False)["input_ids"]
    assert table["token_id"].tolist() == ids
    assert (table["token_text"] == [NON_ASCII[s:e] for s, e in zip(table["char_start"], table["char_end"])]).all()
    # Tokens whose spans overlap (bytes of one character) decode together to their slice.
    groups: list[list] = []
    for token_id, start, end in zip(table["token_id"], table["char_start"], table["char_end"]):
        if groups and start < groups[-1][2]:
            groups[-1][0].append(token_id)
            groups[-1][2] = max(groups[-1][2], end)
        else:
            groups.append([[token_id], start, end])
    for ids, start, end in groups:
        assert tok.decode(ids).strip() == NON_ASCII[start:end]
    assert any(len(ids) > 1 for ids, _, _ in groups), "some multi-byte character must be split over tokens"
    covered = np.zeros(len(NON_ASCII), dtype=bool)
    for start, end in zip(table["char_start"], table["char_end"]):
        covered[start:end] = True
    assert all(covered[i] for i, ch in enumerate(NON_ASCII) if not ch.isspace())


@pytest.mark.parametrize("style", ["metaspace", "metaspace_merged"])
def test_spans_are_in_order_and_inside_text(pairs, style):
    table = surprisal_table([NON_ASCII], pairs[style])
    assert (np.diff(table["char_start"]) >= 0).all()
    assert ((table["char_start"] <= table["char_end"]) & (table["char_end"] <= len(NON_ASCII))).all()
    assert "".join(t for t in table["token_text"] if t.strip()).replace(" ", "") == NON_ASCII.replace(" ", "")


@pytest.mark.parametrize("quantile", [0.25, 0.75])
def test_top_k_against_full_softmax(gpt2_lm, quantile):
    model, tok = gpt2_lm.model, gpt2_lm.tokenizer
    text = TEXTS[0]
    # K between the targets' ranks, so that some targets are inside the top K and some not.
    k = int(np.quantile(surprisal_table([text], gpt2_lm)["rank"], quantile))
    table = surprisal_table([text], gpt2_lm, top_k=k)
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)  # (T, V)
    oracle = torch.topk(probs, k, dim=-1)
    for i, row in enumerate(table.itertuples()):
        p = np.array([a["prob"] for a in row.topk])
        assert len(p) == k and (np.diff(p) <= 0).all() and p.sum() <= 1 + 1e-6
        np.testing.assert_allclose(p, oracle.values[i].numpy(), rtol=1e-4)
        assert [a["token"] for a in row.topk] == [tok.decode([j]) for j in oracle.indices[i].tolist()]
        if row.rank <= k:  # the target is in the list, at its rank
            assert row.topk[row.rank - 1]["prob"] == pytest.approx(row.prob, rel=1e-4)
            assert row.topk[row.rank - 1]["token"] == tok.decode([row.token_id])
        else:  # every listed alternative is likelier than the target
            assert (p > row.prob).all()
    assert (table["rank"] <= k).any() and (table["rank"] > k).any()


def test_bos_policy_first_token(gpt2_lm):
    texts = [TEXTS[0], TEXTS[1], "a"]  # "a" is a single token
    auto = surprisal_table(texts, gpt2_lm, bos="auto")
    none = surprisal_table(texts, gpt2_lm, bos="none")
    first = auto[auto["position"] == 0]
    assert len(first) == 3 and (first["surprisal_bits"] > 0).all() and np.isfinite(first["surprisal_bits"]).all()
    assert not (none["position"] == 0).any(), "bos=none: the first token only conditions, it has no row"
    assert none.groupby("doc_id")["position"].min().tolist() == [1, 1]
    assert 2 not in set(none["doc_id"]), "a one-token text has nothing to score under bos=none"
    assert (none["surprisal_bits"] > 0).all()
    words = aggregate_words(none, texts)
    assert not words.loc[words["word_index"] == 0, "complete"].any()


@pytest.mark.parametrize("kwargs, error", [({"top_k": -1}, DataError), ({"bos": "maybe"}, ModelError)])
def test_surprisal_table_rejects_bad_options(gpt2_lm, kwargs, error):
    with pytest.raises(error):
        surprisal_table(["some text"], gpt2_lm, **kwargs)


def test_missing_demo_model_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PACKAGE", tmp_path / "lmeval")
    with pytest.raises(ModelError, match="demo model"):
        demo_model_path()
    with pytest.raises(ModelError, match="demo model"):
        surprisal_table(["text"])


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("words", [False, True])
def test_render_terminal_color_and_plain(gpt2_lm, words):
    text = TEXTS[1] + "\x1b[31mred\x07"  # a document that tries to drive the terminal
    table = surprisal_table([text], gpt2_lm, words=words)
    plain = render_terminal(table, text, color=False)
    coloured = render_terminal(table, text, color=True)
    assert "\x1b" not in plain and "\x07" not in plain
    assert "\x1b[" in coloured and "surprisal (bits)" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured).count("\x1b") == 0  # only our own SGR codes
    lines = plain.splitlines()
    header = next(i for i, line in enumerate(lines) if "surprisal_bits" in line)
    assert lines[header].split() == ["word" if words else "token", "surprisal_bits", "rank", "prob"]
    body = [line.split() for line in lines[header + 1 :]]
    assert len(body) == len(table)
    np.testing.assert_allclose([float(r[-3]) for r in body], table["surprisal_bits"], atol=5e-4)
    assert [int(r[-2]) for r in body] == table["rank"].tolist()


INJECTION = "</script><script>alert(1)</script> <img src=x onerror=alert(2)> & \u2028 done"


def test_render_html_escapes_documents(gpt2_lm):
    table = surprisal_table([INJECTION], gpt2_lm, top_k=2)
    page = render_html({0: table}, [INJECTION], title="<b>title</b>")
    assert "<script>alert" not in page and "<img" not in page and "<b>title" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # our data and our code
    heat = re.search(r'<div class="heat">(.*?)</div>', page, re.S).group(1)
    assert html.unescape(re.sub(r"<[^>]*>", "", heat)) == INJECTION  # shown as text, all of it
    data = re.search(r'<script type="application/json" id="lmeval-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and ">" not in data and "&" not in data
    rows = json.loads(data)[0]["rows"]
    assert [r["text"] for r in rows] == table["token_text"].tolist()
    assert page.count('class="tok') == len(table)
    assert "http://" not in page and "https://" not in page and " src=" not in page


def test_script_json_cannot_close_the_script_element():
    value = {"text": "</script><!-- <script> & \u2028", "n": 1.5}
    text = script_json(value)
    assert not set(text) & set("<>&\u2028") and "\\u003c/script\\u003e" in text
    assert json.loads(text) == value


def test_write_html_is_atomic(tmp_path):
    target = tmp_path / "page.html"
    target.write_text("old")
    write_html(target, "<p>new</p>")
    assert target.read_text() == "<p>new</p>" and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    with pytest.raises(OutputError, match="must exist"):
        write_html(tmp_path / "missing" / "page.html", "x")


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="lmeval")
    surprisal_cli.add_parser(parser.add_subparsers(dest="command"))
    code = surprisal_cli.main(parser.parse_args(["surprisal", *argv]))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("words", [False, True])
def test_cli_json(saved_gpt2, gpt2_lm, capsys, words):
    argv = ["--model", str(saved_gpt2), "--format", "json", "--top-k", "3", TEXTS[0], TEXTS[1]]
    code, out = run_cli(argv + (["--words"] if words else []), capsys)
    records = json.loads(out)
    expected = surprisal_table(TEXTS[:2], gpt2_lm, words=words, top_k=3)
    assert code == 0 and len(records) == len(expected)
    unit = "word" if words else "token"
    for key in (unit, "surprisal_bits", "char_start", "char_end", "rank", "prob", "entropy"):
        assert all(key in r for r in records), key
    np.testing.assert_allclose([r["surprisal_bits"] for r in records], expected["surprisal_bits"], rtol=1e-5)
    assert [r[unit] for r in records] == expected[unit].tolist()
    if not words:
        assert all(len(r["topk"]) == 3 for r in records)


def test_cli_csv_from_files(saved_gpt2, capsys, tmp_path, monkeypatch):
    path = tmp_path / "doc.txt"
    path.write_text(NON_ASCII, encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXTS[0]))
    code, out = run_cli(["--model", str(saved_gpt2), "--format", "csv", "--file", str(path), "--file", "-"], capsys)
    frame = pd.read_csv(io.StringIO(out), keep_default_na=False)
    assert code == 0 and sorted(set(frame["doc_id"])) == [0, 1]
    first = frame[frame["doc_id"] == 0]
    assert (first["token_text"] == [NON_ASCII[s:e] for s, e in zip(first["char_start"], first["char_end"])]).all()


def test_cli_table_and_html(saved_gpt2, capsys, tmp_path):
    page = tmp_path / "out.html"
    code, out = run_cli(["--model", str(saved_gpt2), "--bos", "none", "--html", str(page), TEXTS[0], INJECTION], capsys)
    assert code == 0 and "\x1b[" not in out  # captured stdout is not a terminal
    assert "== document 0 ==" in out and "== document 1 ==" in out and "surprisal_bits" in out
    assert page.read_text(encoding="utf-8").count("<script") == 2


@pytest.mark.parametrize(
    "argv, error",
    [([], DataError), (["--file", "/no/such/file"], DataError), (["--model", "/no/such/model", "x"], ModelError)],
)
def test_cli_user_errors(saved_gpt2, capsys, argv, error):
    model = [] if "--model" in argv else ["--model", str(saved_gpt2)]
    with pytest.raises(error):
        run_cli(model + argv, capsys)


@pytest.mark.parametrize("argv", [["--bos", "first"], ["--top-k", "-1"], ["--format", "xml"]])
def test_cli_rejects_bad_arguments(capsys, argv):
    with pytest.raises(SystemExit):
        run_cli(argv + ["text"], capsys)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "choice, no_color, tty, expected",
    [
        ("auto", "", True, True),
        ("auto", "1", True, False),
        ("auto", "", False, False),
        ("always", "1", False, True),
        ("never", "", True, False),
    ],
)
def test_color_follows_the_flag_then_no_color_then_the_terminal(choice, no_color, tty, expected, monkeypatch):
    from lmeval.cli.common import use_color

    monkeypatch.setenv("NO_COLOR", no_color)
    assert use_color(choice, _Terminal() if tty else io.StringIO()) is expected


def test_cli_color_always_and_never(saved_gpt2, capsys):
    _, coloured = run_cli(["--model", str(saved_gpt2), "--color", "always", TEXTS[0]], capsys)
    _, plain = run_cli(["--model", str(saved_gpt2), "--color", "never", TEXTS[0]], capsys)
    assert "\x1b[" in coloured and "\x1b[" not in plain


# --------------------------------------------------------------------------------------
# Word covariates
# --------------------------------------------------------------------------------------

COVARIATE_TEXTS = ["The dog sleeps. The DOG sleeps!", '"Zzxqvw" (dog) — ok', "The end."]
# By hand: each word with its surrounding punctuation stripped, and case-folded for the counts.
STRIPPED = ["The", "dog", "sleeps", "The", "DOG", "sleeps", "Zzxqvw", "dog", "", "ok", "The", "end"]
COUNTS = {"the": 3, "dog": 3, "sleeps": 2, "zzxqvw": 1, "": 1, "ok": 1, "end": 1}  # 12 words


def test_word_covariates_on_a_fixture(gpt2_lm):
    import wordfreq

    plain = surprisal_table(COVARIATE_TEXTS, gpt2_lm, words=True)
    table = surprisal_table(
        COVARIATE_TEXTS, gpt2_lm, words=True, covariates=["frequency", "length", "unigram"], language="en"
    )
    assert table["word"].tolist() == [w for t in COVARIATE_TEXTS for w in t.split()]
    assert table["length_chars"].tolist() == [len(w) for w in STRIPPED]
    expected_zipf = [
        math.log10(wordfreq.word_frequency(w, "en")) + 9 if w != "Zzxqvw" and w else math.nan for w in STRIPPED
    ]
    np.testing.assert_allclose(table["frequency_zipf"], expected_zipf, rtol=0, atol=1e-12)
    # A word wordfreq does not know, and a word of punctuation alone: NaN, never 0.
    assert wordfreq.word_frequency("Zzxqvw", "en") == 0 and table["frequency_zipf"].isna().tolist() == [
        w in ("Zzxqvw", "") for w in STRIPPED
    ]
    # wordfreq's own (rounded) Zipf value where it knows the word.
    known = table.dropna(subset=["frequency_zipf"])
    rounded = [wordfreq.zipf_frequency(w, "en") for w, keep in zip(STRIPPED, table["frequency_zipf"].notna()) if keep]
    np.testing.assert_allclose(known["frequency_zipf"], rounded, atol=0.005 + 1e-12)
    expected_unigram = [math.log10(COUNTS[w.casefold()] / 12) if w else math.nan for w in STRIPPED]
    np.testing.assert_allclose(table["unigram_logfreq"], expected_unigram, rtol=0, atol=1e-12)
    # Asking for covariates adds columns and changes nothing else.
    pd.testing.assert_frame_equal(table[plain.columns], plain)
    assert list(table.columns) == [*plain.columns, "length_chars", "frequency_zipf", "unigram_logfreq"]
    assert table.attrs == {**plain.attrs, "covariates": ["length", "frequency", "unigram"], "language": "en"}


def test_word_covariates_follow_the_language(gpt2_lm):
    french = surprisal_table(["le chat dort"], gpt2_lm, words=True, covariates=["frequency"], language="fr")
    english = surprisal_table(["le chat dort"], gpt2_lm, words=True, covariates=["frequency"])
    assert (french["frequency_zipf"] > english["frequency_zipf"].fillna(0)).all()
    assert french.attrs["language"] == "fr" and "length_chars" not in french


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(covariates=["length"]), "are columns of word tables"),
        (dict(words=True, covariates=["size"]), "must be one of length, frequency, unigram"),
        (dict(words=True, covariates="length"), r"Wrap it: \['length'\]"),
        (dict(words=True, covariates=["frequency"], language="xx"), "language: must be a language wordfreq has"),
        (dict(words=True, word_boundary="newline"), "word_boundary: must be one of whitespace, marker"),
    ],
)
def test_covariate_and_boundary_errors(gpt2_lm, kwargs, error):
    with pytest.raises(DataError, match=error):
        surprisal_table(["the dog"], gpt2_lm, **kwargs)


def test_cli_word_boundary_and_covariates(saved_gpt2, gpt2_lm, capsys):
    argv = ["--model", str(saved_gpt2), "--words", "--format", "csv", "--word-boundary", "marker"]
    code, out = run_cli([*argv, "--covariates", "frequency,length", "The dog sleeps."], capsys)
    assert code == 0
    got = pd.read_csv(io.StringIO(out))
    expected = surprisal_table(
        ["The dog sleeps."], gpt2_lm, words=True, word_boundary="marker", covariates=["frequency", "length"]
    )
    assert got.columns.tolist() == expected.columns.tolist()
    np.testing.assert_allclose(got["surprisal_bits"], expected["surprisal_bits"], rtol=1e-5)
    np.testing.assert_allclose(got["frequency_zipf"], expected["frequency_zipf"], rtol=1e-12)
    assert got["length_chars"].tolist() == [3, 3, 6]
    code, out = run_cli(
        ["--model", str(saved_gpt2), "--words", "--covariates", "length,unigram", "Zzxq (dog)."], capsys
    )
    assert code == 0 and "length_chars  unigram_logfreq" in out and "frequency_zipf" not in out
    whitespace = surprisal_table(["The dog sleeps."], gpt2_lm, words=True)
    assert not np.allclose(got["surprisal_bits"], whitespace["surprisal_bits"], rtol=1e-7, atol=0)
