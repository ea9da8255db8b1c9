"""The bundled offline demo: where its model, data and config live inside the package.

Everything the quick start needs ships in the wheel (package data), so `lmeval demo` works
from an installed package with no clone and no network.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError

PACKAGE = Path(__file__).resolve().parents[1]  # the installed `lmeval` folder
DEMO_OUTPUT = "runs/demo"  # `lmeval demo` writes here, relative to the current folder


def demo_config_path() -> Path:
    """The packaged demo config (two checkpoints of the demo model on held-out books)."""
    return PACKAGE / "configs" / "demo.yaml"


def demo_model_path() -> Path:
    """The bundled demo model's folder; a `ModelError` if it is missing from this install."""
    path = PACKAGE / "assets" / "demo" / "final"
    if not path.is_dir():
        raise ModelError(
            f"model: the bundled demo model must exist at {path} (got no such folder). "
            "Pass a model path or hub id instead, e.g. `--model gpt2`."
        )
    return path


def shipped_config(name: str) -> Path | None:
    """A config shipped in the package's ``configs/`` folder, by name (``lm_eval_wikitext``
    or ``lm_eval_wikitext.yaml``); None when there is no such config."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        return None
    path = PACKAGE / "configs" / f"{stem}.yaml"
    return path if path.is_file() else None


def shipped_config_names() -> list[str]:
    """Names of the configs shipped in the package."""
    return sorted(p.stem for p in (PACKAGE / "configs").glob("*.yaml"))
