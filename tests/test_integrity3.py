"""Issue 25: nothing silently wrong, third round. An empty tokenizer, unchecked part metadata,
a failed start that blocked its own fix, the last tracebacks, and messages that misled.
Each test fails on the code before the fix."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import lmeval
from conftest import CORPUS
from helpers import ENV, assert_same_tables, interrupted_after, read_tables, snapshot, write_config, write_jsonl
from helpers import FOLDER_TEXTS as TEXTS
from lmeval import DataError, ModelError, OutputError
from lmeval.cli import main


def _run_config(folder: Path, model: Path, extra: str = "", data: str = "docs.jsonl") -> Path:
    if not (folder / "docs.jsonl").exists():
        write_jsonl(folder / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS[:12])])
    return write_config(
        folder,
        f"models: [{{name: a, path: {model}}}]\ndata: {{path: {data}, id_field: id}}\n"
        "scoring: {max_length: 16, batch_tokens: 64}\noutput: {dir: out, part_chars: 300}\n" + extra,
    )


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lmeval: error: " in err, err
    return err


@pytest.fixture
def no_tokenizer(tmp_path, saved_gpt2) -> Path:
    """The tiny model's folder without its tokenizer files: transformers 5 builds an empty tokenizer."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(saved_gpt2, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


# --------------------------------------------------------------------------------------
# 1. An empty tokenizer, a text with no token, and nothing scored
# --------------------------------------------------------------------------------------


def test_run_refuses_a_model_folder_without_tokenizer_files_and_leaves_no_folder(
    no_tokenizer, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in CORPUS])
    assert main(["run", "--model", str(no_tokenizer), "--data", "docs.jsonl", "--out", "runs/x", "-q"]) == 2
    err = _error(capsys)
    assert "tokenizer" in err and str(no_tokenizer) in err and "empty" in err and "save_pretrained" in err
    assert not (tmp_path / "runs").exists()  # item 3: the failed start created nothing


def test_score_texts_and_surprisal_refuse_an_empty_tokenizer(no_tokenizer, capsys):
    with pytest.raises(ModelError, match=r"tokenizer of .*no-tokenizer must have a vocabulary"):
        lmeval.score_texts(["Some text."], str(no_tokenizer))
    assert main(["surprisal", "--model", str(no_tokenizer), "Some text."]) == 2
    assert "must have a vocabulary" in _error(capsys)


def test_a_non_empty_text_that_tokenizes_to_no_token_is_named():
    from lmeval.producers.text import Document, tokenize_documents
    from toy_lm import build_tokenizer

    tokenizer = build_tokenizer()  # knows only a, b, space and newline; no unknown token
    assert len(tokenize_documents([Document("fine", "a b")], tokenizer)[0].token_ids) == 2
    with pytest.raises(
        DataError, match=r"document 'xyz-doc': a non-empty text must tokenize to at least one token.*'xyz'"
    ):
        tokenize_documents([Document("fine", "a b"), Document("xyz-doc", "xyz")], tokenizer)


def test_nothing_scored_gives_nan_never_a_perfect_score():
    from lmeval.analyses.documents import documents_frame, summary_row

    # bos: none and one-token documents: bytes and words counted, no token scored.
    documents = documents_frame("m", ["a", "b"], [0, 0], [5, 7], [1, 1], [0.0, 0.0])
    assert documents["bits_per_byte"].isna().all()
    row = summary_row("m", documents)
    for key in ("bits_per_byte", "word_ppl", "byte_ppl", "ppl", "bits_per_token"):
        assert np.isnan(row[key]), key


def test_a_model_with_no_scored_token_never_enters_a_comparison(caplog):
    from lmeval.analyses.compare import compare_tables

    documents = pd.DataFrame(
        {
            "model": ["real"] * 3 + ["empty"] * 3,
            "doc_id": ["a", "b", "c"] * 2,
            "n_tokens": [10, 12, 9, 0, 0, 0],
            "n_bytes": [40, 50, 30] * 2,
            "n_words": [8, 9, 6] * 2,
            "nll_sum": [30.0, 33.0, 25.0, 0.0, 0.0, 0.0],
        }
    )
    record = {"protocol": {"models": {"real": {"tokenizer_sha256": "x"}, "empty": {"tokenizer_sha256": "y"}}}}
    with caplog.at_level(logging.WARNING):
        for baseline in ("real", "empty"):
            frames = compare_tables({"documents": documents}, record, {"baseline": baseline, "bootstrap": 10})
            assert frames["compare"].empty, baseline
    assert "empty" in caplog.text and "scored no token" in caplog.text


# --------------------------------------------------------------------------------------
# 2. The part checksum covers the metadata the merge reads
# --------------------------------------------------------------------------------------


def _tamper_meta(path: Path, change) -> None:
    """Rewrite a part with its metadata changed and its recorded checksum kept: a flipped bit."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"lmeval"])
    change(meta)
    pq.write_table(table.replace_schema_metadata({b"lmeval": json.dumps(meta).encode("utf-8")}), path)


def test_a_flipped_metadata_field_is_named_and_rescored(tmp_path, saved_gpt2, monkeypatch, caplog):
    config = _run_config(tmp_path, saved_gpt2)
    lmeval.run(str(config), [f"output.dir={tmp_path / 'reference'}"], show_progress=False)
    written = interrupted_after(3, config, monkeypatch)
    for path, field in zip(written, ("nll_sum", "n_bytes", "doc_ids")):  # each read by the merge, none a column
        _tamper_meta(
            path, lambda meta, f=field: meta[f].__setitem__(0, meta[f][0] * 2 + 1 if f != "doc_ids" else "d99")
        )
    with caplog.at_level(logging.WARNING):
        lmeval.run(str(config), show_progress=False)
    for path in written:
        assert f"result part {path} is not reused" in caplog.text
    assert "checksum" in caplog.text and "scored again" in caplog.text
    assert_same_tables(read_tables(tmp_path / "out"), read_tables(tmp_path / "reference"))


# --------------------------------------------------------------------------------------
# 3. A run that fails before its first part leaves the folder as it found it
# --------------------------------------------------------------------------------------


def test_a_failed_start_leaves_the_folder_byte_identical_and_the_fix_runs(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    assert main(["run", str(config), "-q", "scoring.bos=99999"]) == 2  # refused once the model is loaded
    assert "scoring.bos" in _error(capsys)
    assert snapshot(out) == before and not (out / "parts").exists()
    assert main(["run", str(config), "-q"]) == 0  # the corrected rerun: no "partial run of another config"
    capsys.readouterr()
    shutil.rmtree(out)
    (tmp_path / "docs.jsonl").write_text('{"id": null, "text": "x"}\n')  # refused while loading the data
    assert main(["run", str(config), "-q"]) == 2
    assert not out.exists()


def test_a_failed_fresh_start_puts_the_finished_parts_back(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    interrupted_after(2, config, monkeypatch)
    before = snapshot(tmp_path / "out")
    assert main(["run", str(config), "-q", "--fresh", "scoring.bos=99999"]) == 2
    assert snapshot(tmp_path / "out") == before


# --------------------------------------------------------------------------------------
# 4. Named errors instead of tracebacks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_safetensors_weights_are_a_named_error(damage, saved_gpt2, capsys):
    weights = saved_gpt2 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[10] = ord("#")  # inside the JSON header
    weights.write_bytes(bytes(data))
    assert main(["surprisal", "--model", str(saved_gpt2), "Some text."]) == 2
    err = _error(capsys)
    assert "safetensors" in err and str(saved_gpt2) in err and "again" in err


def test_a_manifest_cut_in_half_is_a_named_error(tmp_path, saved_gpt2, monkeypatch, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    interrupted_after(1, config, monkeypatch)
    manifest = tmp_path / "out" / "parts" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    assert main(["run", str(config), "-q"]) == 2
    err = _error(capsys)
    assert "manifest.json" in err and "--fresh" in err and "fresh=True" not in err
    with pytest.raises(OutputError, match=r"fresh=True"):  # a Python caller is told its own keyword
        lmeval.run(str(config), show_progress=False)
    assert main(["run", str(config), "-q", "--fresh"]) == 0


def test_a_closed_stdout_ends_quietly(saved_gpt2, tmp_path):
    """`lmeval surprisal ... | head -c 1`: the reader goes away; no traceback, SIGPIPE's status."""
    command = [
        sys.executable,
        "-m",
        "lmeval",
        "surprisal",
        "--model",
        str(saved_gpt2),
        "--format",
        "csv",
        " ".join(CORPUS * 20),
    ]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody reads: the first write meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_a_broken_pipe_in_process_returns_141(saved_gpt2, monkeypatch, capsys):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["surprisal", "--model", str(saved_gpt2), "Some text."]) == 141


# --------------------------------------------------------------------------------------
# 5. Messages that say what happened, and inputs no longer accepted silently
# --------------------------------------------------------------------------------------


def test_data_path_failures_say_what_happened(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa

    from lmeval.engine.config import DataConfig
    from lmeval.engine.data import load_documents

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    with pytest.raises(
        DataError, match=r"zero\.parquet must hold documents \(got a Parquet file with 0 rows\)"
    ) as caught:
        load_documents(DataConfig(path=str(tmp_path / "zero.parquet")))
    assert "UTF-8" not in str(caught.value)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 is not JSON"):
        load_documents(DataConfig(path=str(tmp_path / "bad.jsonl")))

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"hub dataset 'someone/corpus' cannot be loaded \(ConnectionError") as caught:
        load_documents(DataConfig(path="someone/corpus"))
    assert "UTF-8" not in str(caught.value) and "network" in str(caught.value)


def test_a_library_warning_is_printed_once(tmp_path, monkeypatch, capsys):
    """huggingface_hub and datasets attach their own handler and still propagate to the root."""
    import datasets

    library = logging.getLogger("huggingface_hub")
    own = logging.StreamHandler()  # made now, so it writes to the captured stderr
    monkeypatch.setattr(library, "handlers", [own])

    def retrying(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", retrying)
    assert main(["validate", "--model", "gpt2", "--data", "someone/corpus"]) == 0  # validate reads no data
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "x"}])
    assert main(["run", "--model", "gpt2", "--data", "someone/corpus", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert capsys.readouterr().err.count("Retrying in 1s") == 1


def test_run_errors_name_one_based_lines(tmp_path, saved_gpt2, capsys):
    (tmp_path / "docs.jsonl").write_text(
        '{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n'
    )
    config = _run_config(tmp_path, saved_gpt2)
    assert main(["run", str(config), "-q"]) == 2
    assert "docs.jsonl: line 1 and " in (err := _error(capsys)) and "docs.jsonl: line 4)" in err


def _pairs_file(folder: Path, rows: list[dict]) -> str:
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "ids, words",
    [
        ([1, "1"], ["line 2", "'1'", "unique"]),
        (["a", ["x", 1]], ["line 2", "list", "string or a number"]),
        (["a", None], ["line 2", "null"]),
    ],
    ids=["1-and-'1'", "list", "null"],
)
def test_pairs_refuses_ids_lmeval_run_refuses(ids, words, tmp_path, saved_gpt2, capsys):
    rows = [{"id": i, "sentence_good": "The dog sleeps.", "sentence_bad": "The dog sleep."} for i in ids]
    assert main(["pairs", _pairs_file(tmp_path, rows), "--model", str(saved_gpt2)]) == 2
    err = _error(capsys)
    assert all(w in err for w in words), err


def test_pairs_names_a_missing_output_folder_not_the_disk(tmp_path, saved_gpt2, capsys):
    rows = [{"sentence_good": "The dog sleeps.", "sentence_bad": "The dog sleep."}]
    out = tmp_path / "no" / "such" / "x.csv"
    assert main(["pairs", _pairs_file(tmp_path, rows), "--model", str(saved_gpt2), "--output", str(out)]) == 2
    err = _error(capsys)
    assert "does not exist" in err and str(out.parent) in err and "disk" not in err


def test_pairs_join_context_and_sentence_verbatim_and_warn_when_they_touch(gpt2_pair, caplog):
    good, bad = ["He loved himself.", " He loved himself."], ["Himself loved he.", " Himself loved he."]
    with caplog.at_level(logging.WARNING):
        table = lmeval.minimal_pairs(good, bad, gpt2_pair, ["David wept.", "David wept."], bootstrap=0)
    assert "1 pair(s) join context and sentence with no whitespace" in caplog.text and "pair 1 (id 0)" in caplog.text
    assert "'David wept.He loved himself.'" in caplog.text
    # Verbatim, as lmeval run joins data.context_field: the same numbers as score_texts(contexts=...).
    alone = lmeval.score_texts(good, gpt2_pair, contexts=["David wept."] * 2)
    np.testing.assert_allclose(-table["logprob_good"], alone.groupby("doc_id").nll.sum().astype(np.float64), rtol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lmeval.minimal_pairs(good[:1], bad[:1], gpt2_pair, ["David wept. "], bootstrap=0)
    assert "no whitespace" not in caplog.text


def test_words_keep_the_top_k_alternatives_in_every_view(saved_gpt2, tmp_path, capsys):
    page = tmp_path / "words.html"
    assert (
        main(
            [
                "surprisal",
                "--model",
                str(saved_gpt2),
                "--words",
                "--top-k",
                "3",
                "--format",
                "json",
                "--html",
                str(page),
                "The quick brown fox.",
            ]
        )
        == 0
    )
    words = json.loads(capsys.readouterr().out)
    assert [w["word"] for w in words] == ["The", "quick", "brown", "fox."]
    assert all(len(w["topk"]) == 3 for w in words)
    html = page.read_text()
    assert html.count('"topk": [{"token"') + html.count('"topk":[{"token"') == len(words)


def test_validate_checks_what_run_refuses(tmp_path, saved_gpt2, monkeypatch, capsys):
    import pyarrow as pa

    monkeypatch.chdir(tmp_path)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved_gpt2 / name, no_weights / name)
    pq.write_table(pa.table({"body": ["one text", "another"]}), tmp_path / "docs.parquet")
    write_jsonl(tmp_path / "chats.jsonl", [{"id": 1, "text": "x"}])
    cases = [
        (
            ["--model", str(no_weights), "--data", "docs.parquet", "data.text_field=body"],
            ["no-weights must hold model weights"],
        ),
        (["--model", str(saved_gpt2), "--data", "docs.parquet"], ["data.text_field: 'text' must be a column", "body"]),
        (
            ["--model", str(saved_gpt2), "--data", "chats.jsonl", "data.messages_field=messages"],
            ["data.messages_field: 'messages' must be a column", "id, text"],
        ),
    ]
    for argv, words in cases:
        assert main(["validate", *argv]) == 2, argv
        err = _error(capsys)
        assert all(w in err for w in words), err
    assert main(["validate", "--model", str(saved_gpt2), "--data", "docs.parquet", "data.text_field=body"]) == 0


def _with_untrimmed_offsets(saved_gpt2: Path, folder: Path) -> Path:
    """The model with a tokenizer whose 'Ġlazy' span starts at its space, as GPT-2's own does."""
    shutil.copytree(saved_gpt2, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"]["trim_offsets"] = False
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def test_the_straddling_warning_is_said_once_and_only_for_a_real_straddle(tmp_path, saved_gpt2, caplog):
    model = _with_untrimmed_offsets(saved_gpt2, tmp_path / "untrimmed")
    ordinary = [
        {"id": f"space{i}", "ctx": "The quick brown fox jumps over the ", "text": "lazy dog."} for i in range(3)
    ]
    inside = [
        {"id": f"word{i}", "ctx": "The quick brown fox jumps over the lazy dog; the dog sl", "text": "eeps on."}
        for i in range(3)
    ]
    write_jsonl(tmp_path / "docs.jsonl", ordinary + inside)
    config = _run_config(tmp_path, model, "", "docs.jsonl")
    with caplog.at_level(logging.WARNING):
        lmeval.run(str(config), ["data.context_field=ctx", "output.part_chars=10"], show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if "straddling" in r.getMessage()]
    assert len(warnings) == 1 and "'word0'" in warnings[0], warnings


def test_a_whitespace_only_continuation_has_no_rows(gpt2_pair):
    table = lmeval.surprisal_table(["  ", "The dog."], gpt2_pair, words=True, contexts=["Hello.", "Hello. "])
    assert set(table["doc_id"]) == {1} and "" not in set(table["word"].str.strip())
    frame = lmeval.score_texts(["\n ", "The dog."], gpt2_pair, contexts=["Hello.", "Hello. "])
    assert set(frame["doc_id"]) == {1} and frame.attrs["n_empty"] == 1
    frame = lmeval.score_texts(["\n ", "The dog."], gpt2_pair)
    assert set(frame["doc_id"]) == {1} and frame.attrs["n_empty"] == 1


def test_surprisal_baseline_with_another_tokenizer_speaks_in_flags(tmp_path, saved_gpt2, capsys):
    from conftest import build_model, train_bpe

    tokenizer = train_bpe(tmp_path, vocab_size=300)
    other = tmp_path / "other"
    build_model("gpt2", len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(["surprisal", "--model", str(other), "--baseline", str(saved_gpt2), "Some text."]) == 2
    err = _error(capsys)
    assert "--baseline" in err and "compare.divergence" not in err and "identical tokenizers" in err


def test_yaml_syntax_errors_name_the_file(tmp_path, capsys):
    config = write_config(tmp_path, "models: [{path: m}\ndata: {path: docs.jsonl}\n")
    assert main(["validate", str(config)]) == 2
    err = _error(capsys)
    assert f'in "{config}", line 1' in err and "<unicode string>" not in err


def test_output_errors_spell_the_fix_for_each_caller(tmp_path, saved_gpt2, capsys):
    config = _run_config(tmp_path, saved_gpt2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.csv").write_text("old\n")
    with pytest.raises(OutputError, match=r"Pass overwrite=True \(--overwrite on the command line\)"):
        lmeval.run(str(config), show_progress=False)
    assert main(["run", str(config), "-q"]) == 2
    err = _error(capsys)
    assert "Pass --overwrite to replace them" in err and "overwrite=True" not in err


def test_load_model_shows_its_keywords():
    import dataclasses

    parameters = inspect.signature(lmeval.load_model).parameters
    for spec_field in dataclasses.fields(lmeval.ModelSpec):
        if spec_field.name != "path":
            assert parameters[spec_field.name].default == spec_field.default, spec_field.name
    assert parameters["dtype"].kind is inspect.Parameter.KEYWORD_ONLY


def test_a_shipped_config_writes_where_out_says(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["run", "lm_eval_wikitext", "--model", "gpt2", "--out", "mine", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["dir"] == str(tmp_path / "mine")
    assert main(["run", "lm_eval_wikitext", "--model", "gpt2", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["dir"] == str(tmp_path / "runs" / "lm_eval_wikitext")


@pytest.mark.parametrize(
    "messages, words",
    [
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "robot", "content": "Hello."},
                {"role": "assistant", "content": "Yes."},
            ],
            ["[1]", "'robot'", "system, developer, user, assistant, tool"],
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
            ["[1]", "assistant turn must have content"],
        ),
    ],
    ids=["unknown-role", "empty-assistant-turn"],
)
def test_chat_roles_the_project_does_not_know_and_empty_turns_are_refused(messages, words):
    from lmeval.producers.text import check_messages

    with pytest.raises(DataError) as caught:
        check_messages(messages, "conversation 'c1'")
    assert all(w in str(caught.value) for w in words), str(caught.value)


# --------------------------------------------------------------------------------------
# 6. Figures, and the detokenizer with a context
# --------------------------------------------------------------------------------------


def test_the_divergence_trend_is_linear_over_a_narrow_range():
    from lmeval.analyses import plots
    from lmeval.core.sketch import QuantileSketch

    kl = QuantileSketch().add(np.linspace(1.07, 1.36, 50))
    narrow = plots.plot_divergence({"m": (kl, np.linspace(1.07, 1.36, 50), np.ones(50))}, "base")
    assert narrow.axes[1].get_yscale() == "linear"
    wide = plots.plot_divergence({"m": (kl, np.geomspace(0.01, 2.0, 50), np.ones(50))}, "base")
    assert wide.axes[1].get_yscale() == "log"


def test_the_checkpoint_legend_names_an_interval_only_when_one_is_drawn():
    from lmeval.analyses import plots

    summary = pd.DataFrame({"model": ["step-1", "step-2"], "ppl": [30.0, 20.0], "bits_per_byte": [2.0, 1.8]})
    compare = pd.DataFrame(
        {
            "model": ["step-2"] * 2,
            "baseline": ["step-1"] * 2,
            "metric": ["ppl", "bits_per_byte"],
            "baseline_value": [30.0, 2.0],
            "ratio_ci_low": [np.nan] * 2,
            "ratio_ci_high": [np.nan] * 2,
        }
    )
    fig = plots.plot_checkpoints(summary, compare)
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert "model" in labels and not any("CI" in label for label in labels)
    assert "error bars" not in fig._suptitle.get_text() and "no interval" in fig._suptitle.get_text()
    compare = compare.assign(ratio_ci_low=0.6, ratio_ci_high=0.7)
    labels = [t.get_text() for ax in plots.plot_checkpoints(summary, compare).axes for t in ax.get_legend().get_texts()]
    assert "model (95% CI vs baseline)" in labels


def test_the_detokenizer_keeps_and_rewrites_a_context(tmp_path):
    from lmeval.engine.config import DataConfig
    from lmeval.engine.data import load_documents

    write_jsonl(tmp_path / "docs.jsonl", [{"text": "a @-@ b", "ctx": "c @,@ d "}])
    corpus = load_documents(DataConfig(path=str(tmp_path / "docs.jsonl"), detokenizer="wikitext", context_field="ctx"))
    (document,) = corpus.documents
    assert (document.text, document.source, document.context) == ("a-b", "a @-@ b", "c,d ")
