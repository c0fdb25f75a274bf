"""Callbacks that keep ``sfdiag.audit()`` switched on inside a training framework.

    from sfdiag.integrations.lightning import SfdiagCallback      # lightning.pytorch.Callback
    from sfdiag.integrations.transformers import SfdiagCallback   # transformers.TrainerCallback

Each runs the in-process audit (``sfdiag.run.inprocess.Audit``: the same taps, judge and report)
from the start of ``fit``/``train`` to its end and puts what it found where the run's
own numbers go: the trainer's loggers. This module holds what both share and imports
neither framework (nor torch): importing ``sfdiag.integrations`` stays cheap, and each
framework is imported only by its own module, when the user imports it.

- ``CallbackAudit``: the options of ``sfdiag.audit()``, one audit per fit, started and
  finished by the callback; in a multi-rank job each rank audits and rank 0 reports the
  job, as ``sfdiag run`` does.
- ``early_warnings``: the logged metrics already judged wrong, once per metric, at a
  cheap cadence (after the first ``AUDIT_FIRST`` steps, then every ``AUDIT_EVERY``).
- ``logged_items``: the report as logger entries: strings (``sfdiag/<optimizer>/verdict``,
  ``sfdiag/<metric>/verdict``) and numbers (``sfdiag/<optimizer>/post_pre_ratio``,
  ``sfdiag/<metric>/wrong``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdiag.errors import SfdiagError
from sfdiag.run.inprocess import Audit

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.dist import Job
    from sfdiag.results import MetricResult, ProbeReport

__all__ = ["AuditFailed", "CallbackAudit", "failure_message", "logged_items"]

#: the first check for wrong metrics, in optimizer steps (the steps every optimizer is
#: audited at: sfdiag.run.watch.AUDIT_FIRST), and the checks after it (AUDIT_EVERY)
FIRST_CHECK = 20
CHECK_EVERY = 100


class AuditFailed(SfdiagError):
    """``strict=True``: the audit failed as ``sfdiag run --strict`` would, raised when the
    training has ended (its checkpoints saved). ``report``: the ProbeReport."""

    def __init__(self, message: str, report: ProbeReport) -> None:
        super().__init__(message)
        self.report = report


class _CallbackRun(Audit):
    """``sfdiag.audit()`` for one fit; in a multi-rank job (``job``), a rank of the job's
    audit as ``sfdiag run`` runs it: sfdiag's own channel between the ranks, every rank's
    summary gathered to rank 0, which alone shows the tables and writes the files."""

    def __init__(self, job: Job | None, **options: Any) -> None:
        super().__init__(**options)
        self.job = job
        self.leader = job is None or job.leader

    def __enter__(self) -> _CallbackRun:
        if self.job is None:
            super().__enter__()
            return self
        from sfdiag.run import checked_outputs
        from sfdiag.run.session import AuditSession

        if self._session is not None:
            raise SfdiagError("sfdiag: this audit is running already")
        if self.leader:  # rank 0 writes the files: its paths are checked before training
            self.options = checked_outputs(self.options)
        self._session = AuditSession(self.options, self.job).start()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if self.job is None:
            super().__exit__(kind, error, traceback)
            return
        session, self._session = self._session, None
        if session is None:
            return
        session.stop()
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        report: ProbeReport | None = session.report({"in_process": True}, interrupted)
        if kind is None:  # every rank ends here: one report for the job, on rank 0
            from sfdiag.run import _as_one_job

            results, metrics, findings = session.collect()
            merged = _as_one_job(
                report,
                self.job,
                session.watch,
                0,
                results,
                metrics,
                findings,
                self.options.quiet,
            )
            if merged is None:  # not rank 0: rank 0 reports for the job
                self.report = report  # this rank's own, for the code that asks
                return
            report = merged
        # else this rank failed: it must not wait for the others, and reports alone
        self.report = report
        if not self.leader:
            return
        from sfdiag import ui

        if self.show:
            sys.stderr.write(self._text(color=ui.wants_color(sys.stderr)))
        for note in session.notes():
            ui.note(note, quiet=self.options.quiet)
        from sfdiag.run import write_outputs

        write_outputs(report, self.options)


class CallbackAudit:
    """What a callback holds: the options of ``sfdiag.audit()`` and the audit of the fit
    under way (see the module doc). ``plot``: True to log the run's picture to the
    trainer's loggers, or a path to also write it there as a PNG."""

    def __init__(
        self,
        report: str | os.PathLike[str] | None = None,
        *,
        plot: bool | str | os.PathLike[str] | None = None,
        strict: bool = False,
        metrics: tuple[str, ...] | list[str] = (),
        show: bool = True,
        metric_rtol: float = 1e-3,
        force: bool = False,
        quiet: bool = False,
    ) -> None:
        plot_path = None if plot is None or isinstance(plot, bool) else plot
        self.plot_image = plot is not None and plot is not False
        if self.plot_image and importlib.util.find_spec("matplotlib") is None:
            raise SfdiagError("plot=: needs matplotlib (pip install matplotlib)")
        self._options: dict[str, Any] = {
            "report": report,
            "plot": plot_path,
            "strict": strict,
            "metrics": tuple(metrics),
            "show": show,
            "metric_rtol": metric_rtol,
            "force": force,
            "quiet": quiet,
        }
        Audit(**self._options)  # refuse bad options now, where the callback is made
        self.audit: _CallbackRun | None = None  # the fit under way, or the last one
        self._warned: set[tuple[str, str]] = set()
        self._next_check = FIRST_CHECK

    # ---- the fit ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.audit is not None and self.audit._session is not None

    @property
    def report(self) -> ProbeReport | None:
        """The last finished fit's report (on a rank other than 0: that rank's own)."""
        return self.audit.report if self.audit is not None else None

    @property
    def leader(self) -> bool:
        return self.audit is None or self.audit.leader

    def start(self, job: Job | None = None) -> None:
        """Install the audit (a fit's start); one still running from a fit that never
        ended (an exception the framework reports to no callback) is stopped first."""
        if self.running:
            self.finish(error=SfdiagError("a new fit started"))
        self._warned = set()
        self._next_check = FIRST_CHECK
        self.audit = _CallbackRun(job, **self._options)
        self.audit.__enter__()

    def finish(self, error: BaseException | None = None) -> ProbeReport | None:
        """Remove the audit and build the report (shown, written as the options say); the
        report rank 0 logs, None elsewhere and where no audit ran."""
        audit = self.audit
        if audit is None or audit._session is None:
            return None
        kind = type(error) if error is not None else None
        audit.__exit__(kind, error, error.__traceback__ if error is not None else None)
        return audit.report if audit.leader else None

    def check_strict(self) -> None:
        """``strict=True``: raise ``AuditFailed`` where ``sfdiag run --strict`` would fail."""
        audit = self.audit
        if audit is None or audit.report is None or not audit.leader:
            return
        if audit.options.strict and not audit.passed:
            raise AuditFailed(failure_message(audit.report), audit.report)

    def log_through(
        self, report: ProbeReport, step: int, sinks: list[Any], writer: Callable[..., Any]
    ) -> None:
        """The report into each of ``sinks`` (the trainer's loggers, or its integrations):
        ``writer(kinds, sink, report, strings, numbers, step, picture)`` gives what writes
        into one (``kinds``: the names of its classes), or None for one that takes nothing.
        A sink that refuses is named on stderr; the others still get their entries."""
        if not sinks:
            return
        strings, numbers = logged_items(report)
        with scratch_directory(self.plot_image) as scratch:
            picture = self.picture(report, scratch) if scratch is not None else None
            targets = []
            for sink in sinks:
                kinds = {cls.__name__ for cls in type(sink).__mro__}
                write = writer(kinds, sink, report, strings, numbers, step, picture)
                if write is not None:
                    targets.append((type(sink).__name__, write))
            each_logger(targets)

    # ---- while training ----------------------------------------------------------------------
    def early_warnings(self, steps: int) -> list[str]:
        """At ``steps`` optimizer steps done: a message per logged metric judged wrong so
        far, each metric once; checked after the first FIRST_CHECK steps, then every
        CHECK_EVERY (between checks this is one comparison)."""
        if steps < self._next_check or not self.running:
            return []
        self._next_check = steps + CHECK_EVERY
        if not self.leader:
            return []
        messages = []
        for metric in _wrong_so_far(self.audit, self._warned):
            self._warned.add((metric.logger, metric.name))
            messages.append(warning_text(metric, steps))
        return messages

    # ---- at the end --------------------------------------------------------------------------
    def picture(self, report: ProbeReport, directory: str | os.PathLike[str]) -> Path | None:
        """The run's picture as a PNG (the ``plot=`` path where given, else in
        ``directory``); None without ``plot`` or where it cannot be drawn."""
        if not self.plot_image:
            return None
        assert self.audit is not None
        written = self.audit.options.plot
        if written is not None and Path(written).exists():
            return Path(written)
        try:
            from sfdiag.report.plot import plot_png

            path = Path(directory) / "sfdiag-plot.png"
            path.write_bytes(plot_png(report))
        except Exception as exc:
            _say(f"sfdiag: the plot could not be drawn ({type(exc).__name__}: {exc})")
            return None
        return path


def _wrong_so_far(audit: Any, warned: set[tuple[str, str]]) -> list[MetricResult]:
    """The logged metrics whose judged steps so far include a wrong one, leaving out those
    in ``warned``."""
    from sfdiag.results import WRONG_METRIC_VERDICTS

    try:
        judged = audit._session.metric_audit.judged_so_far(skip=warned)
    except Exception:  # never a crash for a warning: the run goes on without it
        return []
    return [metric for metric in judged if metric.verdict in WRONG_METRIC_VERDICTS]


def warning_text(metric: MetricResult, steps: int) -> str:
    what = "learning rate" if metric.quantity == "learning_rate" else "gradient metric"
    text = (
        f"sfdiag: after {steps} steps, the logged {what} {metric.name!r} ({metric.logger}) "
        f"reads {metric.verdict} ({metric.steps_judged} values judged so far)"
    )
    return f"{text}: {metric.advice}" if metric.advice else text


def failure_message(report: ProbeReport) -> str:
    """Why ``strict=True`` fails: every verdict, the wrong ones first."""
    lines = []
    for metric in report.metrics or ():
        if metric.wrong:
            lines.append(f"  {metric.name} ({metric.logger}): {metric.verdict} (wrong)")
    for finding in report.findings or ():
        if finding.failing:
            lines.append(f"  {finding.optimizer}: {finding.kind} (from step {finding.first_step})")
    if report.ranks_disagree:
        lines.append("  the ranks stepped different gradients")
    for metric in report.metrics or ():
        if not metric.wrong:
            lines.append(f"  {metric.name} ({metric.logger}): {metric.verdict}")
    for result in report.results:
        lines.append(f"  {result.optimizer}: {result.verdict}")
    return "sfdiag (strict=True): the audit failed:\n" + "\n".join(lines)


def _number(value: float) -> float | None:
    import math

    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def logged_items(report: ProbeReport) -> tuple[dict[str, str], dict[str, float]]:
    """(strings, numbers) for the loggers: per optimizer ``sfdiag/<optimizer>/verdict``
    and ``sfdiag/<optimizer>/post_pre_ratio`` (and ``.../findings`` where the modes were
    wrong), per judged metric ``sfdiag/<metric>/verdict`` and ``sfdiag/<metric>/wrong``
    (1 or 0). A name logged through two loggers gets its worse verdict."""
    from sfdiag.run.judge import worst

    strings: dict[str, str] = {}
    numbers: dict[str, float] = {}
    for result in report.results:
        strings[f"sfdiag/{result.optimizer}/verdict"] = result.verdict
        ratio = _number(result.norm_ratio)
        if ratio is not None:
            numbers[f"sfdiag/{result.optimizer}/post_pre_ratio"] = ratio
    for metric in report.metrics or ():
        key = f"sfdiag/{metric.name}/verdict"
        verdict = metric.verdict if key not in strings else worst([strings[key], metric.verdict])
        strings[key] = verdict
        wrong = numbers.get(f"sfdiag/{metric.name}/wrong", 0.0)
        numbers[f"sfdiag/{metric.name}/wrong"] = max(wrong, 1.0 if metric.wrong else 0.0)
    found: dict[str, list[str]] = {}
    for finding in report.findings or ():
        found.setdefault(finding.optimizer, []).append(finding.kind)
    for optimizer, kinds in found.items():
        strings[f"sfdiag/{optimizer}/findings"] = ", ".join(kinds)
    return strings, numbers


def report_text(report: ProbeReport) -> str:
    """The verdict tables as the terminal shows them, in a markdown code block (TensorBoard
    renders its text entries as markdown)."""
    from sfdiag.report import RenderOptions, render

    return "```\n" + render(report, "table", RenderOptions(color=False)).rstrip() + "\n```"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def each_logger(targets: list[tuple[str, Callable[[], None]]]) -> None:
    """Run each ``(name, write)``; a logger that refuses is named on stderr, the others
    still get their entries (a broken dashboard must not lose the report)."""
    for name, write in targets:
        try:
            write()
        except Exception as exc:
            _say(f"sfdiag: could not log the audit to {name} ({type(exc).__name__}: {exc})")


@contextlib.contextmanager
def scratch_directory(wanted: bool) -> Iterator[str | None]:
    """A temporary directory (for the plot's PNG) where ``wanted``, else None."""
    if not wanted:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sfdiag-") as path:
        yield path


def mlflow_key(key: str) -> str:
    """``key`` as MLflow takes metric and tag names (letters, digits, ``_-. /:``)."""
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in key)


def to_tensorboard(
    writer: Any,
    report: ProbeReport,
    strings: dict[str, str],
    numbers: dict[str, float],
    step: int,
    picture: Path | None,
) -> None:
    """The entries into a ``SummaryWriter``: each string as text, the tables as one text,
    the numbers as scalars, the picture as an image."""
    for key, text in strings.items():
        writer.add_text(key, text, step)
    writer.add_text("sfdiag/report", report_text(report), step)
    for key, value in numbers.items():
        writer.add_scalar(key, value, step)
    if picture is not None:
        from matplotlib.image import imread

        pixels = imread(str(picture), format="png")[..., :3]  # (height, width, RGB) in [0, 1]
        writer.add_image("sfdiag/plot", pixels, step, dataformats="HWC")
    writer.flush()


def to_wandb(
    run: Any,
    image: Callable[[str], Any],
    strings: dict[str, str],
    numbers: dict[str, float],
    picture: Path | None,
) -> None:
    """The entries into a W&B run's summary; the picture logged as ``image(path)``."""
    run.summary.update({**strings, **numbers})
    if picture is not None:
        run.log({"sfdiag/plot": image(str(picture))})
