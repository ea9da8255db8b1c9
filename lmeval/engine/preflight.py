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
from .data import BUILDERS, file_format, is_saved_dataset


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
            problems.append(f"{where}.path: must be a `save_pretrained` folder (got the file {model.path}). "
                            "Point it at the folder that holds config.json.")  # fmt: skip
        elif isinstance(bos, int) and not isinstance(bos, bool):
            _check_bos(path, bos, where, problems)
        return
    # A missing path that does not look like a hub id is already refused by `build_config`.
    if not _looks_like_path(model.path):
        notes.append(f"{where}.path {model.path!r}: not a local folder, taken for a hub id")


def local_vocabulary(folder: Path) -> dict[str, int]:
    """Vocabulary bounds a local model folder declares, by file: ``tokenizer.json`` (the largest
    token id + 1, added tokens included) and ``config.json`` (``vocab_size``, the embedding rows).
    A file that is missing or unreadable is left out."""
    sizes = {}
    tokenizer = _read_json(folder / "tokenizer.json")
    if isinstance(tokenizer, dict):
        vocab = (tokenizer.get("model") or {}).get("vocab")
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
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
            problems.append(f"data.path: the pattern {value!r} must match at least one file (got none). Check the pattern.")
        _check_files(files, problems)
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not is_saved_dataset(path):
            files = sorted(str(f) for f in path.iterdir() if f.is_file() and file_format(f) in BUILDERS)
            if not files:
                problems.append(f"data.path: the folder {value} must hold {', '.join(BUILDERS)} files or a "
                                "`save_to_disk` dataset (got neither). Point data.path at the corpus.")  # fmt: skip
            _check_files(files, problems)
        return
    if path.exists():
        _check_files([str(path)], problems)
        return
    if _looks_like_path(value) or file_format(value) in BUILDERS:
        problems.append(f"data.path: {value} must exist (got no such file or folder). Fix the path; relative paths "
                        "in the YAML start at the config's folder.")  # fmt: skip
    else:
        notes.append(f"data.path {value!r}: not a local file or folder, taken for a hub dataset")


def _check_files(files: list[str], problems: list[str]) -> None:
    formats = sorted({file_format(f) for f in files})
    if len(formats) > 1 or (formats and formats[0] not in BUILDERS):
        problems.append(f"data.path: files must share one of the extensions {', '.join(BUILDERS)} (got {formats}).")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty and len(empty) == len(files):
        problems.append(f"data.path: {empty[0]} must hold documents (got an empty file, 0 bytes). Point data.path at the corpus.")
