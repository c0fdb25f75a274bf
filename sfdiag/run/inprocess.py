"""``sfdiag.audit()``: what ``sfdiag run`` does, around code in the current process.

For notebooks and launchers that cannot be wrapped by ``sfdiag run``::

    with sfdiag.audit(report="audit.json") as audit:
        train()
    audit.report                 # the ProbeReport sfdiag run would write
    audit.to_pandas("steps")     # results | steps | params | metrics | findings
    audit.figure()               # logged vs true, a panel per logged metric (plot="x.png")
    audit                        # in Jupyter: the verdict tables

Every optimizer that steps inside the block is audited, every gradient metric logged
through TensorBoard, W&B, MLflow, Lightning or Transformers is judged, schedule-free
mode mistakes are found. The tables go to stderr when the block ends (``show=False``
keeps them for ``print(audit)`` / Jupyter); an exception in the block propagates after
the report is built (and written).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdiag.errors import SfdiagError

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    from matplotlib.figure import Figure

    from sfdiag.results import ProbeReport
    from sfdiag.run.session import AuditSession

__all__ = ["Audit", "audit"]


class Audit:
    """An in-process audit, a context manager: ``with sfdiag.audit() as audit: train()``
    (see the module doc). ``audit.report`` is None until the block ends.

    ``report``: also write the JSON report there (refused up front over an existing file
    without ``force``); ``plot``: also draw the picture of ``sfdiag run --plot`` there (a
    PNG; needs matplotlib); ``metrics``: names (globs) to judge besides the pattern's;
    ``strict``: what ``audit.passed`` means, as ``sfdiag run --strict``; ``show``: print
    the tables to stderr when the block ends.
    """

    def __init__(
        self,
        report: str | os.PathLike[str] | None = None,
        *,
        metrics: tuple[str, ...] | list[str] = (),
        metric_rtol: float = 1e-3,
        strict: bool = False,
        force: bool = False,
        show: bool = True,
        quiet: bool = False,
        plot: str | os.PathLike[str] | None = None,
    ) -> None:
        from sfdiag.run import RunOptions

        path = Path(report) if report is not None else None
        self.options = RunOptions(
            report=path,
            plot=Path(plot) if plot is not None else None,
            strict=strict,
            force=force,
            quiet=quiet,
            metrics=tuple(metrics),
            metric_rtol=metric_rtol,
        ).validate()
        self.show = show
        self.report: ProbeReport | None = None
        self._session: AuditSession | None = None

    # ---- the block ---------------------------------------------------------------------
    def __enter__(self) -> Audit:
        from sfdiag.run import checked_outputs
        from sfdiag.run.session import AuditSession

        if self._session is not None:
            raise SfdiagError("sfdiag.audit(): this audit is running already")
        self.options = checked_outputs(self.options)  # refuse before the training, not after
        self._session = AuditSession(self.options).start()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.stop()
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        self.report = session.report({"in_process": True}, interrupted)
        from sfdiag import ui

        if self.show:
            sys.stderr.write(self._text(color=ui.wants_color(sys.stderr)))
        for note in session.notes():
            ui.note(note, quiet=self.options.quiet)
        from sfdiag.run import write_outputs

        write_outputs(self.report, self.options)

    # ---- what it found -----------------------------------------------------------------
    @property
    def passed(self) -> bool:
        """What ``sfdiag run --strict`` would make of it (True without ``strict=True``)."""
        from sfdiag.run import gate

        return self._finished().results is not None and not gate(
            self._finished(), strict=self.options.strict
        )

    def figure(self) -> Figure:
        """The picture ``plot=`` writes, as a matplotlib Figure (a panel per logged metric)."""
        from sfdiag.report.plot import figure_for

        return figure_for(self._finished())

    def to_pandas(self, kind: str = "results") -> pandas.DataFrame:
        """One of the report's tables as a DataFrame (see ``ProbeReport.to_pandas``)."""
        return self._finished().to_pandas(kind)

    def _finished(self) -> ProbeReport:
        if self.report is None:
            raise SfdiagError("sfdiag.audit(): the report exists once the `with` block has ended")
        return self.report

    def _text(self, color: bool = False) -> str:
        from sfdiag.report import RenderOptions, render

        if self.report is None:
            return "sfdiag.audit(): running\n"
        text = render(self.report, "table", RenderOptions(color=color))
        return text if text.endswith("\n") else text + "\n"

    def __str__(self) -> str:
        return self._text()

    def __repr__(self) -> str:
        if self.report is None:
            return "<sfdiag.audit: running>"
        flagged = sum(r.flagged for r in self.report.results)
        return (
            f"<sfdiag.audit: {len(self.report.results)} optimizers ({flagged} flagged), "
            f"{len(self.report.metrics or ())} gradient metrics, "
            f"{len(self.report.findings or ())} mode findings>"
        )

    def _repr_html_(self) -> str:
        """Jupyter's display: the verdict tables, as the terminal shows them."""
        import html

        return f"<pre>{html.escape(self._text())}</pre>"


#: ``with sfdiag.audit(...) as audit:``: the class itself, so its options are stated once
audit = Audit
