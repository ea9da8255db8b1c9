"""Render the pages that are generated from the code, as a mkdocs hook (`hooks:` in mkdocs.yml).

- ``glossary.md``: the marker ``<!-- glossary -->`` becomes the table of every column from
  `lmeval.engine.schemas.COLUMNS` (each defined once, with its unit) and the index of which
  table holds which column, from `TABLES` and the Arrow schemas.
- ``api.md``: the marker ``<!-- api -->`` becomes one mkdocstrings block per name that
  ``lmeval/__init__.py`` exports, so the reference follows the public API.

``python docs/gen_glossary.py`` prints the glossary's Markdown.
"""

from __future__ import annotations

import re

GLOSSARY_MARKER = "<!-- glossary -->"
API_MARKER = "<!-- api -->"


def anchor(key: str) -> str:
    """The HTML id of a glossary entry: ``ce_eps{eps}`` -> ``col-ce_eps-eps``."""
    return "col-" + re.sub(r"[^a-z0-9_]+", "-", key.lower()).strip("-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table_columns(table: str) -> list[str]:
    """The glossary keys of ``table``: in file order for a table with an Arrow schema (its
    optional families after), else in glossary order."""
    from lmeval.engine import schemas

    keys = [key for key, column in schemas.COLUMNS.items() if table in column.tables]
    schema = schemas.SCHEMAS.get(table)
    if schema is None:
        return keys
    ordered = [schemas.glossary_key(name) for name in schema.names]
    ordered += [
        schemas.glossary_key(name + "{k}" if name.endswith("_") else name) or name
        for name in schemas.OPTIONAL.get(table, {})
    ]
    return list(dict.fromkeys([k for k in ordered if k] + keys))


def glossary_markdown() -> str:
    """Every column once (unit, meaning, tables), then each table's columns."""
    from lmeval.engine import schemas

    lines = ["| column | unit | meaning | in |", "|---|---|---|---|"]
    for key, column in schemas.COLUMNS.items():
        tables = ", ".join(f"[{t}](#{anchor('table-' + t)})" for t in column.tables)
        lines.append(
            f'| <span id="{anchor(key)}"></span>`{key}` | {_cell(column.unit)} | {_cell(column.meaning)} | {tables} |'
        )
    lines += [
        "",
        "## Tables",
        "",
        "Each table's columns, in the order a file holds them where it has a fixed schema.",
        "",
    ]
    for table, row in schemas.TABLES.items():
        columns = ", ".join(f"[`{key}`](#{anchor(key)})" for key in _table_columns(table))
        lines += [f"### {table} {{ #{anchor('table-' + table)} }}", "", f"{row[0].upper()}{row[1:]}.", "", columns, ""]
    return "\n".join(lines)


def api_markdown() -> str:
    """One mkdocstrings block per public name, from lmeval's own export table (its heading
    is the short name, `lmeval.<name>`, with the signature below it)."""
    import lmeval

    blocks = []
    for name in lmeval.__all__:
        module = lmeval._EXPORTS[name]
        blocks += [f"::: {module}.{name}", ""]
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page, config, files) -> str:  # the mkdocs hook
    if GLOSSARY_MARKER in markdown:
        markdown = markdown.replace(GLOSSARY_MARKER, glossary_markdown())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, api_markdown())
    return markdown


if __name__ == "__main__":
    print(glossary_markdown())
