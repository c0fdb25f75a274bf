"""``--plot FILE.png``: small multiples a user can read at a glance.

``probe`` / ``compare`` / ``check``: one panel per optimizer (shared log-scale y, so
magnitudes compare), its pre-step norm dashed (the gradient backward() produced), its
post-step norm solid (what a logger reading ``p.grad`` after ``step()`` sees) and the gap
between them shaded; the verdict and the median post/pre ratio in the title, red where
flagged. ``check`` adds the baseline's two lines, thin and grey.

``sfdiag run``: one panel per judged logged metric: the logged values at their steps over
the true value (the gradient's norm, pre-clip or pre-step; a rate's applied rate) and the
other reference (the post-step norm; the base rate), the verdict in the title, and a mark
at each step where a schedule-free mode finding of that optimizer occurred. A run that
logged no metric gets the optimizer panels.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, no display)
and returned, so tests read panels and titles from them; ``plot_png`` renders the bytes.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sfdiag.errors import SfdiagError
from sfdiag.fileio import check_writable, same_file, write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from sfdiag.results import Finding, MetricResult, OptimizerResult, ProbeReport


class Recorded(Protocol):
    """What the plot reads of check's baseline (``sfdiag.baseline.Baseline``, not imported:
    the report formats stay below the baseline module)."""

    results: Sequence[Any]  # each: .optimizer, .pre_step_grad_norms, .post_step_grad_norms


MISSING_MATPLOTLIB = "--plot needs matplotlib: pip install 'sfdiag[plot]'"

FLAGGED = "tab:red"
CLEAN = "tab:blue"
#: the dashed pre-step line, drawn over the solid one: where they coincide both show
DASHED = {FLAGGED: "darkred", CLEAN: "navy"}
TRUE = "black"
OTHER = "0.55"  # grey
SKIPPED = "tab:red"
BASELINE = "0.6"
POST_LABEL = "post-step ‖g‖ (read after step())"
PRE_LABEL = "pre-step ‖g‖ (the gradient)"
GAP_LABEL = "the gap"
#: markers per line at most: a 1,000-step curve keeps its line, not 1,000 dots
MARKERS = 40
#: a mark for each of these finding kinds (the others are not drawn)
FINDING_STYLE = {
    "eval-in-train-mode": ("tab:orange", "an evaluation"),
    "checkpoint-in-train-mode": ("tab:purple", "a save"),
    "batchnorm-stats": ("tab:olive", "an evaluation"),
    "step-in-eval-mode": ("tab:brown", "a step"),
    "double-warmup": ("tab:cyan", "a step"),
    "scheduler-on-skipped-step": ("tab:pink", "the rate moved on after a skipped step"),
}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401  (None in sys.modules also lands here)
    except ImportError:
        raise SfdiagError(MISSING_MATPLOTLIB) from None


def check_plot_path(
    path: str | os.PathLike[str],
    *,
    force: bool,
    beside: str | os.PathLike[str] | None = None,
    beside_flag: str = "--output",
) -> Path:
    """A ``--plot`` path, checked before anything runs: not the file the other output
    (``beside``, given as ``beside_flag``) goes to, matplotlib there, writable (and not over
    a file without ``force``)."""
    if beside is not None and same_file(beside, path):
        raise SfdiagError(
            f"{beside_flag} and --plot name the same file ({path}): give each its own"
        )
    require_matplotlib()
    return check_writable(path, force, what="plot")


# ---- layout -------------------------------------------------------------------------------
def grid_shape(panels: int) -> tuple[int, int]:
    """(rows, columns) for ``panels`` small multiples: at most 4 across."""
    columns = 1 if panels <= 1 else 2 if panels <= 4 else 3 if panels <= 9 else 4
    return max(1, math.ceil(panels / columns)), columns


def _figure(panels: int, *, share_y: bool) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, columns = grid_shape(panels)
    width = max(9.0, 0.6 + 4.4 * columns)  # a lone panel still has room for its legend
    fig = Figure(figsize=(width, 1.4 + 3.1 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, columns, squeeze=False, sharey=share_y)
    axes = [ax for row in grid for ax in row]
    for spare in axes[panels:]:
        spare.set_visible(False)
    return fig, axes[:panels]


def _markevery(count: int) -> int:
    return max(1, math.ceil(count / MARKERS))


def _positive(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) and v > 0 for v in values)


def _title(ax: Axes, first: str, second: str, *, alarm: bool) -> None:
    ax.set_title(
        f"{first}\n{second}",
        fontsize=9,
        color=FLAGGED if alarm else "black",
        fontweight="bold" if alarm else "normal",
    )


def _ratio(value: float) -> str:
    return f"{value:.3g}x" if math.isfinite(value) else "n/a"


def _mark_findings(ax: Axes, findings: Sequence[Finding], seen: set[str]) -> None:
    """A thin vertical line at every step a finding occurred (labelled once per figure)."""
    for finding in findings:
        style = FINDING_STYLE.get(finding.kind)
        if style is None or not finding.steps:
            continue
        color, words = style
        for i, step in enumerate(finding.steps):
            label = f"{finding.kind} ({words})" if i == 0 and finding.kind not in seen else None
            ax.axvline(step, color=color, linewidth=1.0, alpha=0.7, linestyle=":", label=label)
        seen.add(finding.kind)


def _findings_of(report: ProbeReport, optimizer: str | None) -> list[Finding]:
    return [f for f in report.findings or () if f.optimizer == optimizer]


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the figure, below the panels: every distinct label once, the
    optimizer panels' lines in grey (each panel has its own colour)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    neutral = {
        POST_LABEL: Line2D([], [], color="0.3", linewidth=1.8, marker="."),
        PRE_LABEL: Line2D([], [], color="0.3", linewidth=1.2, linestyle="--"),
        GAP_LABEL: Patch(color="0.3", alpha=0.15, linewidth=0),
    }
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(neutral.get(label, handle))
                labels.append(label)
    if handles:
        width = fig.get_figwidth()
        across = 4 if width >= 13 else 3 if width >= 9.5 or len(labels) <= 3 else 2
        fig.legend(handles, labels, loc="outside lower center", ncols=min(across, len(labels)))


# ---- probe, compare, check: a panel per optimizer ---------------------------------------------
def optimizer_figure(report: ProbeReport, baseline: Recorded | None = None) -> Figure:
    """A panel per optimizer of ``report`` (see the module doc); ``baseline``: check's."""
    results = list(report.results)
    fig, axes = _figure(max(1, len(results)), share_y=True)
    if not results:
        axes[0].text(0.5, 0.5, "no optimizer stepped", ha="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return fig
    recorded = {r.optimizer: r for r in baseline.results} if baseline is not None else {}
    positive = False
    seen: set[str] = set()
    for ax, result in zip(axes, results, strict=True):
        positive |= _optimizer_panel(ax, result, recorded.get(result.optimizer))
        _mark_findings(ax, _findings_of(report, result.optimizer), seen)
    if positive:
        _log_y(axes[0])  # shared: every panel
    axes[0].set_ylabel("global grad L2 norm")
    what = "global grad norm before (dashed) and after (solid) optimizer.step(), per optimizer"
    if baseline is not None:
        what += "; grey: the baseline"
    fig.suptitle(what, fontsize=10)
    _legend(fig, axes)
    return fig


def _optimizer_panel(ax: Axes, result: OptimizerResult, recorded: Any) -> bool:
    """Draw one optimizer; whether it had a positive norm (a log scale can show it)."""
    from matplotlib.ticker import MaxNLocator

    if not result.steps:
        why = result.error or "no steps were recorded"
        _title(ax, result.optimizer, result.verdict, alarm=result.flagged)
        text = ax.text(
            0.5,
            0.5,
            textwrap.fill("no curve: " + _shorten(why, 200), 44),
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
        text.set_in_layout(False)  # the panel keeps its size, whatever the message
        ax.set_xticks([])
        return False
    x = [s.step for s in result.steps]
    pre = [s.pre_step_grad_norm for s in result.steps]
    post = [s.post_step_grad_norm for s in result.steps]
    color = FLAGGED if result.flagged else CLEAN
    every = _markevery(len(x))
    ax.plot(
        x,
        post,
        linestyle="-",
        color=color,
        linewidth=1.8,
        marker=".",
        markevery=every,
        label=POST_LABEL,
    )
    ax.plot(x, pre, linestyle="--", color=DASHED[color], linewidth=1.2, label=PRE_LABEL)
    finite = [
        (a, b, c)
        for a, b, c in zip(x, pre, post, strict=True)
        if math.isfinite(b) and math.isfinite(c)
    ]
    if finite:
        fx, fpre, fpost = zip(*finite, strict=True)
        ax.fill_between(fx, fpre, fpost, color=color, alpha=0.15, linewidth=0, label=GAP_LABEL)
    if recorded is not None:
        steps = range(len(recorded.pre_step_grad_norms))
        ax.plot(steps, recorded.pre_step_grad_norms, "--", color=BASELINE, linewidth=0.9,
                label="baseline pre-step")  # fmt: skip
        ax.plot(steps, recorded.post_step_grad_norms, "-", color=BASELINE, linewidth=0.9,
                label="baseline post-step")  # fmt: skip
    verdict = result.verdict + (f" ({result.fingerprint})" if result.fingerprint else "")
    _title(
        ax,
        result.optimizer,
        f"{verdict} · post/pre {_ratio(result.norm_ratio)}",
        alarm=result.flagged,
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="both", alpha=0.25)
    return _positive(pre + post)


def _log_y(ax: Axes) -> None:
    """A log y axis with plain numbers: minor ticks are labelled only when the axis spans
    under a decade (otherwise matplotlib writes ``1.25x10^0`` there, or nothing at all)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _position: object) -> str:
        low, high = ax.get_ylim()
        return f"{value:.3g}" if low > 0 and high / low < 10 else ""

    ax.set_yscale("log", nonpositive="mask")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- sfdiag run: a panel per logged metric ----------------------------------------------------
def run_figure(report: ProbeReport) -> Figure:
    """A panel per judged logged metric (see the module doc); the optimizer panels where
    the script logged none."""
    metrics = [m for m in report.metrics or () if m.series is not None and len(m.series)]
    if not metrics:
        fig = optimizer_figure(report)
        fig.suptitle(
            "no logged gradient metric or learning rate was judged\nthe optimizers' global "
            "grad norm before (dashed) and after (solid) step()",
            fontsize=10,
        )
        return fig
    fig, axes = _figure(len(metrics), share_y=False)
    seen: set[str] = set()
    for ax, metric in zip(axes, metrics, strict=True):
        _metric_panel(ax, metric)
        _mark_findings(ax, _findings_of(report, metric.optimizer), seen)
    fig.suptitle("logged values (dots) against what they should be, per logged metric", fontsize=10)
    _legend(fig, axes)
    return fig


def _metric_panel(ax: Axes, metric: MetricResult) -> None:
    from matplotlib.ticker import MaxNLocator

    series = metric.series
    assert series is not None
    steps = list(series.steps)
    rate = metric.quantity == "learning_rate"
    true_label = "applied rate" if rate else "true ‖g‖ (pre-clip / pre-step)"
    other_label = "base rate (group lr)" if rate else "post-step ‖g‖"
    every = _markevery(len(steps))
    ax.plot(steps, list(series.true), "--", color=TRUE, linewidth=1.3, label=true_label)
    # wide and pale: a logged line that runs along it shows on top
    ax.plot(steps, list(series.other), "-", color=OTHER, linewidth=3, alpha=0.5, label=other_label)
    color = FLAGGED if metric.wrong else CLEAN
    ax.plot(
        steps,
        list(series.logged),
        linestyle="-",
        linewidth=0.8,
        alpha=0.9,
        color=color,
        marker="o",
        markersize=3.5,
        markevery=every,
        label="logged",
    )
    for i, step in enumerate(series.skipped):  # the loss scaler skipped these: no step ran
        label = "a step the loss scaler skipped" if i == 0 else None
        ax.axvline(step, color=SKIPPED, linewidth=1.2, alpha=0.6, linestyle="--", label=label)
    values = list(series.logged) + list(series.true) + list(series.other)
    if not rate and _positive(values):
        _log_y(ax)
    who = f"{metric.name} ({metric.logger})"
    if metric.scope:
        who += f" · {metric.scope}"
    second = f"{metric.verdict} · logged/true {_ratio(metric.ratio)} · {metric.steps_judged} steps"
    _title(ax, _shorten(who, 60), second, alarm=metric.wrong)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("learning rate" if rate else "grad L2 norm", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="both", alpha=0.25)


# ---- output --------------------------------------------------------------------------------
def figure_for(report: ProbeReport, baseline: Recorded | None = None) -> Figure:
    """The figure of a report: a run's (it has ``metrics``) or a probe's."""
    require_matplotlib()
    if report.metrics is not None:
        return run_figure(report)
    return optimizer_figure(report, baseline)


def plot_png(report: ProbeReport, baseline: Recorded | None = None) -> bytes:
    """The figure as PNG bytes."""
    fig = figure_for(report, baseline)
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_plot(
    report: ProbeReport,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    baseline: Recorded | None = None,
) -> Path:
    """Draw the report and write the PNG to ``path`` atomically (refuses to overwrite
    an existing file unless ``force``)."""
    check_plot_path(path, force=force)
    return write_atomic(path, plot_png(report, baseline), force=force, what="plot")
