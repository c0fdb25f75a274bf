"""``sfdiag run``'s machinery, installed for a stretch of one process.

``AuditSession`` puts in place everything ``sfdiag run`` watches with: torch's global
optimizer step hooks (``watch``), the clipping wrappers (``clipping``), the logger taps
(``taps``), the schedule-free mode watching (``modes``), and a note of worker processes
started by ``torch.multiprocessing`` (they run in processes of their own, unaudited). It
removes all of it on ``stop()`` and builds the report. ``sfdiag run`` runs a script
inside one; ``sfdiag.audit()`` wraps the caller's own code in one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.dist import Job
    from sfdiag.results import Finding, MetricResult, OptimizerResult, ProbeReport
    from sfdiag.run import RunOptions


@dataclass
class Spawned:
    """Worker processes the script started through torch.multiprocessing."""

    calls: int = 0
    processes: int = 0
    how: str = ""


def _watch_spawns(spawned: Spawned) -> Callable[[], None]:
    """Count ``torch.multiprocessing.spawn`` / ``start_processes`` calls (handed on as
    they are); returns the undo."""
    import torch.multiprocessing as tmp

    from sfdiag.run.taps._hooks import Patches

    patches = Patches()
    for name in ("spawn", "start_processes"):
        original = getattr(tmp, name, None)
        if original is None:
            continue

        def counting(*args: Any, __original=original, __name=name, **kwargs: Any) -> Any:
            nprocs = kwargs.get("nprocs", args[2] if len(args) > 2 else 1)
            spawned.calls += 1
            spawned.processes += int(nprocs) if isinstance(nprocs, int) else 1
            spawned.how = f"torch.multiprocessing.{__name}"
            return __original(*args, **kwargs)

        patches.set(tmp, name, counting)
    return patches.undo


@dataclass
class AuditSession:
    """Install with ``start()``, remove with ``stop()`` (idempotent); then ``report()``."""

    options: RunOptions
    job: Job | None = None
    spawned: Spawned = field(default_factory=Spawned)
    seconds: float = 0.0
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _started: float = 0.0
    _found: Any = None

    def __post_init__(self) -> None:
        from sfdiag.run import clipping
        from sfdiag.run.metric_names import MetricSelector
        from sfdiag.run.metrics import MetricAudit
        from sfdiag.run.modes import ModeWatch
        from sfdiag.run.watch import OptimizerWatch

        self.clips = clipping.ClipLog()
        self.watch = OptimizerWatch(clips=self.clips, job=self.job)
        if self.job is not None:
            from sfdiag.dist import Channel

            try:  # over the launcher's store, before the script: it needs nothing of the script's
                self.watch.channel = Channel.open(self.job)
            except Exception as exc:
                self.watch.channel_error = f"{type(exc).__name__}: {exc}"
        self.metric_audit = MetricAudit(
            self.watch, MetricSelector(tuple(self.options.metrics)), self.options.metric_rtol
        )
        self.modes = ModeWatch(self.metric_audit.is_active)
        self.watch.observers += [self.metric_audit, self.modes]

    def start(self) -> AuditSession:
        from sfdiag.run import clipping, taps

        self._started = time.perf_counter()
        self.watch.install()
        self._undo.append(self.watch.remove)
        self.modes.install()
        self._undo.append(self.modes.remove)
        self._undo.append(clipping.install(self.clips, self.metric_audit.is_active).undo)
        self._undo.append(taps.install_all(self.metric_audit))
        self._undo.append(_watch_spawns(self.spawned))
        return self

    def stop(self) -> None:
        if self._started and not self.seconds:
            self.seconds = time.perf_counter() - self._started
        while self._undo:
            self._undo.pop()()

    # ---- what was found ------------------------------------------------------------------
    def collect(
        self,
    ) -> tuple[tuple[OptimizerResult, ...], tuple[MetricResult, ...], tuple[Finding, ...]]:
        """(optimizer results, logged metrics, mode findings), once the session stopped."""
        if self._found is None:
            metrics = self.metric_audit.finish()
            results = tuple(with_metric_advice(self.watch.results(), metrics))
            self._found = (results, metrics, self.findings())
        return self._found

    def findings(self) -> tuple[Finding, ...]:
        """The mode findings, each optimizer's warmup applied twice (``double-warmup``) and
        its rate moved on after steps the loss scaler skipped (``scheduler-on-skipped-step``)."""
        from sfdiag.run import findings

        tallies = dict(self.modes.tallies)
        for entry in self.watch.watched:
            warmup = findings.double_warmup(entry.warmup_rows, entry.peak_rate)
            if warmup.count:
                tallies[(entry.label, "double-warmup")] = warmup
            if entry.skip_advances is not None and entry.skip_advances.count:
                tallies[(entry.label, "scheduler-on-skipped-step")] = entry.skip_advances
        return findings.mode_findings(tallies)

    def report(self, config: dict[str, Any], interrupted: bool = False) -> ProbeReport:
        """This process's report, once the session stopped."""
        import torch

        from sfdiag import __version__
        from sfdiag.results import ProbeReport

        results, metrics, findings = self.collect()
        return ProbeReport(
            config=config,
            results=results,
            sfdiag_version=__version__,
            torch_version=torch.__version__,
            interrupted=interrupted,
            timing={"seconds": round(self.seconds, 3)},
            metrics=metrics,
            findings=findings,
        )

    def notes(self) -> list[str]:
        """What the audit could not reach, said plainly."""
        out = []
        if self.spawned.calls:
            out.append(
                f"sfdiag: the script started {self.spawned.processes} worker process"
                f"{'es' if self.spawned.processes != 1 else ''} with {self.spawned.how}: they "
                "run outside this process and are not audited (start them with torchrun or "
                "sfdiag run --nproc, or wrap their training in sfdiag.audit())"
            )
        return out


def _metrics_are_right_advice(metrics: Sequence[MetricResult]) -> str:
    names = ", ".join(m.name for m in metrics[:3]) + (", ..." if len(metrics) > 3 else "")
    return (
        f"the gradient metrics the script logs ({names}) are read before step() and are "
        "right: the change only matters to code that reads p.grad after step()"
    )


def with_metric_advice(
    results: Sequence[OptimizerResult], metrics: Sequence[MetricResult]
) -> list[OptimizerResult]:
    """A flagged optimizer whose every logged gradient metric is right gets advice that
    says so instead of the generic one."""
    out = []
    for result in results:
        own = [m for m in metrics if m.optimizer == result.optimizer and m.quantity == "grad_norm"]
        if (
            result.verdict in ("mutated", "replaced", "cleared")
            and own
            and not any(m.wrong for m in own)
        ):
            result = replace(result, advice=_metrics_are_right_advice(own))
        out.append(result)
    return out
