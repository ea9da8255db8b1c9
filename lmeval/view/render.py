"""Show a surprisal table: coloured text in a terminal, or one self-contained HTML page.

Presentation only: these functions take the tables of `lmeval.surprisal` (token or word
level) and the original texts, and never run a model. Colour follows surprisal in bits on
a FIXED scale (0 to `SCALE_BITS`), so two pages or two models are comparable by eye.

Every character of a document is untrusted: in HTML it is escaped (element text with
`html.escape`, the embedded JSON with ``<``, ``>`` and ``&`` as ``\\u003c`` ...) and the
page's script only ever writes ``textContent``; in a terminal, control characters are
shown as visible symbols, so a document cannot send escape sequences.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..engine.files import atomic_write
from ..errors import OutputError

SCALE_BITS = 20.0  # top of the colour scale; anything above is drawn as the top colour
# xterm-256 backgrounds from pale green (expected) to dark red (surprising), one per 2 bits.
_ANSI_STEPS = (194, 193, 229, 228, 222, 216, 210, 203, 196, 160)
_RESET = "\x1b[0m"


def unit_column(table: pd.DataFrame) -> str:
    """'word' for a word table, 'token' for a token table."""
    return "word" if "word" in table.columns else "token"


def segments(table: pd.DataFrame, text: str) -> list[tuple[int | None, str]]:
    """The text cut into ``(row, piece)`` in order; ``row`` is None for text between units.

    Every row gets exactly one piece. Spans may overlap (byte tokens of one character share
    its span; a Metaspace '▁' may cover the next letter), so each character is shown once,
    in the first row that covers it; later rows on the same characters get an empty piece.
    """
    out: list[tuple[int | None, str]] = []
    cursor = 0
    for row, (start, end) in enumerate(zip(table["char_start"].to_numpy(), table["char_end"].to_numpy())):
        start, end = int(start), int(end)
        if start > cursor:
            out.append((None, text[cursor:start]))
        out.append((row, text[max(start, cursor) : end] if end > cursor else ""))
        cursor = max(cursor, end)
    if cursor < len(text):
        out.append((None, text[cursor:]))
    return out


# --------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------


def visible(text: str, keep_newlines: bool = True) -> str:
    """Control characters as visible symbols (U+2400 block), so text cannot drive a terminal."""
    out = []
    for ch in text:
        code = ord(ch)
        if keep_newlines and ch in "\n\t":
            out.append(ch)
        elif code < 0x20:
            out.append(chr(0x2400 + code))
        elif code == 0x7F:
            out.append("\u2421")
        elif 0x80 <= code < 0xA0 or unicodedata.category(ch) in ("Zl", "Zp"):
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def display_width(text: str) -> int:
    """Terminal columns: wide CJK and emoji take two, combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _ansi_background(bits: float) -> str:
    step = min(int(max(bits, 0.0) / (SCALE_BITS / len(_ANSI_STEPS))), len(_ANSI_STEPS) - 1)
    fg = 231 if step >= len(_ANSI_STEPS) - 2 else 16
    return f"\x1b[48;5;{_ANSI_STEPS[step]}m\x1b[38;5;{fg}m"


def _legend() -> str:
    width = SCALE_BITS / len(_ANSI_STEPS)
    cells = [f"{_ansi_background(k * width)} {k * width:g}+ {_RESET}" for k in range(len(_ANSI_STEPS))]
    return "surprisal (bits): " + "".join(cells)


def _coloured_text(table: pd.DataFrame, text: str) -> str:
    bits = table["surprisal_bits"].to_numpy(dtype=float)
    out = []
    for row, piece in segments(table, text):
        piece = visible(piece)
        if row is None or not piece:
            out.append(piece)
            continue
        # Colour each line separately, so a background never runs across a line break.
        style = _ansi_background(bits[row])
        out.append("\n".join(f"{style}{line}{_RESET}" if line else "" for line in piece.split("\n")))
    return "".join(out)


def _fit(cell: str, width: int) -> str:
    """``cell`` cut to at most ``width`` columns (with '…'), padded to exactly ``width``."""
    if display_width(cell) > width:
        while display_width(cell) > width - 1:
            cell = cell[:-1]
        cell += "…"
    return cell + " " * (width - display_width(cell))


COVARIATE_COLUMNS = ("length_chars", "frequency_zipf", "unigram_logfreq")  # shown when a word table has them


def format_table(table: pd.DataFrame, max_width: int = 24) -> str:
    """An aligned plain-text table: unit, surprisal_bits, rank, prob (and the word
    covariates a word table was asked for; NaN where a word has no frequency)."""
    unit = unit_column(table)
    labels = [visible(str(t), keep_newlines=False) for t in table[unit]]
    width = min(max([display_width(s) for s in labels] + [len(unit)]), max_width)
    extra = [c for c in COVARIATE_COLUMNS if c in table.columns]
    lines = [
        f"{_fit(unit, width)}  {'surprisal_bits':>14}  {'rank':>8}  {'prob':>10}" + "".join(f"  {c}" for c in extra)
    ]
    for i, (label, bits, rank, prob) in enumerate(zip(labels, table["surprisal_bits"], table["rank"], table["prob"])):
        cells = "".join(f"  {table[c].iloc[i]:>{len(c)}.{0 if c == 'length_chars' else 2}f}" for c in extra)
        lines.append(f"{_fit(label, width)}  {bits:14.3f}  {int(rank):8d}  {prob:10.4g}" + cells)
    return "\n".join(lines)


def render_terminal(table: pd.DataFrame, text: str, *, color: bool) -> str:
    """One document for a terminal: a summary line, the text, and a table of its units.

    With ``color`` each token (or word) gets a background by its surprisal in bits on the
    fixed 0-`SCALE_BITS` scale (xterm 256 colours), with a legend line; without it the
    output has no escape codes at all.
    """
    unit = unit_column(table)
    total = float(table["surprisal_bits"].sum())
    n = len(table)
    head = f"{n} {unit}s, {total:.3f} bits in all, {total / n:.3f} bits per {unit}" if n else f"no scored {unit}s"
    body = _coloured_text(table, text) if color else visible(text)
    parts = [head] + ([_legend()] if color else []) + [body, "", format_table(table)]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------


def heat_colour(bits: float) -> str:
    """A CSS colour for a surprisal: green at 0 bits to red at `SCALE_BITS` and above."""
    t = min(max(bits, 0.0) / SCALE_BITS, 1.0) if math.isfinite(bits) else 1.0
    return f"hsl({120 * (1 - t):.0f},85%,{88 - 38 * t:.0f}%)"


def script_json(value) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>``, ``&`` and line separators are
    written as \\u escapes, so ``</script>`` in a document cannot end the element."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    for ch in "<>&\u2028\u2029":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _rows(table: pd.DataFrame) -> list[dict]:
    """The embedded data of one table: what the tooltip and the sortable table show."""
    unit = unit_column(table)
    text_col = "token_text" if unit == "token" else "word"
    index_col = "position" if unit == "token" else "word_index"
    entropy = table["entropy_bits"] if "entropy_bits" in table.columns else [math.nan] * len(table)
    topk: pd.Series | list[list[dict]] = table["topk"] if "topk" in table.columns else [[]] * len(table)
    return [
        {
            "index": int(i),
            "label": str(u),
            "text": str(t),
            "surprisal_bits": _number(s),
            "rank": int(r),
            "prob": _number(p),
            "entropy_bits": _number(h),
            "topk": [{"token": str(a["token"]), "prob": _number(a["prob"])} for a in alts],
        }
        for i, u, t, s, r, p, h, alts in zip(
            table[index_col],
            table[unit],
            table[text_col],
            table["surprisal_bits"],
            table["rank"],
            table["prob"],
            entropy,
            topk,
        )
    ]


def _heat_html(table: pd.DataFrame, text: str) -> str:
    """The text as spans, one per unit, each with its numbers as data attributes."""
    bits = table["surprisal_bits"].to_numpy(dtype=float)
    ranks = table["rank"].to_numpy()
    entropy = table["entropy_bits"].to_numpy(dtype=float) if "entropy_bits" in table.columns else None
    out = []
    for row, piece in segments(table, text):
        if row is None:
            out.append(html.escape(piece))
            continue
        empty = " empty" if not piece else ""
        h = math.nan if entropy is None else float(entropy[row])
        out.append(
            f'<span class="tok{empty}" data-i="{row}" data-surprisal="{float(bits[row])!r}" '
            f'data-rank="{int(ranks[row])}" data-entropy="{h!r}" style="background:{heat_colour(bits[row])}">'
            f"{html.escape(piece)}</span>"
        )
    return "".join(out)


def _section_html(doc_id, table: pd.DataFrame, text: str) -> str:
    unit = unit_column(table)
    total = float(table["surprisal_bits"].sum())
    return (
        f'<section class="doc" data-doc="{html.escape(str(doc_id))}">'
        f"<h2>Document {html.escape(str(doc_id))}</h2>"
        f'<p class="meta">{len(table)} {unit}s, {total:.3f} bits in all</p>'
        f'<div class="heat">{_heat_html(table, text)}</div>'
        f'<div class="table-slot"></div></section>'
    )


def _legend_html() -> str:
    steps = [SCALE_BITS * k / 10 for k in range(11)]
    cells = "".join(f'<span style="background:{heat_colour(b)}">{b:g}</span>' for b in steps)
    return f'<p class="legend">surprisal (bits): {cells}<span class="plus">+</span></p>'


def _tables(tables_by_doc) -> list[tuple[object, pd.DataFrame]]:
    if isinstance(tables_by_doc, pd.DataFrame):
        return [(k, g.reset_index(drop=True)) for k, g in tables_by_doc.groupby("doc_id", sort=True)]
    if isinstance(tables_by_doc, Mapping):
        return [(k, t.reset_index(drop=True)) for k, t in tables_by_doc.items()]
    raise TypeError(
        f"tables_by_doc: must be a mapping doc_id -> DataFrame or one DataFrame (got {type(tables_by_doc).__name__})."
    )


def render_html(tables_by_doc, texts, *, title: str) -> str:
    """One self-contained HTML page (inline CSS and JS, nothing fetched) for some documents.

    ``tables_by_doc`` maps a doc_id to its token (or word) table, or is one table with a
    doc_id column; ``texts[doc_id]`` is that document's text. Each document is drawn as a
    heat map of ``<span class="tok">`` (one per row, with data-surprisal in bits, data-rank
    and data-entropy in bits); hovering one shows its surprisal, rank, entropy and top-k
    alternatives. Below it the page's script builds a sortable table of the same rows.
    """
    docs = _tables(tables_by_doc)
    data = [{"doc_id": str(k), "unit": unit_column(t), "rows": _rows(t)} for k, t in docs]
    sections = "".join(_section_html(k, t, texts[k]) for k, t in docs)
    page, css, js = (_template(name) for name in ("page.html", "page.css", "page.js"))
    return page.format(
        title=html.escape(title),
        legend=_legend_html(),
        sections=sections,
        data=script_json(data),
        css=css,
        js=js,
        script_hash=script_hash(js),
    )


@functools.cache
def _template(name: str) -> str:
    """A file of the page (HTML skeleton, CSS, JS), shipped as package data beside this module."""
    return (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")


def script_hash(js: str) -> str:
    """The Content-Security-Policy hash of the page's one script: defence in depth behind the
    escaping, so even a markup bug could not run a document's script or event handler."""
    return "sha256-" + base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")


def with_script(page: str, js: str) -> str:
    """``page`` with one more inline script at the end of its body, allowed beside the page's own
    by its hash in the Content-Security-Policy (a test or a benchmark driving the page)."""
    page = page.replace("script-src '", f"script-src '{script_hash(js)}' '", 1)
    return page.replace("</body>", f"<script>{js}</script></body>")


def write_html(path, html_text: str) -> Path:
    """Write ``html_text`` to ``path`` atomically: a temporary file beside it, then a rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"html: the folder of {path} must exist (got no folder {path.parent}). Create it first.")
    atomic_write(path, lambda tmp: tmp.write_text(html_text, encoding="utf-8"))
    return path
