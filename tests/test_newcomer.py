"""What a newcomer trips on (issue 13): outputs validated before anything is written,
options that belong to the script, docs that match behaviour, sfdiag run's reach said
plainly, and the in-process audit with its pandas tables."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import cli_env, run_cli

import sfdiag
from sfdiag.errors import SfdiagError
from sfdiag.optim import AdamWScheduleFree
from sfdiag.run import RunOptions, parse_command, run_script

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# ---- 5: --plot and --output checked before the probe -------------------------------------------
def test_plot_without_matplotlib_writes_nothing(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = cli_env(PYTHONPATH=f"{blocker}:{cli_env()['PYTHONPATH']}")
    done = run_cli(
        "compare", "--steps", "1", "--format", "json", "--output", "r.json", "--plot", "p.png",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and "matplotlib" in done.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "p.png").exists()


def test_output_and_plot_cannot_share_a_path(tmp_path):
    done = run_cli(
        "compare", "--steps", "1", "--format", "json", "--output", "x.png", "--plot", "./x.png",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "same file" in done.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("fmt", ["csv", "junit"])
def test_per_param_with_a_format_that_cannot_show_it_is_a_usage_error(tmp_path, fmt):
    done = run_cli("compare", "--steps", "1", "--format", fmt, "--per-param", cwd=tmp_path)
    assert done.returncode == 2 and "--per-param" in done.stderr and fmt in done.stderr
    assert done.stdout == ""


def test_init_overwrites_only_with_force(tmp_path):
    (tmp_path / "sfdiag.yaml").write_text("mine\n")
    refused = run_cli("init", cwd=tmp_path)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (tmp_path / "sfdiag.yaml").read_text() == "mine\n"
    done = run_cli("init", "--force", cwd=tmp_path)
    assert done.returncode == 0 and "optimizers:" in (tmp_path / "sfdiag.yaml").read_text()


# ---- 6: options after the script belong to the script -----------------------------------------
ECHO_ARGS = """\
    import json, sys
    print(json.dumps(sys.argv[1:]))
"""


def test_options_after_the_script_are_the_scripts(tmp_path):
    write(tmp_path, ECHO_ARGS, "args.py")
    done = run_cli(
        "run", "python", "args.py", "--steps", "2", "--strict", "--report", "x", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["--steps", "2", "--strict", "--report", "x"]
    assert not (tmp_path / "x").exists()  # sfdiag took neither --report nor --strict


# ---- 10: sfdiag run's reach ----------------------------------------------------------------
NOT_TORCH = """\
    import torch
    class HandRolled:  # an optimizer that is not a torch.optim.Optimizer
        def __init__(self, params, lr=0.1):
            self.params = list(params)
            self.lr = lr
        def step(self):
            with torch.no_grad():
                for p in self.params:
                    p -= self.lr * p.grad
    class Trainer:
        def __init__(self):
            self.model = torch.nn.Linear(3, 1)
            self.optimizer = HandRolled(self.model.parameters())
    trainer = Trainer()
    for _ in range(2):
        trainer.model(torch.ones(2, 3)).sum().backward()
        trainer.optimizer.step()
"""


def test_an_optimizer_that_is_not_torchs_is_named(tmp_path, capsys):
    script = write(tmp_path, NOT_TORCH)
    assert run_script(["python", str(script)], RunOptions()) == 0
    err = capsys.readouterr().err
    assert "stepped no torch.optim.Optimizer" in err
    assert "__main__:HandRolled" in err and "sfdiag probe" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["./train.sh"], "not a Python script"),
        (["python", "-c", "print(1)"], "-c is not supported"),
        (["python", "-W"], "missing its argument"),
        (["env", "A=1"], "no command"),
    ],
)
def test_unsupported_forms_say_what_is_supported(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.sh").write_text("#!/bin/bash\npython train.py\n")
    with pytest.raises(SfdiagError, match=message) as raised:
        run_script(argv, RunOptions())
    if argv[0] == "./train.sh":
        assert "sfdiag run -- python train.py" in str(raised.value)


WARNS = """\
    import json, os, sys, warnings
    warnings.warn("from the script", UserWarning)
    print(json.dumps({"x": sys._xoptions.get("utf8"), "var": os.environ.get("SFDIAG_TEST_VAR")}))
"""


def test_env_python_w_and_x_are_accepted(tmp_path, capfd):
    script = write(tmp_path, WARNS)
    argv = ["/usr/bin/env", "SFDIAG_TEST_VAR=7", "python", "-W", "error::UserWarning"]
    assert run_script([*argv, "-X", "utf8", str(script)], RunOptions()) == 1  # the warning raised
    assert "UserWarning: from the script" in capfd.readouterr().err
    target = parse_command([*argv, "-Xutf8", str(script)])
    assert target.python_options == ("-Werror::UserWarning", "-Xutf8")
    assert target.environment == (("SFDIAG_TEST_VAR", "7"),)
    import warnings

    warnings.resetwarnings()
    warnings.simplefilter("default")
    script.write_text(
        textwrap.dedent(WARNS).replace('warnings.warn("from the script", UserWarning)', "")
    )
    assert run_script(["env", "SFDIAG_TEST_VAR=7", "python", "-X", "utf8", str(script)]) == 0
    out = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert out == {"x": True, "var": "7"}
    assert "SFDIAG_TEST_VAR" not in __import__("os").environ  # restored afterwards


SPAWNS = """\
    import torch, torch.multiprocessing as mp
    def work(rank):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    if __name__ == "__main__":
        mp.spawn(work, nprocs=2)
"""


def test_workers_started_by_torch_multiprocessing_are_said_to_be_unaudited(tmp_path):
    write(tmp_path, SPAWNS)
    done = subprocess.run(
        [sys.executable, "-m", "sfdiag", "run", "--", "python", "train.py"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "2 worker processes with torch.multiprocessing.spawn" in done.stderr
    assert "not audited" in done.stderr


# ---- the in-process audit -------------------------------------------------------------------
def _train(model: torch.nn.Module, optimizer, steps: int = 5) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()


def test_the_in_process_audit_of_a_schedule_free_loop(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    optimizer = AdamWScheduleFree(model.parameters(), lr=1e-2)
    optimizer.train()
    with sfdiag.audit(report=tmp_path / "audit.json", strict=True) as audit:
        _train(model, optimizer, steps=25)
    (row,) = audit.report.results
    assert (row.verdict, row.fingerprint) == ("mutated", "adam-normalized")
    assert "mutated (adam-normalized)" in capsys.readouterr().err
    steps = audit.to_pandas("steps")
    assert len(steps) == len(row.steps) == 20  # the first 20 of 25 (then every 100th)
    assert list(steps["step"]) == [s.step for s in row.steps]
    assert set(steps.columns) >= {"optimizer", "step", "pre_step_grad_norm", "post_step_grad_norm"}
    params = audit.to_pandas("params")
    assert list(params["name"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    results = audit.to_pandas("results")
    assert results.loc[0, "fingerprint"] == "adam-normalized"
    assert not results.loc[0, "undetermined"]
    assert audit.to_pandas("metrics").empty and audit.to_pandas("findings").empty
    assert not audit.passed  # --strict: a flagged optimizer, no gradient metric logged
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["results"][0]["verdict"] == "mutated" and saved["config"] == {"in_process": True}
    assert "<pre>" in audit._repr_html_() and "adam-normalized" in audit._repr_html_()
    # the hooks are gone after the block
    optimizer.zero_grad()
    _train(model, optimizer, steps=1)
    assert len(audit.report.results[0].steps) == 20


def test_the_in_process_audit_keeps_going_through_an_error_and_refuses_an_existing_report(
    tmp_path,
):
    (tmp_path / "taken.json").write_text("keep me")
    with pytest.raises(SfdiagError, match="already exists"):
        with sfdiag.audit(report=tmp_path / "taken.json"):
            raise AssertionError("never reached: refused before the block")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with sfdiag.audit(show=False) as audit:
            _train(model, optimizer, steps=2)
            raise RuntimeError("boom")
    assert audit.report.results[0].verdict == "clean" and audit.passed
    with pytest.raises(SfdiagError, match="unknown table 'step'.*steps"):
        audit.to_pandas("step")
    assert (tmp_path / "taken.json").read_text() == "keep me"


def test_a_probes_report_has_the_same_tables():
    from sfdiag.probe.api import run_probe
    from sfdiag.probe.config import parse_config

    report = run_probe(parse_config({"steps": 2, "optimizers": ["adamw", "sf-adamw"]}))
    results = report.to_pandas()
    assert list(results["optimizer"]) == ["adamw", "sf-adamw"]
    assert list(results["verdict"]) == ["clean", "mutated"]
    assert len(report.to_pandas("steps")) == 4
