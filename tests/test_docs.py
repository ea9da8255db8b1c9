"""The documentation is tested like code.

- Every code block of README.md and docs/*.md runs (Sybil parses the Markdown): ```python
  blocks run in order in one namespace per page; each line of a ```bash block is an
  `lmeval ...` command, run in-process through `lmeval.cli.main` (exit code 0 required,
  `> FILE` redirects its stdout). A block after ``<!-- skip: next "reason" -->`` is skipped
  with that reason (the hub, a GPU, several processes), and nothing else is.
- Every page runs in its own copy of one folder laid out like a clone of the repository
  after the quick start: ``configs/``, ``lmeval`` (the installed package) and ``runs/demo``,
  written once per session by `FIXTURE_COMMAND`, which the docs show.
- The glossary (`lmeval.engine.schemas.COLUMNS`) defines every column of every file that
  run writes, of the Arrow schemas, and of the tables the Python API returns.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import sys
import time
import unittest
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

import lmeval
from lmeval.engine import schemas

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The one demo run every page shares: the quick start's `lmeval demo`, with the divergence
# and membership analyses on, so that every file and column a run can write is there, on
# the first held-out book only (Ruth, 3,373 tokens) to keep this test fast: the whole demo
# is tests/test_demo.py's job.
FIXTURE_COMMAND = (
    "lmeval demo compare.divergence=true analysis.membership=true analysis.reference=early data.max_documents=1"
)
# Fenced blocks must say what they hold; only python and bash blocks run.
LANGUAGES = {"python", "bash", "yaml", "text", "json", "toml"}
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


def run_lmeval(argv: list[str]) -> tuple[int, str, str]:
    """`lmeval ARGV` in this process: (exit code, stdout, stderr)."""
    from lmeval.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help and usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def shell_commands(source: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", source)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def evaluate_bash(example) -> None:
    for command in shell_commands(example.parsed):
        argv = shlex.split(command, comments=True)
        target = None
        if len(argv) >= 2 and argv[-2] == ">":
            argv, target = argv[:-2], argv[-1]
        if not argv or argv[0] != "lmeval" or any(a in ("|", "&&", ";", ">") for a in argv):
            raise AssertionError(
                f"{example.path}:{example.line}: a bash block may only hold `lmeval ...` commands "
                f'(got {command!r}); mark the block <!-- skip: next "why it cannot run here" -->'
            )
        code, out, err = run_lmeval(argv[1:])
        if code != 0:
            raise AssertionError(f"{example.path}:{example.line}: `{command}` exited {code}\n{out}\n{err}")
        if target is not None:
            Path(target).write_text(out, encoding="utf-8")


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser("bash", evaluate_bash), SkipParser()])


def clone_layout(folder: Path) -> Path:
    """``folder`` laid out like the root of a clone: configs/ and lmeval/ (a link to the
    installed package, whose assets hold the demo model)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "configs", folder / "configs")
    (folder / "lmeval").symlink_to(Path(lmeval.__file__).parent, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def demo_clone(tmp_path_factory) -> Path:
    folder = clone_layout(tmp_path_factory.mktemp("clone"))
    before = Path.cwd()
    os.chdir(folder)
    try:
        code, out, err = run_lmeval(shlex.split(FIXTURE_COMMAND)[1:] + ["-q"])
    finally:
        os.chdir(before)
    assert code == 0, out + err
    return folder


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_code_blocks_run(page: Path, demo_clone: Path, tmp_path: Path, monkeypatch) -> None:
    """Every python and bash block of the page runs, in order, in a copy of the demo clone."""
    work = tmp_path / "clone"
    shutil.copytree(demo_clone, work, symlinks=True)
    monkeypatch.chdir(work)
    document = SYBIL.parse(page)
    document.namespace["__name__"] = "__docs__"
    ran, skipped, seconds = 0, [], {}
    for example in document.examples():
        started = time.perf_counter()
        try:
            example.evaluate()
        except unittest.SkipTest as reason:
            skipped.append(f"line {example.line}: {reason}")
            continue
        if example.region.evaluator is not SYBIL.parsers[2].skipper:
            ran += 1
            seconds[example.line] = round(time.perf_counter() - started, 1)
    print(f"\n{page_id(page)}: {ran} blocks ran (seconds by line: {seconds}), {len(skipped)} skipped: {skipped}")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_fences_name_their_language(page: Path) -> None:
    """A fence without a language (or with an untested one such as sh) would escape the runner."""
    opened, problems = None, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line.strip())
        if not match:
            continue
        if opened is None:
            opened = match.group(1)
            language = match.group(2).strip().split(" ")[0]
            if language not in LANGUAGES:
                problems.append(f"line {number}: ```{language}")
        elif match.group(1).startswith(opened) and not match.group(2).strip():
            opened = None
    assert not problems, f"{page_id(page)}: fences must name one of {sorted(LANGUAGES)}: {problems}"


def yaml_blocks(page: Path) -> list[tuple[int, str]]:
    """(line, source) of each ```yaml block of ``page``."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped == "```yaml":
            current, start = [], number
        elif current is not None and stripped == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_yaml_blocks_use_real_keys(page: Path) -> None:
    """Every key of a config shown in the docs is a field of the config's dataclasses."""
    import dataclasses

    from lmeval.engine import config as config_module
    from lmeval.model.spec import ModelSpec

    sections = {f.name: f.type for f in dataclasses.fields(config_module.Config)}
    classes = {
        "data": config_module.DataConfig,
        "scoring": config_module.ScoringConfig,
        "output": config_module.OutputConfig,
        "calibration": config_module.CalibrationConfig,
        "compare": config_module.CompareConfig,
        "analysis": config_module.AnalysisConfig,
    }
    for line, source in yaml_blocks(page):
        raw = config_module.safe_load(source)
        where = f"{page_id(page)}:{line}"
        assert isinstance(raw, dict) and set(raw) <= set(sections) - {"source"}, f"{where}: {raw}"
        for section, value in raw.items():
            if section == "models":
                allowed = {f.name for f in dataclasses.fields(ModelSpec)} | {"glob"}
                assert all(set(entry) <= allowed for entry in value), f"{where}: {value}"
            else:
                assert set(value) <= {f.name for f in dataclasses.fields(classes[section])}, f"{where}: {value}"


def test_skips_give_a_reason() -> None:
    for page in PAGES:
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("<!-- skip:"):  # a directive (a mention in prose sits in backticks)
                assert re.search(r'<!-- skip: next "[^"]{10,}" -->', line), f"{page_id(page)}: {line}"


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert 'pip install -e ".[dev]" && lmeval demo\npython -m pytest\n' in text  # the quick start, unchanged


# --------------------------------------------------------------------------------------
# The glossary
# --------------------------------------------------------------------------------------


def missing_entries(table: str, columns) -> list[str]:
    """Columns of ``table`` with no glossary entry, or whose entry does not list the table."""
    problems = []
    for column in columns:
        key = schemas.glossary_key(column)
        if key is None:
            problems.append(f"{table}: {column} has no entry in lmeval/engine/schemas.py COLUMNS")
        elif table not in schemas.COLUMNS[key].tables:
            problems.append(f"{table}: {column} is defined as {key!r}, whose tables omit {table}")
    return problems


def test_glossary_covers_every_file_of_a_demo_run(demo_clone: Path) -> None:
    out = demo_clone / "runs" / "demo"
    written = {
        p.name: (
            pq.read_schema(p).names
            if p.suffix == ".parquet"
            else p.read_text(encoding="utf-8").splitlines()[0].split(",")
        )
        for p in sorted(out.iterdir())
        if p.suffix in (".csv", ".parquet")
    }
    assert {"tokens.parquet", "documents.parquet", "divergence.parquet", "divergence.csv", "compare.csv"} <= set(
        written
    )
    assert "mink_pp_20" in written["documents.parquet"] and "ref_ratio" in written["documents.parquet"]
    problems = [p for table, columns in written.items() for p in missing_entries(table, columns)]
    assert not problems, "\n".join(problems)
    assert set(written) <= set(schemas.TABLES), (
        f"files the glossary does not describe: {set(written) - set(schemas.TABLES)}"
    )


def test_glossary_covers_the_schemas_and_the_writers_column_lists() -> None:
    """Without a run: the Arrow schemas, their optional families, and each writer's column list."""
    from lmeval.analyses import compare, divergence, documents, positions
    from lmeval.producers import pairs
    from lmeval.view import divergence as view_divergence
    from lmeval.view import surprisal

    tables = {name: schema.names for name, schema in schemas.SCHEMAS.items()}
    tables["documents.parquet"] = tables["documents.parquet"] + [
        f"{name}10" if name.endswith("_") else name for name in schemas.OPTIONAL["documents.parquet"]
    ]
    tables |= {
        "documents.parquet ": documents.DOCUMENT_COLUMNS,  # the writer's list, beside the schema
        "compare.csv": compare.COMPARE_COLUMNS + compare.EXTRA_COLUMNS,
        "compare_tokens.csv": compare.TOKEN_DIFF_COLUMNS,
        "divergence.csv": divergence.SUMMARY_COLUMNS,
        "divergence_tokens.csv": divergence.TOP_TOKEN_COLUMNS,
        "positions.csv": positions.POSITION_COLUMNS,
        "minimal_pairs()": pairs.PAIR_COLUMNS,
        "surprisal_table(words=True)": surprisal.WORD_TABLE_COLUMNS,
        "lmeval surprisal --baseline": view_divergence.VIEW_COLUMNS,
    }
    problems = [p for table, columns in tables.items() for p in missing_entries(table.strip(), columns)]
    assert not problems, "\n".join(problems)


def test_glossary_covers_the_python_api_tables() -> None:
    """The tables the Python API returns, on the demo model (columns asked for included)."""
    from lmeval.engine.demo import demo_model_path
    from lmeval.producers.chat import score_chats, turn_table
    from lmeval.view.divergence import divergence_table

    lm = lmeval.load_model(demo_model_path())
    early = str(demo_model_path().parent / "early")
    texts, contexts = ["sat on the mat."], ["The cat "]
    tables = {
        "score_texts()": lmeval.score_texts(texts, lm, top_k=2, contexts=contexts).columns,
        "surprisal_table()": lmeval.surprisal_table(texts, lm, top_k=2, contexts=contexts).columns,
        "surprisal_table(words=True)": lmeval.surprisal_table(texts, lm, words=True, contexts=contexts).columns,
        "minimal_pairs()": lmeval.minimal_pairs(["The cat sat."], ["The cat sit."], lm, contexts=["Once, "]).columns,
        "lmeval surprisal --baseline": divergence_table(texts, lm, early).columns,
    }
    lm.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chats = score_chats([[{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "God."}]], lm)
    tables["score_chats()"] = [c for c in chats.columns if c not in tables["score_texts()"]]
    tables["turn_table()"] = turn_table(chats).columns
    problems = [p for table, columns in tables.items() for p in missing_entries(table, columns)]
    assert not problems, "\n".join(problems)


def test_glossary_page_defines_each_column_once() -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_glossary
    finally:
        sys.path.remove(str(ROOT / "docs"))
    page = gen_glossary.glossary_markdown()
    for key in schemas.COLUMNS:
        assert page.count(f'<span id="{gen_glossary.anchor(key)}"></span>') == 1, key
    ids = re.findall(r'id="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    for key, column in schemas.COLUMNS.items():
        assert column.unit and column.meaning and column.tables, key
        assert set(column.tables) <= set(schemas.TABLES), key


# --------------------------------------------------------------------------------------
# The habits of a well-kept project
# --------------------------------------------------------------------------------------


def test_version_is_written_once() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert lmeval.__version__ == declared, (
        f"lmeval.__version__ {lmeval.__version__} != pyproject.toml's {declared}: reinstall (pip install -e .)"
    )
    stray = [
        p
        for p in (ROOT / "lmeval").rglob("*.py")
        if re.search(r"__version__\s*=\s*[\"']\d+\.\d+", p.read_text("utf-8"))
    ]
    assert not stray, f"a version literal outside pyproject.toml: {stray}"


def test_layout_lists_every_module() -> None:
    """docs/development.md's layout table names every module of the package, and no other."""
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|", text, flags=re.MULTILINE)
    listed = {
        f"{folder}/{name}" if folder != name else name
        for folder, modules in rows
        for name in re.findall(r"`(\w+)`", modules)
    }
    package = ROOT / "lmeval"
    actual = {str(p.relative_to(package).with_suffix("")) for p in package.rglob("*.py") if p.stem != "__init__"}
    actual.discard("__main__")
    assert listed == actual, f"missing: {sorted(actual - listed)}; not modules: {sorted(listed - actual)}"
