"""The bad-input catalogue: every item gets a named error (or a counted skip), exit code 2,
no traceback, and nothing finished is lost."""

import contextlib
import errno
from pathlib import Path

import numpy as np
import pytest
import torch

import lmeval
from conftest import CORPUS, build_model
from helpers import write_config, write_jsonl
from lmeval import ConfigError, ModelError
from lmeval.cli import main

GOOD_DATA = [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)]


@pytest.fixture
def workspace(tmp_path, saved_gpt2):
    write_jsonl(tmp_path / "docs.jsonl", GOOD_DATA)
    body = f"models: [{{name: tiny, path: {saved_gpt2}}}]\ndata: {{path: docs.jsonl, id_field: id}}\noutput: {{dir: out}}\n"
    return tmp_path, write_config(tmp_path, body)


def run_cli(config, *extra):
    return main(["run", str(config), "-q", *extra])


@pytest.mark.parametrize(
    "yaml_text, words",
    [
        ("models: [\n  - {path: x\n", "malformed YAML"),
        ("- just\n- a list\n", "YAML root must be a mapping"),
        ("models: [{path: x}]\ndata: {path: d.jsonl}\nscorng: {}\n", "Did you mean 'scoring'?"),
        ("models: [{path: x, dtyp: float32}]\ndata: {path: d.jsonl}\n", "Did you mean 'dtype'?"),
        (
            "models: [{path: x}]\ndata: {path: d.jsonl}\nscoring: {max_length: twelve}\n",
            "scoring.max_length: must be an integer",
        ),
        (
            "models: [{path: x}]\ndata: {path: d.jsonl}\nscoring: {batch_tokens: 0}\n",
            "scoring.batch_tokens: must be >= 1",
        ),
        (
            "models: [{path: x}]\ndata: {path: d.jsonl}\nscoring: {batch_tokens: -5}\n",
            "scoring.batch_tokens: must be >= 1",
        ),
        (
            "models: [{path: x}]\ndata: {path: d.jsonl}\noutput: {per_token: maybe}\n",
            "output.per_token: must be true or false",
        ),
        ("!!python/object/apply:os.system ['echo pwned']\n", "malformed YAML"),
        ("models: !!python/object/new:dict {}\ndata: {path: d.jsonl}\n", "malformed YAML"),
    ],
)
def test_config_errors(yaml_text, words, tmp_path, capsys):
    config = write_config(tmp_path, yaml_text)
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert str(config) in err  # names the file


def test_python_tags_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    config = write_config(tmp_path, f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        lmeval.load_config(config)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["docs.jsonl"]),  # an empty corpus
        ('{"id": "a", "text": "caf\xe9"}\n'.encode("latin-1"), ["docs.jsonl", "UTF-8", "byte"]),
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', ["docs.jsonl"]),  # a line that is not JSON
        (b'{"id": "a", "body": "x"}\n', ["Available columns: id, body"]),  # a missing text field
        (b'{"id": "a", "text": "fine"}\n{"id": "b", "text": null}\n', ["docs.jsonl: line 2", "'b'", "null"]),
    ],
    ids=["empty", "not-utf8", "not-json", "missing-field", "null-text"],
)
def test_corpus_errors(content, words, workspace, capsys):
    folder, config = workspace
    (folder / "docs.jsonl").write_bytes(content)
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "Traceback" not in err


def test_huge_single_document_is_windowed_not_truncated(tmp_path, gpt2_pair):
    """A 5 MB document: tokenized whole and cut into windows, every token scored once."""
    from lmeval.core.windows import make_windows
    from lmeval.engine.data import Document, tokenize_documents

    _, tokenizer = gpt2_pair
    text = (" ".join(CORPUS) + "\n") * (5 * 2**20 // (len(" ".join(CORPUS)) + 1) + 1)
    assert len(text.encode()) >= 5 * 2**20
    (doc,) = tokenize_documents([Document("big", text)], tokenizer)
    assert doc.offsets[-1, 1] == len(text.rstrip("\n")) or doc.offsets[-1, 1] == len(text)
    windows = make_windows(0, doc.token_ids.tolist(), doc.prefix, 64, 64)
    assert sum(w.n_scored for w in windows) == len(doc.token_ids)


@pytest.mark.slow
def test_huge_single_document_scores(tmp_path, gpt2_pair):
    text = (" ".join(CORPUS) + "\n") * (5 * 2**20 // (len(" ".join(CORPUS)) + 1) + 1)
    table = lmeval.score_texts([text], gpt2_pair, max_length=64, batch_tokens=8192)
    assert table.position.is_monotonic_increasing and np.isfinite(table.nll).all()


def test_model_dir_without_weights(workspace, tmp_path, capsys):
    _folder, config = workspace
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert run_cli(config, f"models.0.path={empty}") == 2
    assert "no model weights" in capsys.readouterr().err


def test_pickle_weights_need_allow_pickle(tmp_path, gpt2_pair):
    model, tokenizer = gpt2_pair
    folder = tmp_path / "pickled"
    model.save_pretrained(folder, safe_serialization=False) if _can_save_pickle() else _save_bin(model, folder)
    tokenizer.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="allow_pickle"):
        lmeval.score_texts(["ok"], str(folder))
    from lmeval.model.loading import load_model
    from lmeval.model.spec import ModelSpec

    lm = load_model(ModelSpec(path=str(folder), allow_pickle=True))
    assert lm.vocab_size == len(tokenizer)


def _can_save_pickle():
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(model, folder):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_vocabulary_mismatch(tmp_path, bpe_tokenizer):
    small = build_model("gpt2", 50)  # 50 embedding rows, but the tokenizer has 400 ids
    with pytest.raises(ModelError, match="embedding rows"):
        lmeval.score_texts([CORPUS[0]], (small, bpe_tokenizer))


def test_max_length_beyond_positions(workspace, capsys):
    _, config = workspace
    assert run_cli(config, "scoring.max_length=100000") == 2
    assert "positions" in capsys.readouterr().err


def test_output_dir_is_a_file(workspace, capsys):
    folder, config = workspace
    (folder / "out").write_text("not a folder")
    assert run_cli(config) == 2
    assert "is a file" in capsys.readouterr().err


def test_read_only_output_dir(workspace, monkeypatch, capsys):
    _folder, config = workspace

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)  # root ignores chmod, so simulate the refusal
    assert run_cli(config) == 2
    assert "cannot write" in capsys.readouterr().err


def test_disk_full_keeps_no_half_file(workspace, monkeypatch, capsys):
    folder, config = workspace
    import pyarrow.parquet as pq

    real = pq.write_table

    def full(table, where, *args, **kwargs):
        real(table, where, *args, **kwargs)  # a partial file exists...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...when the disk fills

    monkeypatch.setattr(pq, "write_table", full)
    assert run_cli(config) == 2
    assert "No space left" in capsys.readouterr().err
    leftovers = [p.name for p in (folder / "out").rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert leftovers == []  # no half-written part under a real name, no temp file


def test_non_finite_logits_name_document_and_position(gpt2_pair):
    _model, tokenizer = gpt2_pair
    broken = build_model("gpt2", len(tokenizer))
    bad_id = tokenizer(" fox", add_special_tokens=False)["input_ids"][0]

    def inject_nan(module, args, kwargs, output):
        """A broken checkpoint: the final hidden state at every input ' fox' is NaN."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        output.last_hidden_state[ids == bad_id] = float("nan")

    broken.transformer.register_forward_hook(inject_nan, with_kwargs=True)
    texts = [CORPUS[0], CORPUS[1]]  # CORPUS[1] holds " fox"
    with pytest.raises(ModelError) as info:
        lmeval.score_texts(texts, (broken, tokenizer))
    message = str(info.value)
    ids = tokenizer(CORPUS[1], add_special_tokens=False)["input_ids"]
    assert "document 1" in message and f"position {ids.index(bad_id) + 1}" in message


def test_trust_remote_code_warns(workspace, caplog, monkeypatch):
    from lmeval.model.loading import load_model
    from lmeval.model.spec import ModelSpec

    folder, _ = workspace
    with caplog.at_level("WARNING"), contextlib.suppress(ModelError):
        load_model(ModelSpec(path=str(folder / "no-model"), trust_remote_code=True))
    config = lmeval.load_config(workspace[1])
    assert config.models[0].trust_remote_code is False  # off unless the config sets it
