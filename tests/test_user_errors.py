"""Every user error of issue 14 is named: exit 2 through the CLI, no traceback, and a message
that names the file, key or document and the fix. Then the inputs that used to fail and now
load or score correctly: save_to_disk folders, compressed corpora, a BOM, empty texts, and
override paths."""

from __future__ import annotations

import gzip
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lmeval
from conftest import CORPUS
from helpers import write_config, write_jsonl
from lmeval.cli import main
from lmeval.engine.config import DataConfig, load_config
from lmeval.engine.data import load_documents
from lmeval.errors import ModelError

DOCS = [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)]


def _config(folder: Path, model: Path, extra: str = "") -> Path:
    write_jsonl(folder / "docs.jsonl", DOCS)
    body = (
        f"models: [{{name: tiny, path: {model}}}]\ndata: {{path: docs.jsonl, id_field: id}}\n"
        f"scoring: {{max_length: 16, batch_tokens: 256}}\noutput: {{dir: out}}\n{extra}"
    )
    return write_config(folder, body)


def _run(*overrides):
    return lambda folder, model: ["run", str(_config(folder, model)), "-q", *overrides]


def _validate(*overrides):
    return lambda folder, model: ["validate", str(_config(folder, model)), *overrides]


def _yaml(text: str):
    def setup(folder, model):
        write_jsonl(folder / "docs.jsonl", DOCS)
        return ["validate", str(write_config(folder, text.format(model=model)))]

    return setup


def _corpus(content: bytes, name: str = "docs.jsonl"):
    def setup(folder, model):
        config = _config(folder, model)
        (folder / name).write_bytes(content)
        return ["run", str(config), "-q", f"data.path={folder / name}"]

    return setup


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _malicious_pickle(folder, model):
    evil = folder / "evil"
    evil.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (evil / name).write_bytes((model / name).read_bytes())
    torch.save({"transformer.wte.weight": _Payload(folder / "pwned")}, evil / "pytorch_model.bin")
    return ["run", str(_config(folder, model)), "-q", f"models.0.path={evil}", "models.0.allow_pickle=true"]


def _no_payload_ran(folder):
    assert not (folder / "pwned").exists()


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@dataclass
class Case:
    id: str
    setup: Callable  # (folder, saved model folder) -> argv
    words: list[str]
    patch: Callable | None = None  # (monkeypatch) -> None
    after: Callable | None = None  # (folder) -> None: what must (not) have happened


CASES = [
    Case(
        "override-index-not-a-number",
        _validate("models.x.path=elsewhere"),
        ["models.x", "list index must be an integer from 0 to 0", "(got 'x')", "models.0.path="],
    ),
    Case(
        "override-index-out-of-range",
        _run("models.9.path=elsewhere"),
        ["models.9", "models has 1 entry", "(got '9')", "models.0.path="],
    ),
    Case("override-into-a-value", _validate("models.0.path.x=1"), ["models.0.path: must be a section"]),
    Case(
        "device-cuda0-without-cuda",
        _run("models.0.device=cuda:0"),
        ["model tiny", "'cuda:0'", "no CUDA", "device: cpu", "device: auto"],
        patch=_no_cuda,
    ),
    Case(
        "device-cuda-without-cuda",
        _run("models.0.device=cuda"),
        ["model tiny", "'cuda'", "device: cpu"],
        patch=_no_cuda,
    ),
    Case(
        "bos-outside-vocabulary-run", _run("scoring.bos=99999"), ["scoring.bos", "(got 99999)", "tiny-gpt2", "0..399"]
    ),
    Case(
        "bos-outside-vocabulary-validate",
        _validate("scoring.bos=99999"),
        ["scoring.bos", "(got 99999)", "models[0]", "tokenizer.json", "(400"],
    ),
    Case(
        "validate-a-folder",
        lambda folder, model: ["validate", str(_config(folder, model).parent)],
        ["must be a YAML file (got a folder)", "run.yaml", "Pass the file itself"],
    ),
    Case(
        "duplicate-section",
        _yaml(
            "models: [{{path: {model}}}]\nscoring: {{stride: 4}}\ndata: {{path: docs.jsonl}}\n"
            "scoring: {{max_length: 8}}\n"
        ),
        ["run.yaml", "'scoring'", "line 2", "line 4", "Merge the two"],
    ),
    Case(
        "duplicate-key-in-a-section",
        _yaml(
            "models: [{{path: {model}}}]\ndata: {{path: docs.jsonl}}\nscoring:\n"
            "  stride: 4\n  max_length: 8\n  stride: 8\n"
        ),
        ["run.yaml", "'stride'", "line 4", "line 6"],
    ),
    Case(
        "validate-missing-data-path", _validate("data.path=missing.jsonl"), ["data.path", "missing.jsonl", "must exist"]
    ),
    Case(
        "validate-missing-data-folder",
        _validate("data.path=./no-such-folder"),
        ["data.path", "no-such-folder", "must exist"],
    ),
    Case(
        "validate-glob-matching-nothing",
        _validate("data.path=nothing-*.jsonl"),
        ["data.path", "nothing-*.jsonl", "match"],
    ),
    Case(
        "relative-model-path-with-slashes",
        _validate("models.0.path=checkpoints/run-1/final"),
        ["models[0].path", "'checkpoints/run-1/final'", "hub id such as", "Fix the path"],
    ),
    Case(
        "relative-model-path-with-extension",
        _run("models.0.path=model.safetensors"),
        ["models[0].path", "'model.safetensors'", "Fix the path"],
    ),
    Case(
        "list-valued-ids", _corpus(b'{"id": ["a", 1], "text": "x"}\n'), ["docs.jsonl: line 1", "list `id`", "id_field"]
    ),
    Case(
        "dict-valued-ids",
        _corpus(b'{"id": "a", "text": "x"}\n{"id": {"k": 1}, "text": "y"}\n'),
        ["docs.jsonl: line 2", "dict `id`", "id_field"],
    ),
    Case(
        "null-ids",
        _corpus(b'{"id": "a", "text": "x"}\n{"id": null, "text": "y"}\n'),
        ["docs.jsonl: line 2", "null `id`"],
    ),
    Case("zero-byte-file", _corpus(b""), ["docs.jsonl", "must hold documents", "0 bytes"]),
    Case("blank-jsonl", _corpus(b"\n  \n\n"), ["docs.jsonl", "must hold documents", "empty file"]),
    Case("zero-byte-parquet", _corpus(b"", "docs.parquet"), ["docs.parquet", "must hold documents"]),
    Case(
        "damaged-gzip",
        _corpus(b"this is not gzip", "docs.jsonl.gz"),
        ["docs.jsonl.gz", "cannot be read", "BadGzipFile"],
    ),
    Case(
        "malicious-pickle",
        _malicious_pickle,
        ["model tiny", "must hold only tensors", "system", "nothing in them was run", "safetensors"],
        after=_no_payload_ran,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error_is_named(case, tmp_path, saved_gpt2, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # overrides resolve here, as they would in a shell
    if case.patch:
        case.patch(monkeypatch)
    argv = case.setup(tmp_path, saved_gpt2)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("lmeval: error: ")
    for word in case.words:
        assert word in err, f"{word!r} not in {err!r}"
    if case.after:
        case.after(tmp_path)


def test_bos_outside_vocabulary_is_named_by_the_library(gpt2_pair):
    with pytest.raises(ModelError, match=r"scoring\.bos: a token id must be in the vocabulary .* \(got 400\)"):
        lmeval.score_texts(["some text"], gpt2_pair, bos=400)
    assert len(lmeval.score_texts(["some text"], gpt2_pair, bos=399)) > 0  # the last id is in


def test_validate_says_what_was_taken_for_a_hub_id(tmp_path, saved_gpt2, capsys):
    config = _config(tmp_path, saved_gpt2)
    assert main(["validate", str(config), "models.0.path=gpt2", "scoring.bos=99999"]) == 0  # no local tokenizer to read
    out = capsys.readouterr().out
    assert "models[0].path 'gpt2': not a local folder, taken for a hub id" in out
    assert main(["validate", str(config), "models.0.path=EleutherAI/pythia-1.4b", "data.path=wikitext"]) == 0
    out = capsys.readouterr().out
    assert "models[0].path 'EleutherAI/pythia-1.4b': not a local folder, taken for a hub id" in out
    assert "data.path 'wikitext': not a local file or folder, taken for a hub dataset" in out
    assert main(["validate", str(config)]) == 0
    assert "taken for" not in capsys.readouterr().out  # a local folder is said nothing about


# --------------------------------------------------------------------------------------
# Inputs that now load: save_to_disk folders and compressed files
# --------------------------------------------------------------------------------------


def _save_dataset(folder: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(DOCS).save_to_disk(str(folder / "saved"))
    return folder / "saved"


def _save_dataset_dict(folder: Path) -> Path:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(DOCS)}).save_to_disk(str(folder / "saved-dict"))
    return folder / "saved-dict"


def _gzip(name: str, text: str):
    def write(folder: Path) -> Path:
        with gzip.open(folder / name, "wt", encoding="utf-8") as f:
            f.write(text)
        return folder / name

    return write


JSONL = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS)
CSV = pd.DataFrame(DOCS).to_csv(index=False)


@pytest.mark.parametrize(
    "write",
    [
        _save_dataset,
        _save_dataset_dict,
        _gzip("docs.jsonl.gz", JSONL),
        _gzip("docs.json.gz", JSONL),
        _gzip("docs.csv.gz", CSV),
    ],
    ids=["save_to_disk", "save_to_disk-dict", "jsonl.gz", "json.gz", "csv.gz"],
)
def test_saved_and_compressed_corpora_load(write, tmp_path, capsys):
    path = write(tmp_path)
    corpus = load_documents(DataConfig(path=str(path), id_field="id"))
    assert [(d.doc_id, d.text) for d in corpus.documents] == [(d["id"], d["text"]) for d in DOCS]
    config = write_config(tmp_path, f"models: [{{path: gpt2}}]\ndata: {{path: {path}, id_field: id}}\n")
    assert main(["validate", str(config)]) == 0, capsys.readouterr().err


def test_a_saved_dataset_dict_needs_an_existing_split(tmp_path):
    path = _save_dataset_dict(tmp_path)
    with pytest.raises(lmeval.DataError, match=r"data\.split: must be one of the saved splits train .*\(got 'test'\)"):
        load_documents(DataConfig(path=str(path), split="test"))


def test_an_empty_file_among_others_is_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", DOCS)
    (tmp_path / "corpus" / "b.jsonl").write_bytes(b"")
    with caplog.at_level("WARNING"):
        corpus = load_documents(DataConfig(path=str(tmp_path / "corpus")))
    assert len(corpus.documents) == len(DOCS) and "b.jsonl" in caplog.text


# --------------------------------------------------------------------------------------
# A BOM is an encoding mark, never text
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_by", ["document", "line"])
def test_a_bom_txt_scores_exactly_like_the_plain_one(sample_by, tmp_path, gpt2_pair):
    text = "\n\n".join(CORPUS[:3]) + "\n"
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    plain = load_documents(DataConfig(path=str(tmp_path / "plain.txt"), sample_by=sample_by))
    bom = load_documents(DataConfig(path=str(tmp_path / "bom.txt"), sample_by=sample_by))
    assert [d.text for d in bom.documents] == [d.text for d in plain.documents]
    assert not bom.documents[0].text.startswith("\ufeff") and bom.fingerprint == plain.fingerprint
    scored = [lmeval.score_texts([d.text for d in c.documents], gpt2_pair, max_length=16) for c in (plain, bom)]
    pd.testing.assert_frame_equal(scored[0], scored[1])


def test_a_bom_in_a_text_field_and_a_surprisal_file_is_stripped(tmp_path, saved_gpt2, capsys):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "\ufeff" + CORPUS[0]}])
    (doc,) = load_documents(DataConfig(path=str(tmp_path / "docs.jsonl"))).documents
    assert doc.text == CORPUS[0]
    for name, data in (("plain.txt", CORPUS[0].encode()), ("bom.txt", b"\xef\xbb\xbf" + CORPUS[0].encode())):
        (tmp_path / name).write_bytes(data)
        assert main(["surprisal", "--model", str(saved_gpt2), "--file", str(tmp_path / name), "--format", "csv"]) == 0
    plain, bom = capsys.readouterr().out.split("doc_id,", 2)[1:]
    assert plain == bom


# --------------------------------------------------------------------------------------
# Empty inputs give zero rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, bos", [([""], "auto"), (["A"], "none"), (["", "B"], "none")], ids=["empty", "one-token-no-bos", "both"]
)
def test_empty_inputs_give_zero_rows(texts, bos, gpt2_pair):
    frame = lmeval.score_texts(texts, gpt2_pair, bos=bos, top_k=3)
    assert len(frame) == 0 and {"nll", "surprisal_bits", "topk_token_ids"} <= set(frame.columns)
    assert frame.attrs["n_documents"] == len(texts) and frame.attrs["n_empty"] == len(texts)
    for words in (False, True):
        table = lmeval.surprisal_table(texts, gpt2_pair, words=words, bos=bos, top_k=2)
        assert len(table) == 0 and "surprisal_bits" in table.columns


@pytest.mark.parametrize("extra", [[], ["--words"], ["--format", "json"], ["--format", "csv", "--top-k", "2"]])
def test_lmeval_surprisal_of_an_empty_text(extra, saved_gpt2, tmp_path, capsys):
    assert main(["surprisal", "", "--model", str(saved_gpt2), *extra, "--html", str(tmp_path / "p.html")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if "json" in extra:
        assert json.loads(captured.out) == []
    assert (tmp_path / "p.html").is_file()


# --------------------------------------------------------------------------------------
# The README's override rule: override paths resolve against the current directory
# --------------------------------------------------------------------------------------


def test_override_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    home, here = tmp_path / "configs", tmp_path / "shell"
    for folder in (home, here):
        (folder / "models" / "m").mkdir(parents=True)
        write_jsonl(folder / "docs.jsonl", DOCS)
    config = write_config(home, "models: [{path: models/m}]\ndata: {path: docs.jsonl}\noutput: {dir: out}\n")
    monkeypatch.chdir(here)
    from_yaml = load_config(config)
    assert from_yaml.models[0].path == str(home / "models" / "m") and from_yaml.data.path == str(home / "docs.jsonl")
    assert from_yaml.output.dir == str(home / "out")
    loaded = load_config(config, ["models.0.path=models/m", "data.path=docs.jsonl", "output.dir=out"])
    assert loaded.models[0].path == str(here / "models" / "m")  # exists here
    assert loaded.data.path == str(here / "docs.jsonl")
    assert loaded.output.dir == str(here / "out")  # always a folder, so always resolved
    dotted = load_config(config, ["models.0.path=./models/m", "output.dir=../elsewhere"])
    assert dotted.models[0].path == str(here / "models" / "m") and dotted.output.dir == str(tmp_path / "elsewhere")
    assert load_config(config, ["models.0.path=gpt2"]).models[0].path == "gpt2"  # not here: a hub id


def test_values_that_are_not_paths_are_untouched(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    config = write_config(tmp_path, "models: [{path: gpt2}]\ndata: {path: docs.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_config(config, ["data.text_field=text", "scoring.separator=docs.jsonl"])
    assert loaded.data.text_field == "text" and loaded.scoring.separator == "docs.jsonl"
    assert np.isclose(load_config(config, ["calibration.label_smoothing=[1e-5]"]).calibration.label_smoothing[0], 1e-5)
