"""What the CLI does, callable from Python: load, probe, render, write, gate.

The CLI parses arguments and maps outcomes to exit codes; everything else lives
here or below. Heavy modules (torch, pandas, the probe) are imported inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sfdiag.errors import SfdiagError
from sfdiag.probe.config import (
    Config,
    default_config,
    load_config,
    parse_optimizer_list,
    with_overrides,
)

if TYPE_CHECKING:
    from sfdiag.baseline import Baseline
    from sfdiag.probe.runner import Progress
    from sfdiag.results import CheckResult, ProbeReport

OUTPUT_FORMATS = ("table", "json", "csv", "markdown", "junit")

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def compare_config(
    *,
    config_path: str | Path | None = None,
    optimizers: str | None = None,
    model: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> Config:
    """The config ``sfdiag compare`` runs: the embedded default (or a file) with overrides."""
    base = load_config(config_path) if config_path is not None else default_config()
    names = parse_optimizer_list(optimizers) if optimizers is not None else None
    return with_overrides(
        base, optimizers=names, model=model, steps=steps, seed=seed, device=device
    )


def with_device(config: Config, device: str | None) -> Config:
    return config if device is None else with_overrides(config, device=device)


def check_format(fmt: str) -> str:
    """Formats are lower case, as every other option value; ``JSON`` gets a did-you-mean."""
    if fmt not in OUTPUT_FORMATS:
        from sfdiag.errors import shown
        from sfdiag.probe.registry import did_you_mean

        raise SfdiagError(
            f"--format: unknown format {shown(fmt)}{did_you_mean(fmt, OUTPUT_FORMATS)}; "
            f"choose from {', '.join(OUTPUT_FORMATS)}"
        )
    return fmt


#: the formats that show ``--per-param`` (json always holds the parameters)
PER_PARAM_FORMATS = ("table", "markdown", "json")


@dataclass(frozen=True)
class Outputs:
    """Where results go, validated before the (possibly long) probe runs: nothing is
    written, and no probe runs, when any of it cannot be done."""

    fmt: str = "table"
    output: Path | None = None
    plot: Path | None = None
    force: bool = False
    per_param: bool = False

    def validate(self) -> Outputs:
        from sfdiag.fileio import check_writable

        check_format(self.fmt)
        if self.per_param and self.fmt not in PER_PARAM_FORMATS:
            raise SfdiagError(
                f"--per-param: the {self.fmt} format has no per-parameter view; use "
                f"{', '.join(PER_PARAM_FORMATS)}"
            )
        if self.output is not None:
            check_writable(self.output, force=self.force)
        if self.plot is not None:
            from sfdiag.report.plot import check_plot_path

            check_plot_path(self.plot, force=self.force, beside=self.output)
        return self


def check_writable(path: Path, *, force: bool, what: str = "file") -> Path:
    from sfdiag.fileio import check_writable as check

    return check(path, force=force, what=what)


def probe(
    config: Config, *, forensics: bool = False, progress: Progress | None = None
) -> ProbeReport:
    """Run the probe of ``config``."""
    import contextlib

    from sfdiag.probe.api import ProbeOptions, run_probe

    # Third-party optimizers and models may print (schedulefree: "Switching to train mode"):
    # send that to stderr so that a machine-readable stdout holds the report alone.
    with contextlib.redirect_stdout(sys.stderr):
        return run_probe(config, ProbeOptions(forensics=forensics, progress=progress))


def render(report: ProbeReport, fmt: str, *, color: bool = False, per_param: bool = False) -> str:
    from sfdiag.report import RenderOptions
    from sfdiag.report import render as render_report

    return render_report(report, check_format(fmt), RenderOptions(color=color, per_param=per_param))


def emit(text: str, outputs: Outputs) -> None:
    """Write rendered text to ``outputs.output`` (atomically) or stdout."""
    if outputs.output is not None:
        from sfdiag.fileio import write_atomic

        write_atomic(outputs.output, text, force=outputs.force)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def write_plot(
    report: ProbeReport, path: Path, *, force: bool = False, baseline: Baseline | None = None
) -> None:
    """The report's picture as a PNG (``baseline``: check's, drawn beside)."""
    from sfdiag.report.plot import write_plot as write

    write(report, path, force=force, baseline=baseline)


def gate(report: ProbeReport, *, strict: bool) -> int:
    """Exit code of a probe: 1 when --strict and anything is flagged (error rows included)."""
    return EXIT_GATE if strict and report.any_flagged else EXIT_OK


def save_baseline(report: ProbeReport, path: Path, *, force: bool = False) -> Path:
    from sfdiag.baseline import save_baseline as save

    return save(report, path, force=force)


def check_against_baseline(report: ProbeReport, baseline: Baseline, *, rtol: float) -> CheckResult:
    """Compare ``report`` with a loaded baseline (``sfdiag.baseline.load_baseline``).

    The CheckResult's ``.regressed`` is the gate.
    """
    from sfdiag.baseline import compare

    return compare(baseline, report, rtol=rtol)


def render_check(check, fmt: str, *, color: bool = False) -> str:
    from sfdiag.report import RenderOptions
    from sfdiag.report import render_check as render

    return render(check, check_format(fmt), RenderOptions(color=color))
