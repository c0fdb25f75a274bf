"""``sfdiag run``: an unmodified training script, its optimizers and logged metrics audited.

The script runs in this process, as ``python`` would run it (``launch``). While it
runs:

- torch's global optimizer step hooks watch every optimizer that steps (``watch``):
  the in-place audit on sampled steps, the grad norms around ``step()`` on every step;
- torch's clipping functions are wrapped to keep the norm they measured (``clipping``);
- the loggers' public calls are tapped (``taps``) and every gradient metric the script
  logs is judged against the norms of the step it belongs to (``metrics``,
  ``sfdiag.run.judge``).

When it ends, the verdict tables go to **stderr** (the script's stdout stays exactly
what it printed), the JSON report to ``--report`` and the picture to ``--plot``
(atomically; the paths are checked before the script starts). Exit code: the script's
own, except that ``--strict`` turns 0 into 1 when a logged metric is wrong, or, where the
script logs no gradient metric, when an optimizer is flagged. A script that ends the process itself
(``os._exit``) leaves no report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdiag.errors import SfdiagError
from sfdiag.run.launch import EXIT_INTERRUPTED, Target, parse_command
from sfdiag.run.watch import AUDIT_EVERY, AUDIT_FIRST, AUDIT_MAX, audited

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.dist import Job
    from sfdiag.results import Finding, MetricResult, OptimizerResult, ProbeReport

__all__ = [
    "AUDIT_EVERY",
    "AUDIT_FIRST",
    "AUDIT_MAX",
    "EXIT_INTERRUPTED",
    "RunOptions",
    "Target",
    "audited",
    "gate",
    "parse_command",
    "run_script",
]


@dataclass(frozen=True)
class RunOptions:
    """What ``sfdiag run`` takes besides the command."""

    report: Path | None = None
    strict: bool = False
    force: bool = False
    quiet: bool = False
    metrics: tuple[str, ...] = ()  # --metric globs: names the gradient-norm pattern misses
    metric_rtol: float = 1e-3
    # given (1 included, as torchrun --nproc-per-node 1): a job of this many local ranks
    # through torch's elastic launcher; None runs the script as a plain process
    nproc: int | None = None
    plot: Path | None = None  # draw logged vs true, a panel per logged metric, to this PNG

    def validate(self) -> RunOptions:
        import math

        nproc = self.nproc
        if nproc is not None and (
            isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= 1024
        ):
            raise SfdiagError(f"--nproc: expected a whole number from 1 to 1024, got {nproc!r}")
        rtol = self.metric_rtol
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
            raise SfdiagError(f"--metric-rtol: expected a number, got {rtol!r}")
        if not (math.isfinite(rtol) and 0 < rtol < 1):
            raise SfdiagError(f"--metric-rtol: must be > 0 and < 1, got {rtol!r}")
        for glob in self.metrics:
            if not glob or not glob.strip():
                raise SfdiagError("--metric: an empty name; give a metric name or a glob")
        return self

    def worker_arguments(self) -> list[str]:
        """These options as every rank's ``sfdiag run`` takes them (no --nproc)."""
        words = []
        if self.report is not None:
            words += ["--report", str(self.report)]
        if self.plot is not None:
            words += ["--plot", str(self.plot)]
        words += ["--strict"] * self.strict + ["--force"] * self.force + ["--quiet"] * self.quiet
        for glob in self.metrics:
            words += ["--metric", glob]
        return [*words, "--metric-rtol", repr(float(self.metric_rtol))]


def checked_outputs(options: RunOptions) -> RunOptions:
    """``options`` with the report and plot paths checked (writable, not over a file
    without ``force``, not one path for both; matplotlib there for a plot) and made
    absolute (the script may chdir): before the script runs, not after."""
    from sfdiag.fileio import check_writable

    report, plot = options.report, options.plot
    if report is not None:
        report = check_writable(report, options.force, what="report").absolute()
    if plot is not None:
        from sfdiag.report.plot import check_plot_path

        plot = check_plot_path(
            plot, force=options.force, beside=report, beside_flag="--report"
        ).absolute()
    return replace(options, report=report, plot=plot)


def write_outputs(report: ProbeReport, options: RunOptions) -> None:
    """The JSON report and the plot, each atomically, where asked for (the paths were
    checked before the script ran: ``checked_outputs``; a file the script itself put
    there meanwhile is still not clobbered without ``--force``)."""
    from sfdiag import ui
    from sfdiag.fileio import write_atomic
    from sfdiag.report import render

    if options.report is not None:
        write_atomic(options.report, render(report, "json"), force=options.force, what="report")
        ui.note(f"sfdiag: json report written to {options.report}", quiet=options.quiet)
    if options.plot is not None:
        from sfdiag.report.plot import write_plot

        write_plot(report, options.plot, force=options.force)
        ui.note(f"sfdiag: plot written to {options.plot}", quiet=options.quiet)


def gate(report: ProbeReport, *, strict: bool) -> bool:
    """Whether ``--strict`` fails this run (see the module doc)."""
    if not strict:
        return False
    if report.ranks_disagree or report.any_failing_finding or report.any_wrong_metric:
        return True
    if any(m.quantity == "grad_norm" for m in report.metrics or ()):
        return False  # the numbers the user reads are right: the mutation is beside them
    return report.any_flagged


def run_script(argv: list[str], options: RunOptions | None = None, /, **fields: Any) -> int:
    """Run ``argv`` (what follows ``--``) with its optimizers and logged metrics audited.

    ``options`` or, instead, its fields as keywords (``report=``, ``strict=``...).
    Prints the tables on stderr (the script's stdout is left alone), writes the JSON
    report to ``options.report`` if given, and returns the exit code (see the module
    doc). Raises SfdiagError before running anything when the command, the options or
    the report path is unusable.

    ``options.nproc`` (1 included) or a ``torchrun`` command starts a job through torch's
    elastic launcher, each rank running this under the auditor; a process that is already
    a rank of a job (``RANK``/``WORLD_SIZE`` set, as torchrun sets them) joins it. Either
    way the job is audited as one: rank 0 prints the one table and writes the one report.
    """
    options = (options or RunOptions(**fields)).validate()
    from sfdiag.run import launch

    target = parse_command(argv)
    if target.path is not None:
        launch.check_script(target.path)
    options = checked_outputs(options)
    job = _this_job()
    if options.nproc is not None or target.torchrun is not None:
        if job is not None:
            raise SfdiagError(
                f"this is already rank {job.rank} of a job of {job.world_size}: "
                "leave out --nproc and torchrun here"
            )
        if options.nproc is not None and target.torchrun is not None:
            raise SfdiagError("give --nproc or a torchrun command, not both")
        worker = options.worker_arguments()
        return launch.launch_job(launch.job_arguments(target, options.nproc or 1, worker))
    return _audit_here(argv, target, options, job)


def _this_job() -> Job | None:
    """The job this process is a rank of: one of several ranks (``RANK``/``WORLD_SIZE``),
    or the one rank torch's elastic launcher started (``torchrun --nproc-per-node 1``,
    ``--nproc 1``), a job too: its script expects the rendezvous, its report says so. A
    plain process that merely has ``WORLD_SIZE=1`` in its environment runs alone."""
    import os

    from sfdiag.dist import Job

    env = os.environ
    launched = bool(env.get("TORCHELASTIC_RUN_ID"))  # set by the launcher for its workers
    if launched and env.get("WORLD_SIZE") == "1" and env.get("RANK", "0") == "0":
        return Job(rank=0, world_size=1, local_rank=0)
    return Job.from_env()


def _audit_here(argv: list[str], target: Target, options: RunOptions, job: Any) -> int:
    """Run the script in this process, audited; this rank's part of a job if ``job``."""
    from sfdiag import ui
    from sfdiag.report import RenderOptions, render
    from sfdiag.run import launch
    from sfdiag.run.session import AuditSession

    session = AuditSession(options, job)
    with launch.script_environment(target):
        if target.module is not None:
            launch.check_module(target.module)
        session.start()
        try:
            code, interrupted, namespace = launch.run_target(target, interrupt_once=job is not None)
        finally:
            session.stop()
    _flush(sys.stdout)

    result: ProbeReport | None = session.report({"command": list(argv)}, interrupted)
    writes_report = job is None or job.leader
    if job is not None:
        if code != 0 and not interrupted:
            # this rank failed: it must not wait for the others (the launcher stops them)
            if not session.watch.watched:
                print(launch.nothing_stepped(target, None, code, rank=job.rank), file=sys.stderr)
            return code
        results, metrics, findings = session.collect()
        watch = session.watch
        result = _as_one_job(result, job, watch, code, results, metrics, findings, options.quiet)
        if result is None:  # not rank 0: rank 0 reports for the job
            return code
    if result.results or result.metrics:
        text = render(result, "table", RenderOptions(color=ui.wants_color(sys.stderr)))
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
    else:
        said = launch.nothing_stepped(target, namespace, code, interrupted=interrupted)
        print(said, file=sys.stderr)
    for note in session.notes():
        ui.note(note, quiet=options.quiet)
    if writes_report:
        write_outputs(result, options)
    _flush(sys.stderr)
    if code == 0 and gate(result, strict=options.strict):
        return 1
    return code


def _as_one_job(
    report: ProbeReport,
    job: Any,
    watch: Any,
    code: int,
    results: Sequence[OptimizerResult],
    metrics: Sequence[MetricResult],
    findings: Sequence[Finding],
    quiet: bool,
) -> ProbeReport | None:
    """Every rank's summary to rank 0, which gets the job's report; None on other ranks.
    Where the ranks cannot be reached, each rank reports for itself, and says so."""
    from sfdiag import ui
    from sfdiag.dist import ChannelError
    from sfdiag.results import DistributedInfo
    from sfdiag.run.job import merge, summarize_rank

    channel = watch.channel
    if channel is not None and report.interrupted:
        # Ctrl-C may have stopped the ranks at different calls of the channel: gather the
        # job's report over a channel of its own, which every rank opens afresh
        channel.abandon("interrupted")
        channel = _fresh_channel(job, watch)
    if channel is not None:
        try:
            summary = summarize_rank(job.rank, code, results, metrics, findings, watch)
            summaries = channel.gather(summary)
        except ChannelError as exc:
            watch.channel_error, summaries = str(exc), None
            channel = None
        else:
            channel.close()
            return merge(report, summaries) if summaries is not None else None
    why = watch.channel_error or "no process group to reach them through"
    ui.note(
        f"sfdiag: rank {job.rank} of {job.world_size} reports alone: the ranks could not be "
        f"joined ({why})",
        quiet=quiet,
    )
    return replace(  # its own table on every rank; rank 0 writes the file
        report,
        distributed=DistributedInfo(job.world_size, watch.script_backend, "none", None),
    )


def _fresh_channel(job: Any, watch: Any) -> Any:
    """A channel of its own for the job's report after Ctrl-C, or None (with why)."""
    from sfdiag.dist import Channel

    try:
        return Channel.open(job, name="/after-interrupt")
    except Exception as exc:  # the ranks cannot be joined: each reports alone
        watch.channel_error = f"{type(exc).__name__}: {exc}"
        return None


def _flush(stream: Any) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass
