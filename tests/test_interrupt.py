"""Ctrl-C: the rows finished so far are shown, the exit code is 130, there is no
traceback, and no partial report or baseline file is left behind."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, start_cli
from typer.testing import CliRunner

from sfdiag.baseline import save_baseline
from sfdiag.cli import app
from sfdiag.errors import SfdiagError
from sfdiag.probe import api as probe_module
from sfdiag.probe.api import ProbeInterrupted, run_probe
from sfdiag.probe.config import parse_config

STEPS = 30


def slow_config(steps: int = STEPS, delay: float = 0.02) -> str:
    return f"""\
steps: {steps}
model: {{name: "hostile_models:slow_model", kwargs: {{delay: {delay}}}}}
data: {{batch_size: 4}}
optimizers: [adamw, sf-ref, sf-adamw]
"""


CONFIG = {
    "steps": 3,
    "model": {"name": "hostile_models:small"},
    "data": {"batch_size": 4},
    "optimizers": ["adamw", "sf-ref", "sf-adamw"],
}


def _interrupt_on_second_optimizer(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``probe_optimizer`` raise KeyboardInterrupt when the second optimizer starts."""
    started: list[str] = []
    real = probe_module.probe_optimizer

    def probe_optimizer(built, opt, options=probe_module.ProbeOptions()):
        started.append(opt.spec.name)
        if len(started) == 2:
            raise KeyboardInterrupt
        return real(built, opt, options)

    monkeypatch.setattr(probe_module, "probe_optimizer", probe_optimizer)
    return started


def test_run_probe_raises_with_the_finished_rows(monkeypatch):
    started = _interrupt_on_second_optimizer(monkeypatch)
    with pytest.raises(ProbeInterrupted) as caught:
        run_probe(parse_config(CONFIG))
    assert started == ["adamw", "sf-ref"]
    report = caught.value.report
    assert report.interrupted
    assert [r.optimizer for r in report.results] == ["adamw"]
    assert report.results[0].verdict == "clean" and len(report.results[0].steps) == 3
    assert report.to_dict()["interrupted"] is True
    with pytest.raises(SfdiagError, match="interrupted"):
        save_baseline(report, "never-written.json")
    assert not Path("never-written.json").exists()


def test_ctrl_c_inside_step_is_not_an_error_row():
    config = parse_config(
        {
            **CONFIG,
            "optimizers": ["adamw", {"name": "stop", "class": "hostile_models:InterruptOnStep"}],
        }
    )
    with pytest.raises(ProbeInterrupted) as caught:
        run_probe(config)
    assert [r.optimizer for r in caught.value.report.results] == ["adamw"]


@pytest.mark.parametrize(
    ("args", "rows_on"),
    [
        (["probe", "c.yaml", "--format", "json", "--output", "out.json"], "stdout"),
        (["baseline", "c.yaml", "--output", "base.json"], "stdout"),
        (["probe", "c.yaml"], "stdout"),
        # stdout is the machine-readable report: the finished rows go to stderr, not into it
        (["probe", "c.yaml", "--format", "json"], "stderr"),
        (["compare", "--config", "c.yaml", "--format", "csv"], "stderr"),
    ],
    ids=["probe-output", "baseline", "probe-table", "probe-json-stdout", "compare-csv-stdout"],
)
def test_cli_in_process_exits_130(tmp_path, monkeypatch, args, rows_on):
    (tmp_path / "c.yaml").write_text(slow_config(steps=2, delay=0.0), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    _interrupt_on_second_optimizer(monkeypatch)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr
    shown = result.stdout if rows_on == "stdout" else result.stderr
    if rows_on == "stderr":
        assert result.stdout == ""
    rows = [line.split()[0] for line in shown.splitlines() if line.strip()]
    assert "adamw" in rows and "sf-ref" not in rows and "sf-adamw" not in rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def _wait_for(marker: Path, count: int, process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and len(marker.read_bytes()) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"sfdiag ended early ({process.returncode}): {process.communicate()}")
        time.sleep(0.01)
    process.kill()
    pytest.fail("the probe never reached the second optimizer")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize(
    "args",
    [
        ["probe", "c.yaml", "--format", "json", "--output", "out.json"],
        ["baseline", "c.yaml", "--output", "base.json"],
    ],
    ids=["probe", "baseline"],
)
def test_sigint_mid_probe(tmp_path, args):
    """A real Ctrl-C (SIGINT) while the second optimizer runs."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "c.yaml").write_text(slow_config(), encoding="utf-8")
    marker = tmp_path / "forwards"  # the slow model adds a byte per training forward
    process = start_cli(*args, cwd=work, env=cli_env(SFDIAG_TEST_MARKER=str(marker)))
    try:
        _wait_for(marker, STEPS + 2, process)  # adamw done, sf-ref two steps in
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    rows = [line.split()[0] for line in stdout.splitlines() if line.strip()]
    assert "adamw" in rows and "sf-adamw" not in rows
    assert sorted(p.name for p in work.iterdir()) == ["c.yaml"]  # no output, no temp file
