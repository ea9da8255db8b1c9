"""What `lmeval validate` checks beyond the config's own rules: the files it points at.

Everything here reads the file system and small JSON files only; nothing imports torch,
transformers or datasets, so validating stays instant. The checks:

- a model ``path`` that exists must be a folder; one that does not is a hub id, and validate
  says so (a missing path that does not look like a hub id, such as ``./x``, ``a/b/c`` or
  ``ckpt.bin``, is already refused by `config.build_config`);
- an integer ``scoring.bos`` must be an id of every local model's tokenizer (read from its
  ``tokenizer.json``) and below its ``config.json`` ``vocab_size``;
- ``data.path`` must exist when it names local files (a glob must match), hold files of a
  known format, and not be an empty file; a hub dataset id is named as such.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from pathlib import Path

from ..errors import ConfigError
from ..model.spec import looks_like_hub_id
from .data import BUILDERS, _open_binary, file_format, is_saved_dataset


def check_files(config) -> list[str]:
    """Check ``config`` (a `Config`) against the file system; raise one `ConfigError`
    listing every problem, else return notes saying how each non-local path was read."""
    problems: list[str] = []
    notes: list[str] = []
    for i, model in enumerate(config.models):
        _check_model(model, f"models[{i}]", config.scoring.bos, problems, notes)
    _check_data(config.data, problems, notes)
    if problems:
        raise ConfigError(problems, source=config.source)
    return notes


def _looks_like_path(value: str) -> bool:
    """``./x``, ``../x``, ``~/x``, ``a/b/c`` (more than one slash) or ``x.jsonl``: a path, not an id."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or not looks_like_hub_id(value)


def _check_model(model, where: str, bos, problems: list[str], notes: list[str]) -> None:
    path = Path(model.path).expanduser()
    if path.exists():
        if not path.is_dir():
            problems.append(
                f"{where}.path: must be a `save_pretrained` folder (got the file {model.path}). "
                "Point it at the folder that holds config.json."
            )
            return
        _check_folder_files(path, model.allow_pickle, where, problems)
        if isinstance(bos, int) and not isinstance(bos, bool):
            _check_bos(path, bos, where, problems)
        return
    # A missing path that does not look like a hub id is already refused by `build_config`.
    if not _looks_like_path(model.path):
        notes.append(f"{where}.path {model.path!r}: not a local folder, taken for a hub id")


def _check_folder_files(folder: Path, allow_pickle: bool, where: str, problems: list[str]) -> None:
    """What `load_model` refuses in a local folder, by file name: no weights (safetensors, or
    pickles with ``allow_pickle``), pickles without it, and no tokenizer files."""
    names = [p.name for p in folder.iterdir()]
    pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
    if not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        if not pickled:
            problems.append(
                f"{where}.path: {folder} must hold model weights (*.safetensors) (got none). "
                "Point it at a folder written by `save_pretrained`."
            )
        elif not allow_pickle:
            problems.append(
                f"{where}.path: {folder} holds only pickle weights ({', '.join(pickled)}), which can run "
                f"code when loaded. Convert them to safetensors, or set `allow_pickle: true` for {where} "
                "if you trust the source."
            )
    if not any(_is_tokenizer_file(n) for n in names):
        problems.append(
            f"{where}.path: {folder} must hold tokenizer files (tokenizer.json, or vocab.json and "
            "merges.txt, or tokenizer.model) (got none): without them the tokenizer is empty and every "
            "text would be zero tokens. Save the tokenizer there (`tokenizer.save_pretrained(folder)`)."
        )


def _is_tokenizer_file(name: str) -> bool:
    """A file a tokenizer can be built from (tokenizer_config.json alone cannot)."""
    if name == "tokenizer_config.json":
        return False
    return (
        name.startswith(("tokenizer.", "vocab.", "spiece.", "sentencepiece"))
        or name.endswith((".tiktoken", ".model"))
        or name == "merges.txt"
    )


def local_vocabulary(folder: Path) -> dict[str, int]:
    """Vocabulary bounds a local model folder declares, by file: ``tokenizer.json`` (the largest
    token id + 1, added tokens included) and ``config.json`` (``vocab_size``, the embedding rows).
    A file that is missing or unreadable is left out."""
    sizes = {}
    tokenizer = _read_json(folder / "tokenizer.json")
    if isinstance(tokenizer, dict):
        vocab = (tokenizer.get("model") or {}).get("vocab")
        ids = (
            list(vocab.values())
            if isinstance(vocab, dict)
            else list(range(len(vocab)))
            if isinstance(vocab, list)
            else []
        )
        ids += [t.get("id") for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
        ids = [i for i in ids if isinstance(i, int)]
        if ids:
            sizes["tokenizer.json"] = max(ids) + 1
    config = _read_json(folder / "config.json")
    if isinstance(config, dict):
        size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        if isinstance(size, int) and size > 0:
            sizes["config.json"] = size
    return sizes


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_bos(folder: Path, bos: int, where: str, problems: list[str]) -> None:
    for name, size in local_vocabulary(folder).items():
        if bos >= size:
            problems.append(
                f"scoring.bos: a token id must be below the vocabulary size of {where} ({size}, from {folder / name}) "
                f"(got {bos}). Use auto (the tokenizer's BOS, else EOS), none, or an id the tokenizer has."
            )
            return


def _check_data(data, problems: list[str], notes: list[str]) -> None:
    value = data.path
    if any(c in value for c in "*?["):
        files = sorted(f for f in globlib.glob(os.path.expanduser(value)) if os.path.isfile(f))
        if not files:
            problems.append(
                f"data.path: the pattern {value!r} must match at least one file (got none). Check the pattern."
            )
        _check_files(files, problems, data)
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not is_saved_dataset(path):
            files = sorted(str(f) for f in path.iterdir() if f.is_file() and file_format(f) in BUILDERS)
            if not files:
                problems.append(
                    f"data.path: the folder {value} must hold {', '.join(BUILDERS)} files or a "
                    "`save_to_disk` dataset (got neither). Point data.path at the corpus."
                )
            _check_files(files, problems, data)
        return
    if path.exists():
        _check_files([str(path)], problems, data)
        return
    if _looks_like_path(value) or file_format(value) in BUILDERS:
        problems.append(
            f"data.path: {value} must exist (got no such file or folder). Fix the path; relative paths "
            "in the YAML start at the config's folder."
        )
    else:
        notes.append(f"data.path {value!r}: not a local file or folder, taken for a hub dataset")


def _check_files(files: list[str], problems: list[str], data) -> None:
    formats = sorted({file_format(f) for f in files})
    if len(formats) > 1 or (formats and formats[0] not in BUILDERS):
        problems.append(f"data.path: files must share one of the extensions {', '.join(BUILDERS)} (got {formats}).")
        return
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty and len(empty) == len(files):
        problems.append(
            f"data.path: {empty[0]} must hold documents (got an empty file, 0 bytes). Point data.path at the corpus."
        )
        return
    columns = next((c for c in map(_columns, (f for f in files if f not in empty)) if c is not None), None)
    if columns is not None:
        _check_columns(data, columns, files[0], problems)


def _check_columns(data, columns: list[str], where: str, problems: list[str]) -> None:
    """Each column the config names must be one of the corpus's, as `load_documents` demands."""
    keys = ["messages_field"] if data.messages_field is not None else ["text_field", "context_field"]
    for key in [*keys, "id_field"]:
        name = getattr(data, key)
        if name is not None and name not in columns:
            problems.append(
                f"data.{key}: {name!r} must be a column of {where} (got columns: {', '.join(columns)}). "
                f"Set data.{key} to one of them."
            )


def _columns(path: str) -> list[str] | None:
    """A corpus file's column names, read from its first record (None when they cannot be told
    cheaply: the run then names what it finds)."""
    import csv
    import io

    fmt = file_format(path)
    if fmt == ".txt":
        return ["text"]  # `datasets`' text builder: one column
    try:
        if fmt == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        with _open_binary(path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            if fmt == ".csv":
                return next(csv.reader(text), None)
            if fmt == ".jsonl":
                first = next((line for line in text if line.strip()), "")
                record = json.loads(first)
                return list(record) if isinstance(record, dict) else None
    except Exception:
        return None
    return None
