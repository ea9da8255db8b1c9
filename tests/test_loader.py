"""The public loader: load once, score many times; the caller's model is handed back as it came;
errors name the user's document; the hub commit is part of the resume identity."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

import lmeval
from conftest import CORPUS, build_model
from helpers import write_config, write_jsonl
from lmeval import ModelError, OutputError

run_module = importlib.import_module("lmeval.engine.passes")  # where models load and parts are written


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_load_model_once_score_many_times_without_a_second_probe(saved_gpt2):
    lm = lmeval.load_model(saved_gpt2, dtype="float32", device="cpu")
    assert isinstance(lm, lmeval.LoadedModel) and lm.head.fast and lm.spec.dtype == "float32"
    whole, body = count_calls(lm.model), count_calls(lm.model.base_model)
    first = lmeval.score_texts(CORPUS[:3], lm, max_length=16, batch_tokens=10**6)
    second = lmeval.score_texts(CORPUS[3:], lm, max_length=16, batch_tokens=10**6)
    # One batch each (the budget holds every window): one body forward per call, and no
    # full-model forward at all (the probe ran at load time and is not repeated).
    assert whole == [] and len(body) == 2
    assert len(first) and len(second)
    again = lmeval.score_texts(CORPUS[:3], lm, max_length=16, batch_tokens=10**6)
    np.testing.assert_array_equal(first.nll, again.nll)


def test_load_model_takes_a_spec_and_rejects_unknown_options(saved_gpt2):
    lm = lmeval.load_model(lmeval.ModelSpec(path=str(saved_gpt2), name="mine"))
    assert lm.name == "mine" and lm.commit_sha is None  # a local folder has no hub commit
    with pytest.raises(ModelError, match=r"unknown option.*Known options: name, dtype"):
        lmeval.load_model(saved_gpt2, dtpye="float32")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_pair_comes_back_in_the_mode_it_had(bpe_tokenizer, mode):
    model = build_model("gpt2", len(bpe_tokenizer))  # GPT-2's dropout is 0.1: train mode would change the numbers
    reference = lmeval.score_texts(CORPUS[:2], (model, bpe_tokenizer), max_length=16)
    model.train(mode == "train")
    table = lmeval.score_texts(CORPUS[:2], (model, bpe_tokenizer), max_length=16)
    assert all(m.training == (mode == "train") for m in model.modules())
    np.testing.assert_array_equal(table.nll, reference.nll)  # scored in eval mode all the same


def test_a_non_finite_logit_names_the_users_document(tmp_path, bpe_tokenizer, capsys):
    """A NaN embedding row for a token only book-7 contains poisons book-7 alone; the error
    names book-7, not a window's index within its group."""
    texts = {f"book-{i}": CORPUS[i % 4] for i in range(10)}
    texts["book-7"] = CORPUS[4]  # the only one with 'café' & co.
    others = {t for k, text in texts.items() if k != "book-7" for t in bpe_tokenizer(text)["input_ids"]}
    unique = [t for t in bpe_tokenizer(texts["book-7"])["input_ids"] if t not in others]
    model = build_model("gpt2", len(bpe_tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight[unique[0]] = float("nan")
    model.save_pretrained(tmp_path / "poisoned")
    bpe_tokenizer.save_pretrained(tmp_path / "poisoned")
    write_jsonl(tmp_path / "docs.jsonl", [{"id": k, "text": v} for k, v in texts.items()])
    config = write_config(
        tmp_path,
        f"models: [{{path: {tmp_path / 'poisoned'}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        "scoring: {max_length: 16, batch_tokens: 4096}\noutput: {dir: out, part_chars: 100000}\n",
    )
    from lmeval.cli import main

    assert main(["run", str(config), "-q"]) == 2
    err = capsys.readouterr().err
    assert "non-finite logits at document 'book-7'" in err and "Traceback" not in err


def test_a_moved_hub_commit_is_refused_on_resume_and_recorded(resumable_one_model, monkeypatch):
    folder, config = resumable_one_model
    real_load = run_module.load_model
    commit = {"sha": "a" * 40}

    def load_at_commit(spec):
        lm = real_load(spec)
        lm.commit_sha = commit["sha"]
        return lm

    monkeypatch.setattr(run_module, "load_model", load_at_commit)
    real_write, written = run_module.write_part, []

    def interrupt_after_one(path, columns, meta):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, columns, meta)

    monkeypatch.setattr(run_module, "write_part", interrupt_after_one)
    with pytest.raises(KeyboardInterrupt):
        lmeval.run(str(config), show_progress=False)
    monkeypatch.setattr(run_module, "write_part", real_write)
    commit["sha"] = "b" * 40  # the branch moved between the two runs
    with pytest.raises(OutputError, match=r"commit_sha: 'a{40}' -> 'b{40}'.*--fresh"):
        lmeval.run(str(config), show_progress=False)
    tables = lmeval.run(str(config), fresh=True, show_progress=False)
    record = json.loads((folder / "out" / "run.json").read_text())
    assert tables["run"]["protocol"]["models"]["a"]["commit_sha"] == "b" * 40
    assert record["models"]["a"]["commit_sha"] == "b" * 40


@pytest.fixture
def resumable_one_model(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": CORPUS[i % len(CORPUS)]} for i in range(12)])
    config = write_config(
        tmp_path,
        f"models: [{{name: a, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        "scoring: {max_length: 16}\noutput: {dir: out, part_chars: 150}\n",
    )
    return tmp_path, config
