"""The package's shape: layered sub-packages whose imports point one way, and a config layer
that never loads torch. See DESIGN.md, "Layers"."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmeval"
# Lower number = lower layer. A module may import its own layer or any layer below.
LAYERS = {
    "errors": 0,
    "core": 1,
    "model": 2,
    "producers": 3,
    "analyses": 3,
    "engine": 4,
    "view": 5,
    "integrations": 5,
    "cli": 6,
}
TOP = 7
# The config's frozen dataclasses are the vocabulary every layer above the model speaks
# (DESIGN.md: analyses import core "and the config's dataclasses"); nothing else points up.
SHARED_UP = {"lmeval.engine.config"}  # lmeval/__init__.py and __main__.py may import anything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return LAYERS[parts[1]]


def imported_modules(path: Path) -> set[str]:
    """Every lmeval module ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lmeval")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lmeval":
                continue
            found.add(target)
            # `from . import x` / `from .pkg import mod` may name submodules
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py"
                ).exists():
                    found.add(candidate)
    found.discard(name)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in MODULES if m != "lmeval" and m.split(".")[1] not in LAYERS and m.split(".")[1] != "__main__"]
    assert unknown == [], f"modules outside every layer: {unknown}; add them to a layer's folder"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(t for t in GRAPH[module] if t in MODULES and layer(t) > layer(module) and t not in SHARED_UP)
    assert upward == [], f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def test_no_circular_imports():
    # Package __init__ files are containers; an import of `lmeval.x.y` passes through them
    # by necessity, so cycles are looked for among modules with code of their own.
    edges = {m: {t for t in targets if t in MODULES and t != "lmeval"} for m, targets in GRAPH.items() if m != "lmeval"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1  # on the current path
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2  # finished, no cycle through it
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "code",
    [
        "import lmeval",
        "import lmeval.engine.config",
        "import lmeval.cli",
        "from lmeval.cli import main; main(['validate', {config!r}])",
    ],
)
def test_config_and_validate_leave_torch_unloaded(code, tmp_path):
    config = tmp_path / "c.yaml"
    (tmp_path / "docs.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    config.write_text("models: [{path: gpt2}]\ndata: {path: docs.jsonl}\n", encoding="utf-8")
    script = code.format(config=str(config)) + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_public_names_resolve_and_run_is_a_function():
    import lmeval

    for name in lmeval.__all__:
        assert getattr(lmeval, name) is not None, name
    assert callable(lmeval.run) and callable(lmeval.load_model) and callable(lmeval.score_texts)
    import lmeval.engine.run as run_module

    assert run_module.run is lmeval.run  # the function lives in a module it does not shadow
