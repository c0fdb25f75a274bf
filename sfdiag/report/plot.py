"""``--plot FILE.png``: the global grad norm before and after ``step()``, step by step.

Dashed: the gradient backward() produced (snapshot A). Solid: what a logger reading
``p.grad`` after ``step()`` sees (snapshot B). A mutating optimizer is a solid line
far from its dashed twin. Drawn with matplotlib's Agg canvas, no pyplot, no display.
"""

from __future__ import annotations

import math
import os
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from sfdiag.errors import SfdiagError
from sfdiag.fileio import check_writable, write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.results import ProbeReport

MISSING_MATPLOTLIB = "--plot needs matplotlib: pip install 'sfdiag[plot]'"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401  (None in sys.modules also lands here)
    except ImportError:
        raise SfdiagError(MISSING_MATPLOTLIB) from None


def plot_png(report: ProbeReport) -> bytes:
    """The figure as PNG bytes."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles, labels, flagged_labels, not_plotted = [], [], set(), []
    positive = False
    for i, result in enumerate(report.results):
        color = f"C{i % 10}"
        if not result.steps:
            not_plotted.append(result.optimizer)
            continue
        x = [s.step for s in result.steps]
        pre = [s.pre_step_grad_norm for s in result.steps]
        post = [s.post_step_grad_norm for s in result.steps]
        positive = positive or any(math.isfinite(v) and v > 0 for v in pre + post)
        ax.plot(x, pre, linestyle="--", color=color, alpha=0.7, linewidth=1.2)
        (line,) = ax.plot(x, post, linestyle="-", color=color, linewidth=1.8, marker=".")
        label = result.optimizer
        if result.flagged:
            what = result.verdict + (f", {result.fingerprint}" if result.fingerprint else "")
            label = f"{label}  [FLAGGED: {what}]"
            flagged_labels.add(label)
        handles.append(line)
        labels.append(label)
    if positive:
        ax.set_yscale("log", nonpositive="mask")
    else:
        ax.text(0.5, 0.5, "no positive grad norm to plot", ha="center", transform=ax.transAxes)
    handles += [
        Line2D([], [], color="gray", linestyle="--"),
        Line2D([], [], color="gray", linestyle="-"),
    ]
    labels += ["pre-step ‖g‖ (dashed)", "post-step ‖g‖ (solid)"]
    legend = ax.legend(handles, labels, fontsize="small", loc="best")
    for text in legend.get_texts():
        if text.get_text() in flagged_labels:
            text.set_color("tab:red")
            text.set_fontweight("bold")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("global grad L2 norm")
    ax.set_title("Grad norm before (dashed) and after (solid) optimizer.step()")
    ax.grid(True, which="both", alpha=0.3)
    if not_plotted:
        fig.text(0.01, 0.01, "not plotted (no steps): " + ", ".join(not_plotted), fontsize=8)
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_plot(report: ProbeReport, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Draw the report and write the PNG to ``path`` atomically (refuses to overwrite
    an existing file unless ``force``)."""
    require_matplotlib()
    check_writable(path, force, what="plot")
    return write_atomic(path, plot_png(report), force=force, what="plot")
