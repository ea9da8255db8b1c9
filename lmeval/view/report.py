"""One page to read a run (or several checkpoints' runs): ``report.html``, self-contained.

Every number on the page is read from the run's own files (summary.csv, compare.csv,
calibration.csv, temperature.csv, positions.csv, documents.parquet, tokens.parquet) and
shown as text in a ``<table>``; the charts (inline SVG, `lmeval.view.svg`) draw the same
rows. Nothing is fetched: inline CSS, one inline script allowed by its hash in the page's
Content-Security-Policy, and data embedded as escaped JSON that the script only ever writes
as ``textContent``, so a document's text cannot run anything.

Sections appear when the run has their data: summary and protocol, comparison (paired deltas
with intervals), checkpoints (a metric against the step, across run folders), groups (a forest
plot), calibration (reliability and temperature), loss by position with the ICL score,
divergence (KL quantiles, the tokens that moved most), and documents (a sortable, filterable
table; a click opens the document's token heat map where the run kept token rows, and each
variant's KL per token with a baseline). Above
`TOKEN_BUDGET` token rows the token views are embedded for a stratified sample of documents
(the best, the worst, the most changed, then a seeded random remainder), and the page says so.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine.config import step_number
from .render import SCALE_BITS, _template, script_hash, script_json, write_html
from .run_tables import RunTables, read_run, read_tokens, run_texts, token_rows
from .svg import Interval, Series, forest_chart, line_chart

HEADLINE = ("ppl", "bits_per_token", "bits_per_byte", "word_ppl", "ece", "brier", "top1_accuracy")
ICL = ("icl_score", "icl_ci_low", "icl_ci_high", "icl_documents")  # summary.csv, from analysis.positions
MEMBERSHIP_PREFIXES = ("mink_prob_", "mink_pp_", "zlib_ratio", "extractable_suffix")  # documents.parquet
DIVERGENCE = (
    "model",
    "baseline",
    "n_tokens",
    "kl_mean",
    "kl_mean_ci_low",
    "kl_mean_ci_high",
    "kl_median",
    "kl_p90",
    "kl_p99",
    "kl_max",
    "same_top1",
    "ln_ppl_ratio",
    "ln_ppl_ratio_ci_low",
    "ln_ppl_ratio_ci_high",
    "bits_per_weight",
)
KL_QUANTILES = (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))
DOCUMENT_METRICS = ("ppl", "bits_per_byte")
TOKEN_BUDGET = 100_000  # token rows embedded for the drill-down (about 2 MB of the page)
TOKEN_FILE_ROWS = 20_000_000  # above this, the token table is not read at all (its doc_id column alone is large)
DOCUMENT_ROWS = 20_000  # rows of the documents table embedded (about 2 MB)
CURVE_METRICS = ("bits_per_byte", "ppl", "ece")
COMPARE_HIDDEN = ("n_resamples",)  # compare.csv's columns the page leaves out
FOLDED_ROWS = 20  # longer tables are folded (<details>) under their charts


def _fmt(value) -> str:
    """A number as the tables show it: 4 significant digits, a sign kept, NaN as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2013"  # an en dash
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.4g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:.2f}"


def _signed(value) -> str:
    text = _fmt(value)
    return f"+{text}" if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else text


def _table(frame: pd.DataFrame, caption: str, signed: Sequence[str] = ()) -> str:
    head = "".join(f'<th scope="col">{html.escape(str(c))}</th>' for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record):
            if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
                number = value.item() if hasattr(value, "item") else value
                text = _signed(number) if column in signed else _fmt(number)
                cells.append(f'<td class="num">{html.escape(text)}</td>')
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        f'<div class="scroll"><table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    if len(rows) <= FOLDED_ROWS:
        return table
    # a long table (bins, positions) folds under its chart; its rows stay in the page as text
    return f"<details><summary>{html.escape(caption)}: {len(rows)} rows</summary>{table}</details>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def summary_section(runs: list[RunTables]) -> str:
    """Each run's headline metrics, each followed by its 95% interval where summary.csv has one,
    a forest plot of bits per byte by model where there are several, and the protocol."""
    parts = []
    for run in runs:
        summary = run.tables["summary"]
        columns = ["model", "n_documents", "n_tokens", *_with_intervals(HEADLINE, summary.columns)]
        caption = f"{run.name}: headline metrics with 95% document-bootstrap intervals (summary.csv)"
        if len(summary) > 1 and {"bits_per_byte_ci_low", "bits_per_byte_ci_high"} <= set(summary.columns):
            parts.append(_bits_per_byte_forest(summary, summary["model"].astype(str), "model"))
        parts.append(_table(summary[columns], caption))
        parts.append(_protocol(run))
    return _section("summary", "Summary", "".join(parts))


def _with_intervals(metrics: Sequence[str], columns) -> list[str]:
    """The metrics present in ``columns``, each followed by its ``_ci_low`` and ``_ci_high``."""
    present = set(columns)
    return [c for m in metrics if m in present for c in (m, f"{m}_ci_low", f"{m}_ci_high") if c in present]


def _bits_per_byte_forest(frame: pd.DataFrame, labels, by: str) -> str:
    """A forest plot of each row's bits_per_byte and its interval, labelled ``labels``, one
    marker style per model."""
    models = list(dict.fromkeys(frame["model"].astype(str)))
    rows = [
        Interval(
            str(label),
            float(r["bits_per_byte"]),
            float(r["bits_per_byte_ci_low"]),
            float(r["bits_per_byte_ci_high"]),
            models.index(str(r["model"])),
        )
        for label, r in zip(labels, frame.to_dict("records"))
    ]
    return forest_chart(rows, models, title=f"Bits per byte by {by}, 95% intervals", x_label="bits per byte")


def _protocol(run: RunTables) -> str:
    protocol = run.record.get("protocol", {})
    items = []
    for key in ("windows", "aggregation", "log_base"):
        if protocol.get(key):
            items.append(f"<li><b>{key}</b>: {html.escape(str(protocol[key]))}</li>")
    for unit, meaning in (protocol.get("normalisers") or {}).items():
        items.append(f"<li><b>per {html.escape(unit)}</b>: {html.escape(str(meaning))}</li>")
    for model, facts in (protocol.get("models") or {}).items():
        words = (
            f"window {facts.get('max_length')} ids, stride {facts.get('stride')}, BOS {facts.get('bos')}, "
            f"documents {facts.get('documents')}, batching {facts.get('batching')}, reductions {facts.get('reductions')}"
        )
        items.append(f"<li><b>{html.escape(str(model))}</b>: {html.escape(words)}</li>")
    return f"<details open><summary>Protocol of {html.escape(run.name)} (run.json)</summary><ul>{''.join(items)}</ul></details>"


def icl_section(run: RunTables) -> str:
    """The in-context learning score (loss late in a document minus early, with its interval)."""
    summary = run.tables["summary"]
    if "icl_score" not in summary.columns:
        return ""
    columns = ["model", *[c for c in ICL if c in summary.columns]]
    return _table(
        summary[columns],
        "In-context learning score: mean nll late in a document minus early (summary.csv)",
        signed=ICL[:3],
    )


def groups_section(run: RunTables) -> str:
    """A forest plot of bits per byte by group, with its intervals, and groups.csv."""
    if not run.has("groups"):
        return ""
    groups = run.tables["groups"]
    labels = [f"{r['level']}: {r['group']} ({r['model']})" for r in groups.to_dict("records")]
    chart = _bits_per_byte_forest(groups, labels, "group")
    return _section("groups", f"Groups ({run.name})", chart + _table(groups, "Per-group metrics (groups.csv)"))


def divergence_section(run: RunTables) -> str:
    """The variants against the baseline, the distribution of per-token KL (its quantiles), and the
    tokens that moved most, with their text."""
    if not run.has("divergence"):
        return ""
    div = run.tables["divergence"]
    parts = [
        _table(
            div[[c for c in DIVERGENCE if c in div.columns]],
            "Each model against the baseline (divergence.csv)",
            signed=("ln_ppl_ratio", "ln_ppl_ratio_ci_low", "ln_ppl_ratio_ci_high"),
        )
    ]
    quantiles = [(q, f"kl_{name}") for name, q in KL_QUANTILES if f"kl_{name}" in div.columns]
    series = [
        Series(str(r["model"]), [q for q, _ in quantiles], [r[c] for _, c in quantiles]) for r in div.to_dict("records")
    ]
    parts.insert(
        0,
        line_chart(
            series, title="Per-token KL(baseline || model), by quantile", x_label="quantile", y_label="KL (nats)"
        ),
    )
    if run.has("divergence_tokens"):
        top = run.tables["divergence_tokens"]
        columns = [
            c
            for c in ("model", "doc_id", "position", "token_text", "context", "kl", "delta_p", "nll", "nll_baseline")
            if c in top.columns
        ]
        parts.append(
            _table(
                top[columns], "The tokens that moved most, with their text (divergence_tokens.csv)", signed=("delta_p",)
            )
        )
    return _section("divergence", f"Divergence ({run.name})", "".join(parts))


def comparison_section(runs: list[RunTables]) -> str:
    parts = []
    for run in runs:
        if not run.has("compare"):
            continue
        compare = run.tables["compare"]
        columns = [c for c in compare.columns if c not in COMPARE_HIDDEN]
        parts.append(
            _table(
                compare[columns],
                f"{run.name}: paired differences, model minus baseline, with 95% bootstrap intervals over documents (compare.csv)",
                signed=("delta", "ci_low", "ci_high"),
            )
        )
    return _section("comparison", "Comparison", "".join(parts)) if parts else ""


def checkpoints_section(runs: list[RunTables]) -> str:
    """Each metric against the checkpoint step, with its interval: across run folders (the step
    is the folder name's last number, one line per model), or within one run whose models are
    checkpoints (a ``glob`` of steps: every model's name carries its step, one line)."""
    frame = _checkpoint_rows(runs)
    if frame is None:
        return ""
    metrics = [m for m in CURVE_METRICS if m in frame.columns]
    charts = []
    for metric in metrics:
        low, high = (f"{metric}_ci_low", f"{metric}_ci_high") if f"{metric}_ci_low" in frame.columns else (None, None)
        band = ", 95% intervals shaded" if low else ""
        charts.append(
            line_chart(
                _per_model(frame, "step", metric, low, high, by="line"),
                title=f"{metric} against the step{band}",
                x_label="step",
                y_label=metric,
            )
        )
    table = _table(
        frame[["run", "step", "model", *_with_intervals(metrics, frame.columns)]],
        "Each checkpoint's headline metrics against its step, with 95% document-bootstrap intervals (summary.csv)",
    )
    return _section("checkpoints", "Checkpoints", "".join(charts) + table)


def _checkpoint_rows(runs: list[RunTables]) -> pd.DataFrame | None:
    """Summary rows with ``run``, ``step`` and ``line`` (a chart line), sorted by line and step;
    None when there is no checkpoint series."""
    if len(runs) >= 2:
        steps = [run.step if run.step is not None else k for k, run in enumerate(runs)]
        rows = [
            {"run": run.name, "step": step, "line": str(r["model"]), **r}
            for run, step in zip(runs, steps)
            for r in run.tables["summary"].to_dict("records")
        ]
    else:
        summary = runs[0].tables["summary"]
        steps = [step_number(str(m))[0] for m in summary["model"]]
        if len(summary) < 2 or min(steps) < 0:  # one model, or names without a step: not a series
            return None
        rows = [
            {"run": runs[0].name, "step": step, "line": runs[0].name, **r}
            for step, r in zip(steps, summary.to_dict("records"))
        ]
    return pd.DataFrame(rows).sort_values(["line", "step"], kind="stable")


def _per_model(
    frame: pd.DataFrame, x: str, y: str, low: str | None = None, high: str | None = None, by: str = "model"
) -> list[Series]:
    """One chart line per model (or other ``by`` column) of a long table (its rows in file order)."""
    return [
        Series(
            str(m),
            g[x].tolist(),
            g[y].tolist(),
            g[low].tolist() if low else None,
            g[high].tolist() if high else None,
        )
        for m, g in frame.groupby(by, sort=False)
    ]


# (table, x, y, title, x label, y label, y = x drawn, caption) of the calibration section's charts
CALIBRATION_CHARTS = (
    (
        "calibration",
        "confidence_mean",
        "accuracy",
        "Reliability diagram",
        "confidence (mean of the bin)",
        "accuracy",
        True,
        "Reliability bins (calibration.csv): top-1 confidence against accuracy",
    ),
    (
        "temperature",
        "temperature",
        "nll_mean",
        "Mean nll against temperature",
        "temperature",
        "nll (nats/token)",
        False,
        "Temperature curve (temperature.csv)",
    ),
)


def calibration_section(run: RunTables) -> str:
    parts = []
    for name, x, y, title, x_label, y_label, diagonal, caption in CALIBRATION_CHARTS:
        if run.has(name):
            frame = run.tables[name]
            chart = line_chart(
                _per_model(frame, x, y), title=title, x_label=x_label, y_label=y_label, diagonal=diagonal
            )
            parts += [chart, _table(frame, caption)]
    return _section("calibration", f"Calibration ({run.name})", "".join(parts)) if parts else ""


def positions_section(run: RunTables) -> str:
    if not run.has("positions"):
        return ""
    pos = run.tables["positions"]
    pos = pos[pos["axis"] == "position"] if "axis" in pos.columns else pos
    series = _per_model(pos, "value_mean", "nll_mean", "ci_low", "ci_high")
    icl = icl_section(run)
    chart = line_chart(
        series,
        title="Loss by position",
        x_label="token position (bin mean, log scale)",
        y_label="nll (nats/token)",
        log_x=True,
    )
    return _section(
        "positions",
        f"Loss by position ({run.name})",
        icl + chart + _table(pos, "Loss by position with 95% intervals (positions.csv)"),
    )


def document_rows(run: RunTables) -> tuple[list[str], list[list]]:
    """The documents table: one row per document, each model's ppl and bits per byte, and each
    compared model's delta in bits per byte against the baseline (compare_documents.csv)."""
    docs = run.tables["documents"].assign(doc_id=lambda f: f["doc_id"].astype(str))
    # with analysis.membership, each model's membership scores too, to rank documents by
    membership = [c for c in docs.columns if c.startswith(MEMBERSHIP_PREFIXES)]
    values = [*DOCUMENT_METRICS, *membership]
    wide = docs.pivot_table(index="doc_id", columns="model", values=values, aggfunc="first", sort=False)
    table = pd.DataFrame({"doc_id": wide.index.astype(str)})
    table["n_tokens"] = docs.groupby("doc_id", sort=False)["n_tokens"].first().reindex(wide.index).to_numpy()
    models = list(dict.fromkeys(docs["model"].astype(str)))
    for model in models:
        for metric in DOCUMENT_METRICS:
            table[f"{metric} {model}"] = wide[(metric, model)].to_numpy()
    for column in membership:
        for model in models:
            table[f"{column} {model}"] = wide[(column, model)].to_numpy()
    if run.has("compare_documents"):
        deltas = run.tables["compare_documents"]
        for model, g in deltas.groupby("model", sort=False):
            by_doc = g.set_index(g["doc_id"].astype(str))["delta_bits_per_byte"]
            table["\u0394 bits_per_byte " + str(model)] = by_doc.reindex(table["doc_id"]).to_numpy()
    rows = [[_json_value(v) for v in row] for row in table.itertuples(index=False)]
    return list(table.columns), rows


def _json_value(value):
    """A cell as JSON takes it: a Python number (NaN as null) or the text."""
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _stratified(ranked: list[list[str]], pool: list[str], seed: int, take) -> list[str]:
    """``ranked`` lists first (each already in order: the best, the worst, the most changed), then
    ``pool`` in a seeded random order; ``take(doc)`` says whether a document still fits."""
    rest = np.random.default_rng(seed).permutation(np.asarray(pool, dtype=object)).tolist()
    return [doc for doc in dict.fromkeys([d for r in ranked for d in r] + rest) if take(doc)]


def _extremes(run: RunTables, n: int) -> list[list[str]]:
    """The ``n`` best and worst documents by bits per byte, and the ``n`` most changed."""
    docs = run.tables["documents"]
    per_doc = docs.groupby(docs["doc_id"].astype(str))["bits_per_byte"].mean().sort_values()
    ranked = [per_doc.index[:n].tolist(), per_doc.index[::-1][:n].tolist()]
    if run.has("compare_documents"):
        changed = run.tables["compare_documents"].assign(size=lambda f: f["delta_bits_per_byte"].abs())
        ranked.append(changed.sort_values("size", ascending=False)["doc_id"].astype(str).head(n).tolist())
    return ranked


def sample_documents(run: RunTables, counts: pd.Series, budget: int = TOKEN_BUDGET, seed: int = 0) -> list[str]:
    """Documents whose token views are embedded: every one if their token rows (``counts``, per
    doc_id) fit ``budget``, else the best, the worst and the most changed (by bits per byte)
    first, then a seeded random remainder, while the budget lasts."""
    if counts.sum() <= budget:
        return list(counts.index)
    used = [0]

    def take(doc: str) -> bool:
        n = int(counts.get(doc, 0))
        if not n or used[0] + n > budget:
            return False
        used[0] += n
        return True

    return _stratified(_extremes(run, 5), list(counts.index), seed, take)


def token_views(
    path: Path, docs: list[str], text_of: Callable[[str], str | None] | None, value: str, extra: str
) -> dict:
    """doc_id -> model -> [[piece, value, extra], ...] for the heat maps, from a token table at
    ``path`` (tokens.parquet: surprisal in bits and rank; divergence.parquet: KL in nats and
    Δp); the piece is the document's text under the token's span when the text is at hand, else
    the token as the tokenizer spells it."""
    tokens = read_tokens(path, docs, ["doc_id", "model", "token", "char_start", "char_end", value, extra])
    views: dict[str, dict[str, list]] = {}
    for (doc, model), g in tokens.groupby([tokens["doc_id"].astype(str), "model"], sort=False):
        doc = str(doc)
        text = text_of(doc) if text_of is not None else None
        if text is not None:
            pieces = [text[int(a) : int(b)] for a, b in zip(g["char_start"], g["char_end"])]
        else:
            pieces = g["token"].astype(str).tolist()
        views.setdefault(doc, {})[str(model)] = [
            [p, round(float(v), 4), _json_value(x)] for p, v, x in zip(pieces, g[value], g[extra])
        ]
    return views


def documents_section(run: RunTables, text_of: Callable[[str], str | None] | None) -> tuple[str, dict]:
    if not run.has("documents"):
        return "", {}
    columns, rows = document_rows(run)
    notes = []
    if len(rows) > DOCUMENT_ROWS:  # a stratified sample keeps the page within its size budget
        keep = set(
            _stratified(_extremes(run, DOCUMENT_ROWS // 20), [str(r[0]) for r in rows], 0, lambda d: True)[
                :DOCUMENT_ROWS
            ]
        )
        notes.append(
            f"The table lists {DOCUMENT_ROWS:,} of the run's {len(rows):,} documents (the best, the worst, the most "
            "changed, then a random sample); documents.parquet holds them all."
        )
        rows = [r for r in rows if str(r[0]) in keep]
    data: dict = {"columns": columns, "rows": rows, "views": {}, "divergence": {}, "scale_bits": SCALE_BITS}
    if run.tokens_path is None:
        notes.append("This run kept no token rows in one file (tokens.parquet): documents have no token view.")
    elif token_rows(run.tokens_path) > TOKEN_FILE_ROWS:
        notes.append(f"tokens.parquet holds more than {TOKEN_FILE_ROWS:,} rows: no token view is embedded.")
    else:
        ids = read_tokens(run.tokens_path, columns=["doc_id"])["doc_id"].astype(str)
        counts = ids.groupby(ids, sort=False).size()
        counts = counts[counts.index.isin({str(r[0]) for r in rows})]
        divergence = run.folder / "divergence.parquet"  # with a baseline: each variant's KL per token
        chosen = sample_documents(run, counts, TOKEN_BUDGET // 2 if divergence.is_file() else TOKEN_BUDGET)
        data["views"] = token_views(run.tokens_path, chosen, text_of, "surprisal_bits", "rank")
        if divergence.is_file():
            data["divergence"] = token_views(divergence, chosen, text_of, "kl", "delta_p")
        notes.append(
            "Click a document for its token heat map (surprisal in bits, green 0 to red 20+)."
            if len(chosen) == len(counts)
            else f"Token views are embedded for {len(chosen)} of {len(rows)} documents (the best, the worst, the most "
            "changed, then a random sample), so that the page stays small; the others show no token view."
        )
    body = (
        "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
        + '<label>Filter documents <input id="doc-filter" type="search" placeholder="doc id contains"></label>'
        f'<table id="documents-table" aria-label="documents"><caption>{len(rows)} documents (documents.parquet)</caption>'
        "<thead></thead><tbody></tbody></table>"
        '<div id="token-view" aria-live="polite"></div>'
    )
    return _section("documents", f"Documents ({run.name})", body), data


def render_report(run_dirs: Sequence[str | Path], text_of: Callable[[str], str | None] | None = None) -> str:
    """The report page of one or more finished run folders (several: checkpoints, in order).
    ``text_of`` (doc_id -> text) gives the token views their text; without it, the corpus the
    last run's config names is read if it can be (`run_texts`)."""
    runs = [read_run(d) for d in run_dirs]
    last = runs[-1]
    if text_of is None and last.tokens_path is not None:
        text_of = run_texts(last)
    documents, data = documents_section(last, text_of)
    sections = [
        summary_section(runs),
        comparison_section(runs),
        checkpoints_section(runs),
        groups_section(last),
        calibration_section(last),
        positions_section(last),
        divergence_section(last),
        documents,
    ]
    body = "".join(s for s in sections if s)
    nav = "".join(  # each section's heading, without its run's name
        f'<a href="#{anchor}">{heading.split(" (")[0]}</a>'
        for anchor, heading in re.findall(r'<section id="([a-z]+)"><h2>([^<]*)</h2>', body)
    )
    title = "lmeval report: " + ", ".join(run.name for run in runs)
    page, css, js = (_template(name) for name in ("report.html", "report.css", "report.js"))
    return page.format(
        title=html.escape(title),
        nav=nav,
        body=body,
        data=script_json(data),
        css=css,
        js=js,
        script_hash=script_hash(js),
    )


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path, text_of: Callable[[str], str | None] | None = None
) -> Path:
    """Write `render_report` of ``run_dirs`` to ``out`` atomically."""
    return write_html(Path(out), render_report(run_dirs, text_of))


def write_run_report(out: Path, config, text_of: Callable[[str], str | None] | None) -> None:
    """The page a run writes at its end, as report.html in its folder, unless ``output.report`` is false."""
    if config.output.report:
        write_report([out], out / "report.html", text_of)
