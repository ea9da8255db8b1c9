"""The run's figures: the reliability diagram, the checkpoint plot, the position curve and the
divergence plot, each returned as a matplotlib Figure that the engine writes (atomically).

matplotlib's object API only (no pyplot: no global state, no GUI backend), imported when a
figure is drawn.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd

from ..core.calibration import expected_calibration_error
from ..engine.config import step_number


def warm_up() -> threading.Thread:
    """Import matplotlib and load its fonts in a background thread (about 1 s, the first
    figure's extra cost), so that a run pays it while it scores. Join the thread before
    drawing: matplotlib is not made to be used from two threads at once."""

    def draw_nothing():
        import io

        from matplotlib.figure import Figure

        fig = Figure(figsize=(1, 1))
        fig.subplots().set(title="warm-up", xlabel="x")
        fig.savefig(io.BytesIO(), format="png")

    thread = threading.Thread(target=draw_nothing, name="lmeval-matplotlib-warm-up", daemon=True)
    thread.start()
    return thread


def plot_reliability(bins_by_model: dict, *, title=None):
    """Reliability diagram PNG: accuracy vs confidence per bin for each model, the diagonal of
    perfect calibration, and underneath the share of tokens in each bin. Returns the matplotlib Figure (the engine writes it)."""
    if not bins_by_model:
        raise ValueError("plot_reliability: bins_by_model must be non-empty (got {}). Pass {'model name': bins, ...}.")
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6, 7), dpi=110)  # fixed margins: a constrained layout costs 0.3 s a figure
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.08, top=0.95, hspace=0.08)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="perfectly calibrated")
    for i, (name, bins) in enumerate(bins_by_model.items()):
        ok = bins.n_tokens > 0
        ece = expected_calibration_error(bins)
        (line,) = top.plot(
            bins.confidence_mean[ok], bins.accuracy[ok], marker="o", ms=4, lw=1.2, label=f"{name} (ECE {ece:.3f})"
        )
        width = (bins.hi - bins.lo) / len(bins_by_model)
        bottom.bar(
            bins.lo + i * width,
            bins.n_tokens / max(bins.n_total, 1),
            width=width,
            align="edge",
            color=line.get_color(),
            alpha=0.8,
        )
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy (top-1 correct)", title=title or "Reliability diagram")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="share of tokens")
    bottom.grid(alpha=0.3)
    return fig


def checkpoint_points(summary: pd.DataFrame, compare: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One point per model for `plot_checkpoints`: x (its step, or its index when some name
    carries no number), value, and the 95% interval ``baseline_value * [ratio_ci_low,
    ratio_ci_high]``.

    The interval is the paired bootstrap CI of the model/baseline ratio, put on the metric's
    scale: it says whether a checkpoint differs from the baseline, not how uncertain its
    absolute value is. A ratio (not ``baseline_value + [ci_low, ci_high]``) because the
    additive interval of a perplexity can reach below 0 when the baseline's own resampled
    perplexity swings widely. The baseline itself has none (NaN)."""
    steps = [step_number(str(name))[0] for name in summary["model"]]
    by_step = all(s >= 0 for s in steps)
    points = pd.DataFrame({"model": summary["model"].astype(str), "step": steps, "value": summary[metric].to_numpy()})
    if by_step:
        points = points.sort_values("step", kind="stable").reset_index(drop=True)
    points["x"] = points["step"] if by_step else np.arange(len(points))
    rows = compare[compare["metric"] == metric]
    if "group" in rows:  # the whole corpus's rows (per-group rows have a group: data.group_by)
        rows = rows[rows["group"].fillna("") == ""]
    rows = rows.set_index("model")
    points["low"] = points["model"].map(rows["baseline_value"] * rows["ratio_ci_low"])
    points["high"] = points["model"].map(rows["baseline_value"] * rows["ratio_ci_high"])
    points["is_baseline"] = points["model"].isin(set(compare["baseline"]))
    points.attrs["by_step"] = by_step
    return points


def plot_checkpoints(summary: pd.DataFrame, compare: pd.DataFrame):
    """PNG with two panels, perplexity and bits per byte against the checkpoint step (or the
    model, when names carry no step), with 95% paired-bootstrap error bars (`checkpoint_points`).
    Token perplexity when every model shares the baseline's tokenizer, else word perplexity.
    Returns the matplotlib Figure (the engine writes it)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    with_ppl = set(compare.loc[compare["metric"] == "ppl", "model"]) == set(compare["model"])
    panels = [
        ("ppl", "perplexity (tokens)") if with_ppl else ("word_ppl", "word perplexity"),
        ("bits_per_byte", "bits per byte"),
    ]
    baseline = ", ".join(map(str, pd.unique(compare["baseline"])))
    fig = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    drawn = False
    for ax, (metric, label) in zip(fig.subplots(1, 2), panels):
        drawn |= _draw_panel(ax, checkpoint_points(summary, compare, metric), label, baseline)
    if drawn:
        fig.suptitle(
            "error bars: 95% paired document-bootstrap CI of the ratio to the baseline, times the baseline's value",
            fontsize=9,
        )
    else:  # e.g. fewer documents than compare.min_documents: say so, never a legend for bars that are not there
        fig.suptitle("no interval: too few documents for a document bootstrap (compare.min_documents)", fontsize=9)
    return fig


def _draw_panel(ax, points: pd.DataFrame, label: str, baseline: str) -> bool:
    """One panel; True when it drew an interval (error bars)."""
    has_interval = bool((points["low"].notna() & points["high"].notna()).any())
    below = (points["value"] - points["low"]).clip(lower=0).fillna(0)
    above = (points["high"] - points["value"]).clip(lower=0).fillna(0)
    ax.errorbar(
        points["x"],
        points["value"],
        yerr=[below, above] if has_interval else None,
        fmt="o-",
        ms=5,
        lw=1.2,
        capsize=4,
        label="model (95% CI vs baseline)" if has_interval else "model",
    )
    base = points[points["is_baseline"]]
    ax.plot(base["x"], base["value"], "s", ms=10, mfc="none", mec="crimson", mew=1.5, label=f"baseline ({baseline})")
    by_step = points.attrs["by_step"]
    if by_step and points["x"].min() > 0 and points["x"].max() / points["x"].min() >= 50:
        ax.set_xscale("log")  # checkpoints are often saved at geometric steps
    if not by_step:
        ax.set_xticks(points["x"], points["model"], rotation=30, ha="right")
    axis = "step" if by_step else "model"
    ax.set(xlabel=axis, ylabel=label, title=f"{label} vs {axis}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return has_interval


def plot_positions(positions: pd.DataFrame, *, log_x: bool = True):
    """PNG of mean NLL [nats] against the token's place, one line per model with its 95%
    document-bootstrap band: left by position in the document (1 = the first token), right
    by context length (the tokens the prediction saw, BOS included). Returns the matplotlib Figure (the engine writes it)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(11, 4), dpi=110)  # fixed margins: a constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.065, right=0.99, bottom=0.13, top=0.86, wspace=0.06)
    panels = (
        ("position", "position", "token's place in its document (1 = first)", 1),
        ("context_len", "context length", "context length (ids the prediction saw)", 0),
    )
    for ax, (axis, title, label, shift) in zip(fig.subplots(1, 2, sharey=True), panels):
        for name, rows in positions[positions["axis"] == axis].groupby("model", sort=False):
            x = rows["value_mean"].to_numpy() + shift
            (line,) = ax.plot(x, rows["nll_mean"], marker="o", ms=3, lw=1.2, label=str(name))
            ax.fill_between(x, rows["ci_low"], rows["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel=label, title=f"mean NLL by {title}")
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("mean NLL (nats per token)")
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("bands: 95% document-bootstrap interval of each bin's mean", fontsize=9)
    return fig


def plot_divergence(by_model: dict, baseline: str):
    """PNG: left, the share of tokens per log-spaced KL bin for each model (log-log; tokens
    with KL = 0 cannot sit on a log axis and are counted in the legend); right, mean KL per
    document position (binned when documents are long). ``by_model[name]`` is (a
    `QuantileSketch` of every token's kl, KL summed per position, tokens per position).
    Returns the Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    hist, trend = fig.subplots(1, 2)
    sketches = [kl for kl, _, _ in by_model.values() if kl.count and kl.max > 0]
    if sketches:  # one set of log-spaced bins over every model's positive KL
        low, high = min(s.min_positive for s in sketches), max(s.max for s in sketches)
        edges = np.geomspace(low, high * (1 + 1e-9), 50)
    trend_means = []
    for name, (kl, kl_sum, n) in by_model.items():
        zeros = kl.count_at_most(0.0)
        label = f"{name} ({zeros} tokens with KL = 0 not shown)" if zeros else name
        if sketches:
            share = kl.histogram(edges) / max(kl.count, 1)
            hist.step(edges[:-1], np.where(share > 0, share, np.nan), where="post", lw=1.3, label=label)
        centres, means = _position_bins(kl_sum, n)
        trend.plot(centres, np.where(means > 0, means, np.nan), marker=".", ms=3, lw=1.2, label=name)
        trend_means.append(means)
    if sketches:
        hist.set(xscale="log", yscale="log")
        trend.set_yscale(axis_scale(np.concatenate(trend_means)))
    else:
        for ax in (hist, trend):
            ax.text(0.5, 0.5, "every KL is 0: the models agree on every token", ha="center", transform=ax.transAxes)
    hist.set(
        xlabel="KL(P_base || P_model) per token (nats)",
        ylabel="share of tokens",
        title=f"KL distribution vs {baseline}",
    )
    trend.set(xlabel="position in document (tokens)", ylabel="mean KL (nats)", title="KL against position")
    for ax in (hist, trend):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_divergence_bpw(rows: pd.DataFrame, baseline: str):
    """PNG: each variant's bits per weight (its weight files' bits over its parameters; on
    the x axis) against its mean KL (left) and its ln PPL ratio (right), each with its 95%
    document-bootstrap interval as an error bar, one labelled point per variant. ``rows``
    are divergence.csv's rows with a finite ``bits_per_weight``. Returns the Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    panels = fig.subplots(1, 2)
    for ax, column, label in zip(panels, ("kl_mean", "ln_ppl_ratio"), ("mean KL (nats)", "ln PPL ratio (nats)")):
        for _, row in rows.iterrows():
            low, high = row[f"{column}_ci_low"], row[f"{column}_ci_high"]
            errors = [[max(row[column] - low, 0.0)], [max(high - row[column], 0.0)]] if np.isfinite(low) else None
            ax.errorbar(row["bits_per_weight"], row[column], yerr=errors, fmt="o", capsize=3)
            ax.annotate(str(row["model"]), (row["bits_per_weight"], row[column]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        if column == "kl_mean":
            ax.set_yscale(axis_scale(rows[column].to_numpy()))
        else:
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(xlabel="bits per weight (weight files on disk)", ylabel=label, title=f"{label} vs {baseline}")
        ax.grid(alpha=0.3)
    return fig


# A log axis pays only when values span a factor of this or more; over a narrow range (KL
# between 1.07 and 1.36 nats) it shows a single tick and hides the differences.
LOG_AXIS_MIN_RATIO = 10.0


def axis_scale(values: np.ndarray) -> str:
    """``"log"`` when the positive finite ``values`` span at least `LOG_AXIS_MIN_RATIO`, else ``"linear"``."""
    values = np.asarray(values, dtype=np.float64)
    positive = values[np.isfinite(values) & (values > 0)]
    if len(positive) < 2:
        return "linear"
    return "log" if positive.max() / positive.min() >= LOG_AXIS_MIN_RATIO else "linear"


def _position_bins(kl_sum: np.ndarray, n: np.ndarray, n_bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Mean KL per position, pooled into at most ``n_bins`` equal-width bins (sums, then one division)."""
    if not len(n):
        return np.zeros(0), np.zeros(0)
    edges = np.unique(np.linspace(0, len(n), min(n_bins, len(n)) + 1).astype(np.int64))
    sums, counts = np.add.reduceat(kl_sum, edges[:-1]), np.add.reduceat(n, edges[:-1])
    centres = (edges[:-1] + edges[1:] - 1) / 2
    return centres, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_groups(groups: pd.DataFrame, levels, max_groups: int = 40, min_documents: int | None = None):
    """PNG forest plot of groups.csv: one panel per level of ``data.group_by``, each group's
    bits per byte (pooled within the group) with its 95% document-bootstrap interval, one
    marker per model, groups sorted by the first model's value (lowest at the top), and a
    dashed line per model at its bits per byte over all documents (micro). A panel with more
    than ``max_groups`` groups shows the lowest and highest half of them and says how many in
    the middle it leaves to groups.csv. Returns the matplotlib Figure (the engine writes it)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    models = list(pd.unique(groups["model"]))
    panels = []
    for level in levels:
        first = groups[(groups["level"] == level) & (groups["model"] == models[0])]
        order = list(first.sort_values(["bits_per_byte", "group"], kind="stable")["group"])  # NaN last
        hidden = max(len(order) - max_groups, 0)
        if hidden:
            order = order[: max_groups // 2] + order[len(order) - (max_groups - max_groups // 2) :]
        panels.append((level, order, hidden))
    heights = [0.3 * max(len(order), 1) + 0.9 for _, order, _ in panels]
    fig = Figure(figsize=(8.5, sum(heights) + 0.9), dpi=110, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    offsets = np.linspace(-0.18, 0.18, len(models)) if len(models) > 1 else np.zeros(1)
    for ax, (level, order, hidden) in zip(axes, panels):
        for i, (offset, model) in enumerate(zip(offsets, models)):
            of_model = groups[(groups["level"] == level) & (groups["model"] == model)]
            rows = of_model.set_index("group").reindex(order)
            x = rows["bits_per_byte"].to_numpy(np.float64)
            low, high = (rows[c].to_numpy(np.float64) for c in ("bits_per_byte_ci_low", "bits_per_byte_ci_high"))
            below, above = np.nan_to_num(np.clip(x - low, 0, None)), np.nan_to_num(np.clip(high - x, 0, None))
            bars = ax.errorbar(
                x,
                np.arange(len(order)) + offset,
                xerr=[below, above],
                fmt="o",
                ms=4,
                lw=1.2,
                capsize=2.5,
                label=f"model {model}",
            )
            n_bytes = of_model["n_bytes"].sum()  # every document lies in one group of each level
            if n_bytes:
                ax.axvline(
                    of_model["nll_sum"].sum() / np.log(2) / n_bytes,
                    ls="--",
                    lw=1,
                    alpha=0.7,
                    color=bars.lines[0].get_color(),
                    label="dashed: all documents (micro)" if i == 0 else None,
                )
        ax.set_yticks(np.arange(len(order)), order, fontsize=8)
        ax.set_ylim(len(order) - 0.5, -0.5)  # the lowest bits per byte at the top
        shown = f"{len(order) + hidden} groups" + (
            f", the {hidden} in the middle not shown (groups.csv)" if hidden else ""
        )
        ax.set_title(f"{level}: {shown}", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    bare = f"; a dot without a bar: fewer than {min_documents} documents" if min_documents else ""
    axes[-1].set_xlabel(
        "bits per byte, pooled within the group (lower is better)\n"
        f"bars: 95% document-bootstrap interval within the group{bare}",
        fontsize=9,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 3), fontsize=8, frameon=False)
    return fig
