"""What a result was computed from: package versions and fingerprints of models and data.

Written into run.json so that a number can be traced to the exact weights, texts and code,
and so that a resumed or compared run can refuse to mix different inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from ..model.fingerprint import tokenizer_fingerprint  # noqa: F401  (re-exported: run.json's record)

PACKAGES = ("lmeval", "torch", "transformers", "tokenizers", "datasets", "numpy", "pandas", "pyarrow", "accelerate")
# Weight files above this size are fingerprinted by size plus their first and last bytes;
# hashing tens of GB on every run would cost more than the scoring of a small corpus.
_FULL_HASH_LIMIT = 2**30
_EDGE_BYTES = 16 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha256, how): the full hash, or for very large files size + first/last 16 MB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(2**22), b""):
                digest.update(block)
            return digest.hexdigest(), "sha256"
        digest.update(size.to_bytes(8, "little"))
        digest.update(f.read(_EDGE_BYTES))
        f.seek(size - _EDGE_BYTES)
        digest.update(f.read(_EDGE_BYTES))
    return digest.hexdigest(), "sha256(size, first 16 MB, last 16 MB)"


def fingerprint_model(path: str, revision: str | None) -> dict:
    """For a local folder, each weight, config and tokenizer file's size and hash; for a hub
    id, the requested revision. A run asks twice (resume identity, run.json); hashing
    gigabytes twice would be waste, so results are cached while no file's size or mtime changes."""
    folder = Path(path)
    files = (
        sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    )
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return dict(_fingerprint(path, revision, folder.is_dir(), stamp))


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, revision: str | None, is_dir: bool, stamp: tuple) -> dict:
    out: dict = {"path": path}
    if is_dir:
        out["files"] = {}
        for name, size, _ in stamp:
            digest, how = _hash_file(Path(path) / name)
            out["files"][name] = {"bytes": size, "hash": digest, "method": how}
    else:
        out["revision"] = revision
    out["fingerprint"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    return out
