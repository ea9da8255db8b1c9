"""Where did the fine-tune change the model's mind? Each token coloured by how much a model
moved from its baseline, for a terminal or one self-contained HTML page.

The colour is either ΔNLL, the change of the token's surprisal in bits (model minus
baseline: blue where the model finds the true token likelier than the baseline did, red
where less likely), or ``kl``, KL(P_baseline || P_model) in nats, how far the whole
next-token distribution moved whatever the true token was. Both scales are FIXED
(`DELTA_SCALE_BITS`, `KL_SCALE_NATS`), so two pages are comparable by eye. Text is escaped
exactly as in `render` (the page's script only writes ``textContent``).
"""

from __future__ import annotations

import html
import math
from typing import cast

import numpy as np
import pandas as pd

from ..core.units import LN2
from ..engine.data import check_texts
from ..engine.demo import demo_model_path
from ..errors import DataError
from ..producers.divergence import divergence
from .render import _template, display_width, script_hash, script_json, segments, visible
from .surprisal import check_spans

BY = ("delta_nll", "kl")
DELTA_SCALE_BITS = 8.0  # ± this many bits is the end of the diverging scale
KL_SCALE_NATS = 2.0  # this KL is the end of the sequential scale
VIEW_COLUMNS = [
    "doc_id",
    "position",
    "token_id",
    "token",
    "token_text",
    "char_start",
    "char_end",
    "surprisal_bits",
    "surprisal_bits_baseline",
    "delta_bits",
    "prob",
    "prob_baseline",
    "delta_p",
    "kl",
    "kl_reverse",
    "same_top1",
    "nll",
    "nll_baseline",
]


def divergence_table(texts, model, baseline, *, bos="auto", max_length: int | None = None) -> pd.DataFrame:
    """Per-token view of ``model`` (None: the bundled demo model) against ``baseline``:
    `VIEW_COLUMNS`. ``surprisal_bits`` / ``surprisal_bits_baseline`` are each model's
    -log2 q(token), ``delta_bits`` their difference (model minus baseline, bits), ``prob`` /
    ``prob_baseline`` the token's probability under each, and ``kl``, ``kl_reverse`` (nats),
    ``delta_p``, ``same_top1`` as in `lmeval.divergence`."""
    texts = check_texts(texts)
    frame = divergence(texts, demo_model_path() if model is None else model, baseline, bos=bos, max_length=max_length)
    check_spans(frame, texts)
    nll, base = frame["nll"].to_numpy(np.float64), frame["nll_baseline"].to_numpy(np.float64)
    table = frame.assign(
        doc_id=frame["doc_id"].astype(np.int64),
        token_text=[texts[d][s:e] for d, s, e in zip(frame["doc_id"], frame["char_start"], frame["char_end"])],
        surprisal_bits=nll / LN2,
        surprisal_bits_baseline=base / LN2,
        delta_bits=(nll - base) / LN2,
        prob=np.exp(-nll),
        prob_baseline=np.exp(-base),
    )
    table = table[VIEW_COLUMNS]
    table.attrs.update(
        model=str(frame["model"].iloc[0]) if len(frame) else "",
        baseline=str(frame["baseline"].iloc[0]) if len(frame) else "",
    )
    return table


def check_by(by: str) -> str:
    if by not in BY:
        raise DataError(f"--by: must be one of {', '.join(BY)} (got {by!r}).")
    return by


def colour(value: float, by: str) -> str:
    """CSS colour of one token: diverging blue-white-red for ``delta_nll`` (bits), white to
    purple for ``kl`` (nats); values past the scale get its end colour."""
    if not math.isfinite(value):
        return "hsl(0,0%,70%)"
    if by == "kl":
        t = min(max(value, 0.0) / KL_SCALE_NATS, 1.0)
        return f"hsl(275,70%,{97 - 45 * t:.0f}%)"
    t = min(abs(value) / DELTA_SCALE_BITS, 1.0)
    return f"hsl({0 if value > 0 else 215},80%,{97 - 45 * t:.0f}%)"


def _column(by: str) -> str:
    return "delta_bits" if by == "delta_nll" else "kl"


def _legend_html(by: str) -> str:
    if by == "kl":
        steps = [KL_SCALE_NATS * k / 8 for k in range(9)]
        label = "KL(P_baseline ‖ P_model), nats"
    else:
        steps = [DELTA_SCALE_BITS * k / 4 for k in range(-4, 5)]
        label = "Δ surprisal, bits (blue: the model expects the token more than the baseline; red: less)"
    cells = "".join(f'<span style="background:{colour(v, by)}">{v:+g}</span>' for v in steps)
    return f'<p class="legend">{html.escape(label)}: {cells}<span class="plus">+</span></p>'


def _rows(table: pd.DataFrame) -> list[dict]:
    def number(x):
        x = float(x)
        return x if math.isfinite(x) else None

    keys = (
        "surprisal_bits",
        "surprisal_bits_baseline",
        "delta_bits",
        "prob",
        "prob_baseline",
        "delta_p",
        "kl",
        "kl_reverse",
    )
    return [
        {
            "index": int(cast(int, r.position)),  # an int64 column (pandas-stubs: any Scalar)
            "label": str(r.token),
            "text": str(r.token_text),
            "same_top1": bool(r.same_top1),
            **{k: number(getattr(r, k)) for k in keys},
        }
        for r in table.itertuples(index=False)
    ]


def _section_html(doc_id, table: pd.DataFrame, text: str, by: str) -> str:
    values = table[_column(by)].to_numpy(dtype=float)
    out = []
    for row, piece in segments(table, text):
        if row is None:
            out.append(html.escape(piece))
            continue
        empty = " empty" if not piece else ""
        out.append(
            f'<span class="tok{empty}" data-i="{row}" data-value="{float(values[row])!r}" '
            f'style="background:{colour(values[row], by)}">{html.escape(piece)}</span>'
        )
    kl_mean = float(table["kl"].astype(np.float64).mean()) if len(table) else math.nan
    delta = float(table["delta_bits"].sum())
    return (
        f'<section class="doc" data-doc="{html.escape(str(doc_id))}"><h2>Document {html.escape(str(doc_id))}</h2>'
        f'<p class="meta">{len(table)} tokens, Δ surprisal {delta:+.3f} bits in all, mean KL {kl_mean:.4g} nats</p>'
        f'<div class="heat">{"".join(out)}</div><div class="table-slot"></div></section>'
    )


def render_divergence_html(table: pd.DataFrame, texts, *, title: str, by: str = "delta_nll") -> str:
    """One self-contained page: each document's tokens coloured by ``by`` (`BY`), hovering
    one shows both models' surprisal and probability, Δ, KL both ways and top-1 agreement;
    below, a sortable table of the same rows. ``table`` is a `divergence_table`."""
    by = check_by(by)
    docs = [(k, g.reset_index(drop=True)) for k, g in table.groupby("doc_id", sort=True)]
    data = [
        {
            "doc_id": str(k),
            "model": table.attrs.get("model", ""),
            "baseline": table.attrs.get("baseline", ""),
            "rows": _rows(t),
        }
        for k, t in docs
    ]
    js = _template("divergence.js")
    return _template("page.html").format(
        title=html.escape(title),
        legend=_legend_html(by),
        sections="".join(_section_html(k, t, texts[k], by) for k, t in docs),
        data=script_json(data),
        css=_template("page.css"),
        js=js,
        script_hash=script_hash(js),
    )


# --------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------

# xterm-256 backgrounds: blues (model likes the token more) | neutral | reds (less).
_BLUES, _REDS, _PURPLES = (17, 19, 27, 33, 117), (224, 217, 210, 203, 196), (189, 183, 177, 135, 93)
_RESET = "\x1b[0m"


def _ansi(value: float, by: str) -> str:
    if not math.isfinite(value):
        return "\x1b[48;5;250m\x1b[38;5;16m"
    scale = KL_SCALE_NATS if by == "kl" else DELTA_SCALE_BITS
    step = min(int(abs(value) / scale * 5), 4)
    if by == "kl":
        palette, dark = _PURPLES, step >= 3
    else:
        palette, dark = (_REDS, step >= 4) if value > 0 else (_BLUES[::-1], step >= 2)
    if abs(value) < scale / 20:
        return ""
    return f"\x1b[48;5;{palette[step]}m\x1b[38;5;{231 if dark else 16}m"


def render_divergence_terminal(rows: pd.DataFrame, text: str, *, color: bool, by: str = "delta_nll") -> str:
    """One document: a summary line, the text (coloured by ``by`` with ``color``), and a table
    of each token's surprisal under both models, Δ (bits), KL (nats) and top-1 agreement."""
    by = check_by(by)
    values = rows[_column(by)].to_numpy(dtype=float)
    head = (
        (
            f"{len(rows)} tokens, Δ surprisal {rows['delta_bits'].sum():+.3f} bits in all, "
            f"mean KL {rows['kl'].astype(float).mean():.4g} nats"
        )
        if len(rows)
        else "no scored tokens"
    )
    if color:
        pieces = []
        for row, piece in segments(rows, text):
            piece = visible(piece)
            style = "" if row is None else _ansi(values[row], by)
            pieces.append("\n".join(f"{style}{line}{_RESET}" if style and line else line for line in piece.split("\n")))
        body = "".join(pieces)
    else:
        body = visible(text)
    labels = [visible(str(t), keep_newlines=False)[:24] for t in rows["token"]]
    width = max([display_width(s) for s in labels] + [5])
    lines = [f"{'token':<{width}}  {'bits':>8}  {'bits_base':>9}  {'delta':>8}  {'kl_nats':>9}  same_top1"]
    for label, r in zip(labels, rows.itertuples(index=False)):
        pad = " " * (width - display_width(label))
        lines.append(
            f"{label}{pad}  {r.surprisal_bits:8.3f}  {r.surprisal_bits_baseline:9.3f}  {r.delta_bits:+8.3f}  "
            f"{r.kl:9.4g}  {'yes' if r.same_top1 else 'no'}"
        )
    return "\n".join([head, body, "", *lines]) + "\n"
