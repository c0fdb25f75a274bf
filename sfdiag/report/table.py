"""``--format table`` (the default): a rich table for a terminal, then plain sentences.

Rendered into a string, not printed: the CLI decides where it goes. Without
``options.color`` the output holds no ANSI escape at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import StringIO
from typing import TYPE_CHECKING, Any

from sfdiag.report import _text

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from sfdiag.report._options import RenderOptions
    from sfdiag.results import CheckResult, MetricResult, OptimizerResult, ProbeReport

DEFAULT_WIDTH = 120

_FLAGGED = "bold red"
_ERROR = "bold magenta"
_CLEAN = "green"
_NOTE = "bold yellow"


def _console(options: RenderOptions) -> tuple[Console, StringIO]:
    from rich.console import Console

    buffer = StringIO()
    console = Console(
        file=buffer,
        force_terminal=options.color,
        no_color=not options.color,
        color_system="standard" if options.color else None,
        width=options.width or DEFAULT_WIDTH,
        highlight=False,
        emoji=False,
        markup=False,
        legacy_windows=False,
        _environ={},  # TERM, COLUMNS, NO_COLOR...: the caller decided, through options
    )
    return console, buffer


def _verdict_style(verdict: str) -> str:
    if verdict == "error":
        return _ERROR
    return _CLEAN if verdict == "clean" else _FLAGGED


# Columns of the main table: (header, right-aligned, dropped first on a narrow terminal
# = lower rank; None = never dropped). Optimizer, post-step norm and verdict always stay.
_COLUMNS = (
    ("optimizer", False, None),
    ("class", False, 1),
    ("pre-step\n‖g‖", True, 5),
    ("post-step\n‖g‖", True, None),
    ("ratio\npost/pre", True, 6),
    ("ratio\nper step", False, 2),
    ("params\nmutated", True, 4),
    ("state", True, 3),
    ("verdict", False, None),
)


def _cells(report: ProbeReport) -> list[list[tuple[str, str]]]:
    """(text, style) per column, per optimizer."""
    scale = _text.spark_scale(report.results)
    rows = []
    for r in report.results:
        name_style = _ERROR if r.verdict == "error" else (_FLAGGED if r.flagged else "")
        rows.append(
            [
                (r.optimizer, name_style),
                (_text.short_class(r.cls), ""),
                (_text.fmt_pre_step(r), ""),
                (_text.fmt_norm(r, r.post_step_grad_norm), ""),
                (_text.fmt_norm(r, r.norm_ratio, ratio=True), ""),
                (_text.sparkline(r, scale) or "-", ""),
                (_text.fmt_mutated(r), ""),
                (_text.fmt_bytes_per_element(r.state_bytes_per_element), ""),
                (
                    _text.verdict_text(r),
                    _NOTE if r.undetermined or _text.none_audited(r) else _verdict_style(r.verdict),
                ),
            ]
        )
    return rows


def _fitting(
    columns: Sequence[tuple[str, bool, int | None]], rows: list[list[tuple[str, str]]], width: int
) -> list[int]:
    """Indices of the columns to show: drop the least useful until the rest fit."""
    from rich.cells import cell_len

    def need(i: int) -> int:
        header = max(cell_len(line) for line in columns[i][0].split("\n"))
        return max([header, *(cell_len(row[i][0]) for row in rows)]) + 2

    keep = list(range(len(columns)))
    droppable = sorted((rank, i) for i, (_, _, rank) in enumerate(columns) if rank is not None)
    for _, i in droppable:
        if sum(need(k) for k in keep) <= width:
            break
        keep.remove(i)
    return keep


def _fitted_table(
    columns: Sequence[tuple[str, bool, int | None]], rows: list[list[tuple[str, str]]], width: int
) -> Any:
    """A table of ``rows`` with the columns that fit ``width``; the kept-at-any-width columns
    (rank None) fold, numbers never wrap."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    keep = _fitting(columns, rows, width)
    table = Table(box=box.SIMPLE_HEAVY, header_style="bold", pad_edge=False, collapse_padding=True)
    for i in keep:
        header, right, rank = columns[i]
        wrap = rank is None
        table.add_column(
            header,
            justify="right" if right else "left",
            no_wrap=not wrap,
            overflow="fold" if wrap else "ellipsis",
            min_width=6 if wrap else None,
        )
    for row in rows:
        table.add_row(*(Text(row[i][0], style=row[i][1]) for i in keep))
    return table


def _optimizer_table(report: ProbeReport, width: int) -> Any:
    return _fitted_table(_COLUMNS, _cells(report), width)


_METRIC_COLUMNS = (
    ("logged metric", False, None),
    ("quantity", False, 7),
    ("logger", False, 2),
    ("optimizer", False, 1),
    ("steps\njudged", True, 3),
    ("logged\n(median)", True, 5),
    ("true\n(median)", True, 4),
    ("ratio", True, 6),
    ("verdict", False, None),
)
_QUANTITY_WORDS = {"grad_norm": "‖g‖", "learning_rate": "lr"}


def _metric_style(verdict: str) -> str:
    if verdict == "correct":
        return _CLEAN
    from sfdiag.results import NOTE_METRIC_VERDICTS

    return _NOTE if verdict in NOTE_METRIC_VERDICTS else _FLAGGED


def _metric_table(metrics: Sequence[MetricResult], width: int) -> Any:
    """What the script logged, judged: one row per metric."""
    rows = [
        [
            (m.name, ""),
            (_QUANTITY_WORDS.get(m.quantity, m.quantity), ""),
            (m.logger, ""),
            (m.optimizer or "-", ""),
            (str(m.steps_judged), ""),
            (_text.fmt_num(m.logged_median), ""),
            (_text.fmt_num(m.true_median), ""),
            (_text.fmt_ratio(m.ratio), ""),
            (m.verdict, _metric_style(m.verdict)),
        ]
        for m in metrics
    ]
    return _fitted_table(_METRIC_COLUMNS, rows, width)


def _param_table(result: OptimizerResult) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    title = f"{result.optimizer} ({_text.short_class(result.cls)}): per parameter"
    table = Table(title=title, box=box.SIMPLE, header_style="bold", title_justify="left")
    table.add_column("parameter", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("pre-step ‖g‖", justify="right", no_wrap=True)
    table.add_column("post-step ‖g‖", justify="right", no_wrap=True)
    table.add_column("max rel change", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("fingerprint", overflow="fold")
    for p in result.params:
        table.add_row(
            Text(p.name),
            Text(_text.fmt_shape(p.shape)),
            Text(_text.fmt_num(p.pre_step_grad_norm)),
            Text(_text.fmt_num(p.post_step_grad_norm)),
            Text(_text.fmt_num(p.max_rel_change)),
            Text(p.verdict, style=_verdict_style(p.verdict)),
            Text(p.fingerprint or "-"),
        )
    return table


def render_report(report: ProbeReport, options: RenderOptions) -> str:
    from rich.text import Text

    console, buffer = _console(options)
    console.print(Text(_text.header_line(report), style="dim"), soft_wrap=True)
    interrupted = _text.interrupted_line(report)
    if interrupted:
        console.print(Text(interrupted, style=_NOTE), soft_wrap=True)
    ranks = _text.distributed_line(report)
    if ranks:
        style = _FLAGGED if report.ranks_disagree else "dim"
        console.print(Text(ranks, style=style), soft_wrap=True)
        for line in _text.per_rank_lines(report):
            console.print(Text(line, style=_NOTE), soft_wrap=True)
    if report.results:
        console.print(_optimizer_table(report, console.width))
        for note in _text.clip_notes(report):
            console.print(Text(note, style="dim"), soft_wrap=True)
    else:
        console.print("No optimizer finished a probe.")
    for result in report.results:
        if options.per_param and result.params:
            console.print(_param_table(result))
    if report.metrics:
        console.print(_metric_table(report.metrics, console.width))
    elif report.metrics is not None and not any(r.not_audited for r in report.results):
        console.print(Text(_text.NO_METRICS_NOTE, style="dim"), soft_wrap=True)
    sentences = _text.advice_sentences(report) + _text.metric_sentences(report)
    for sentence in sentences:
        console.print(Text(sentence), soft_wrap=True)  # one line each: greppable in CI logs
    if sentences:
        console.print()
    modes = _text.findings_lines(report)
    if modes:
        console.print(Text("schedule-free modes:", style="bold"))
        for finding, line in zip(report.findings or (), modes, strict=True):
            style = _FLAGGED if finding.failing else _NOTE
            console.print(Text(line, style=style), soft_wrap=True)
        console.print()
    style = "bold" if report.any_flagged else _CLEAN
    console.print(Text(_text.summary_line(report), style=style))
    return _strip(buffer.getvalue())


def render_check(check: CheckResult, options: RenderOptions) -> str:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    console, buffer = _console(options)
    if check.baseline_path:
        line = f"compared with baseline {check.baseline_path}"
        console.print(Text(line, style="dim"), soft_wrap=True)
    if check.differences:
        table = Table(
            box=box.SIMPLE_HEAVY, header_style="bold", pad_edge=False, collapse_padding=True
        )
        table.add_column("optimizer", overflow="fold", min_width=6)
        table.add_column("what moved", overflow="fold")
        table.add_column("baseline", justify="right", overflow="fold")
        table.add_column("now", justify="right", overflow="fold")
        table.add_column("change", justify="right", no_wrap=True)
        table.add_column("allowed", justify="right", no_wrap=True)
        table.add_column("status", no_wrap=True)
        for d in check.differences:
            status = _text.difference_status(d)
            style = _FLAGGED if d.regression else (_CLEAN if status == "ok" else "")
            table.add_row(
                Text(d.optimizer or "(all)"),
                Text(d.what),
                Text(_text.fmt_value(d.baseline_value)),
                Text(_text.fmt_value(d.current_value)),
                Text(_text.fmt_change(d.change)),
                Text(_text.fmt_allowed(d)),
                Text(status, style=style),
            )
        console.print(table)
    else:
        console.print("Nothing moved: this run matches the baseline.")
    console.print(
        Text(_text.check_summary_line(check), style=_FLAGGED if check.regressed else _CLEAN)
    )
    return _strip(buffer.getvalue())


def _strip(text: str) -> str:
    """No trailing blanks (rich pads every line of a table to its width)."""
    return "\n".join(line.rstrip(" ") for line in text.split("\n"))
