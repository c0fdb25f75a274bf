"""The command line: parse, call ``sfdiag.api``, map outcomes to exit codes.

Exit codes (docs/contract.md): 0 ran and no gate failed; 1 a gate failed; 2 bad usage,
config or input (one message on stderr, nothing written); 130 interrupted.
Nothing here imports torch at module level: ``sfdiag --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from sfdiag import __version__, api, ui
from sfdiag.errors import SfdiagError

app = typer.Typer(
    name="sfdiag",
    help="Find optimizers that change p.grad in place during step(), and the grad metrics "
    "they distort.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ---- options shared by probe, compare and check -------------------------------------------
FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="table | json | csv | markdown | junit")
]
OutputOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer reads the annotation at run time
    typer.Option("--output", "-o", help="write the report to FILE (atomically) instead of stdout"),
]
StrictOpt = Annotated[bool, typer.Option("--strict", help="exit 1 when any optimizer is flagged")]
DeviceOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--device", help="cpu | cuda | auto (overrides the config)"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or notes")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite existing output files")]
PlotOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--plot", help="also draw each optimizer's pre/post-step grad norms to FILE.png"),
]
PerParamOpt = Annotated[
    bool, typer.Option("--per-param", help="also show a table per optimizer, one row per parameter")
]
ForensicsOpt = Annotated[
    bool,
    typer.Option(
        "--forensics", help="clone whole grads for exact per-element changes (more memory)"
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks, for bug reports")]
ConfigArg = Annotated[
    Path, typer.Argument(help="the YAML config", show_default=False, metavar="CONFIG.yaml")
]


@contextmanager
def _guard(debug: bool) -> Iterator[None]:
    """SfdiagError -> one line on stderr and exit 2; bugs -> a short note and exit 3."""
    debug = debug or bool(os.environ.get("SFDIAG_DEBUG"))
    try:
        yield
    except SfdiagError as exc:
        if debug:
            raise
        ui.error(str(exc))
        raise typer.Exit(api.EXIT_USAGE) from None
    except (typer.Exit, SystemExit):
        raise
    except KeyboardInterrupt:
        ui.error("interrupted")
        raise typer.Exit(api.EXIT_INTERRUPTED) from None
    except Exception as exc:
        if debug:
            raise
        ui.error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)")
        raise typer.Exit(3) from None


def _probe_with_progress(
    config: object, *, quiet: bool, forensics: bool = False, stdout_is_report: bool = False
):
    """Run the probe with a progress bar; on Ctrl-C show what finished and exit 130.

    ``stdout_is_report``: stdout carries a machine-readable report (json, csv, ...), so the
    finished rows go to stderr instead, and stdout stays empty.
    """
    from sfdiag.probe.runner import ProbeInterrupted

    total = config.steps * len(config.optimizers)
    try:
        with ui.progress_bar(total, quiet=quiet) as progress:
            return api.probe(config, forensics=forensics, progress=progress)
    except ProbeInterrupted as stopped:
        # Show what finished; write no file: a partial report must not pass for a whole one.
        if stopped.report.results:
            stream = sys.stderr if stdout_is_report else sys.stdout
            stream.write(api.render(stopped.report, "table", color=ui.wants_color(stream)))
            ui.error("interrupted; the rows above are the optimizers that finished")
        else:
            ui.error("interrupted before any optimizer finished; nothing to show")
        raise typer.Exit(api.EXIT_INTERRUPTED) from None


def _stdout_is_report(fmt: str, output: Path | None) -> bool:
    return fmt != "table" and output is None


def _color_for(fmt: str, output: Path | None) -> bool:
    return fmt == "table" and output is None and ui.wants_color(sys.stdout)


def _run_and_report(
    load: Callable[[], object],
    *,
    fmt: str,
    output: Path | None,
    plot: Path | None,
    force: bool,
    strict: bool,
    quiet: bool,
    per_param: bool,
    forensics: bool,
) -> int:
    """Shared body of probe and compare."""
    outputs = api.Outputs(
        fmt=fmt, output=output, plot=plot, force=force, per_param=per_param
    ).validate()
    report = _probe_with_progress(
        load(), quiet=quiet, forensics=forensics, stdout_is_report=_stdout_is_report(fmt, output)
    )
    color = _color_for(fmt, output)
    api.emit(api.render(report, fmt, color=color, per_param=per_param), outputs)
    if plot is not None:
        api.write_plot(report, plot, force=force)
        ui.note(f"plot written to {plot}", quiet=quiet)
    if output is not None:
        ui.note(f"{fmt} report written to {output}", quiet=quiet)
    return api.gate(report, strict=strict)


@app.command()
def probe(
    config: ConfigArg,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    strict: StrictOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    plot: PlotOpt = None,
    per_param: PerParamOpt = False,
    forensics: ForensicsOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run every optimizer in CONFIG and print the verdict table."""
    with _guard(debug):
        code = _run_and_report(
            lambda: api.with_device(api.load_config(config), device),
            fmt=fmt,
            output=output,
            plot=plot,
            force=force,
            strict=strict,
            quiet=quiet,
            per_param=per_param,
            forensics=forensics,
        )
    raise typer.Exit(code)


@app.command()
def compare(
    optimizers: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--optimizers",
            help="comma-separated registry names or import paths "
            "[default: adamw,sf-adamw,sf-ref,sf-sgd]",
        ),
    ] = None,
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--config", help="start from this config instead of the embedded default"),
    ] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="model registry name")] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option("--steps", help="optimizer steps")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option("--seed", help="random seed")] = None,  # noqa: UP045
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    strict: StrictOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    plot: PlotOpt = None,
    per_param: PerParamOpt = False,
    forensics: ForensicsOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare optimizers on the embedded default config (or --config)."""
    with _guard(debug):
        code = _run_and_report(
            lambda: api.compare_config(
                config_path=config,
                optimizers=optimizers,
                model=model,
                steps=steps,
                seed=seed,
                device=device,
            ),
            fmt=fmt,
            output=output,
            plot=plot,
            force=force,
            strict=strict,
            quiet=quiet,
            per_param=per_param,
            forensics=forensics,
        )
    raise typer.Exit(code)


@app.command()
def baseline(
    config: ConfigArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="the baseline file to write")],
    force: ForceOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Probe CONFIG and save the results as a baseline for `check`."""
    with _guard(debug):
        api.check_writable(output, force=force, what="baseline")
        report = _probe_with_progress(api.with_device(api.load_config(config), device), quiet=quiet)
        api.save_baseline(report, output, force=force)
        ui.note(f"baseline of {len(report.results)} optimizers written to {output}", quiet=quiet)


@app.command()
def check(
    config: ConfigArg,
    baseline_file: Annotated[
        Path, typer.Option("--baseline", "-b", help="the baseline file to compare with")
    ],
    rtol: Annotated[
        float, typer.Option("--rtol", help="relative tolerance on every step's grad norms")
    ] = 1e-4,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    plot: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--plot", help="also draw this run's grad norms, the baseline's beside, to FILE.png"
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Probe CONFIG and compare with a baseline; exit 1 on regression."""
    from sfdiag.baseline import check_tolerance, load_baseline

    with _guard(debug):
        check_tolerance(rtol, "--rtol")
        outputs = api.Outputs(fmt=fmt, output=output, plot=plot, force=force).validate()
        recorded = load_baseline(baseline_file)  # a bad baseline fails before the probe
        report = _probe_with_progress(
            api.with_device(api.load_config(config), device),
            quiet=quiet,
            stdout_is_report=_stdout_is_report(fmt, output),
        )
        result = api.check_against_baseline(report, recorded, rtol=rtol)
        api.emit(api.render_check(result, fmt, color=_color_for(fmt, output)), outputs)
        if plot is not None:
            api.write_plot(report, plot, force=force, baseline=recorded)
            ui.note(f"plot written to {plot}", quiet=quiet)
        code = api.EXIT_GATE if result.regressed else api.EXIT_OK
    raise typer.Exit(code)


# Options end at the first word that is not one (or at --): the rest is the script's, so
# ``sfdiag run python t.py --strict`` hands --strict to the script, and a misspelt option
# before the script is a usage error instead of a script name.
@app.command(context_settings={"allow_extra_args": True, "allow_interspersed_args": False})
def run(
    ctx: typer.Context,
    report: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--report", help="also write the JSON report to FILE"),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="exit 1 when a logged gradient metric is wrong (or, where the script logs "
            "none, when an optimizer is flagged)",
        ),
    ] = False,
    metric: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--metric",
            help="also judge logged metrics with this name (a glob; repeatable) as gradient norms",
            metavar="NAME",
        ),
    ] = None,
    metric_rtol: Annotated[
        float,
        typer.Option("--metric-rtol", help="relative tolerance for a logged value to match"),
    ] = 1e-3,
    plot: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--plot",
            help="also draw each logged metric against the true values to FILE.png",
            metavar="FILE.png",
        ),
    ] = None,
    nproc: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--nproc",
            help="run N local ranks through torch's elastic launcher, audited as one job "
            "(1: one rank, as torchrun --nproc-per-node 1)",
            metavar="N",
        ),
    ] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a training script: audit every optimizer it steps and every gradient metric it logs.

    \b
      sfdiag run [OPTIONS] -- python script.py ARGS...
      sfdiag run [OPTIONS] --nproc N -- python script.py ARGS...
      sfdiag run [OPTIONS] -- torchrun --nproc-per-node N script.py ARGS...
      torchrun [ITS OPTIONS] -m sfdiag run [OPTIONS] -- python script.py ARGS...

    The script runs as python would run it; its exit code passes through, unless
    --strict fails the run. The verdict tables go to stderr (rank 0's, for a job).
    """
    from sfdiag.run import RunOptions, run_script

    with _guard(debug):
        options = RunOptions(
            report=report,
            strict=strict,
            force=force,
            quiet=quiet,
            metrics=tuple(metric or ()),
            metric_rtol=metric_rtol,
            nproc=nproc,
            plot=plot,
        )
        code = run_script(list(ctx.args), options)
    raise typer.Exit(code)


@app.command(name="list")
def list_registries(debug: DebugOpt = False) -> None:
    """List the registries: optimizers, models, data sets, losses."""
    from sfdiag.probe import registry

    with _guard(debug):
        headings = {"optimizer": "optimizers", "model": "models", "data": "data sets"}
        for kind, table in registry.REGISTRIES.items():
            print(f"{headings.get(kind, kind + 'es')}:")
            width = max(len(name) for name in table)
            for entry in table.values():
                print(f"  {entry.name:<{width}}  {entry.summary}")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="where to write the example")] = Path("sfdiag.yaml"),
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a commented example config (never over an existing file without --force)."""
    from sfdiag.fileio import write_atomic
    from sfdiag.probe.config import EXAMPLE_CONFIG

    with _guard(debug):
        write_atomic(path, EXAMPLE_CONFIG, force=force)
        ui.note(f"wrote {path}; run: sfdiag probe {path}")


def _version_callback(value: bool) -> None:
    if value:
        print(f"sfdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="print the version"
        ),
    ] = False,
) -> None:
    """Find optimizers that change p.grad in place during step()."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
