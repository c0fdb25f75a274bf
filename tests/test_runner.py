"""``sfdiag run``: a training script run unmodified, its optimizers audited."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.optim.optimizer as torch_optimizer
from conftest import cli_env

from sfdiag.errors import SfdiagError
from sfdiag.run import (
    AUDIT_EVERY,
    AUDIT_FIRST,
    AUDIT_MAX,
    audited,
    parse_command,
    run_script,
)
from sfdiag.step_audit.auditor import class_path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/train_sf_adamw.py"


def write_script(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


CLEAN_SCRIPT = """\
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
    print("trained")
"""


# ---- through the CLI, in subprocesses started together (each one imports torch) ---------------
@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[CliRun, Path]]:
    """Every subprocess case of this file, run concurrently: name -> (result, its tmp dir)."""
    cases: dict[str, tuple[list[str], Path]] = {}

    def case(name: str, *args: str) -> Path:
        where = tmp_path_factory.mktemp(name)
        cases[name] = ([a.replace("{tmp}", str(where)) for a in args], where)
        return where

    case("flagged", "--report", "{tmp}/run.json", "--", "python", EXAMPLE, "--steps", "3")
    case("exit3", "--", sys.executable, EXAMPLE, "--steps", "2", "--exit-code", "3")
    case("missing", "--", "python", "{tmp}/nope.py")
    existing = case("existing", "--report", "{tmp}/r.json", "--", "python", "{tmp}/train.py")
    write_script(existing, 'print("ran")\n')
    (existing / "r.json").write_text("keep me")

    env = cli_env()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "sfdiag", "run", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (CliRun(proc.returncode, out, err), cases[name][1])
    return results


def test_flags_sf_adamw_and_leaves_stdout_alone(cli_runs):
    done, tmp = cli_runs["flagged"]
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp / "run.json").read_text())
    assert data["config"] == {"command": ["python", EXAMPLE, "--steps", "3"]}
    (row,) = data["results"]
    assert row["optimizer"] == "AdamWScheduleFree"
    assert row["class"] == "sfdiag.optim:AdamWScheduleFree"
    assert row["verdict"] == "mutated" and row["flagged"] is True
    assert row["fingerprint"] == "adam-normalized"
    assert len(row["steps"]) == 3 and all(s["loss"] is None for s in row["steps"])
    assert row["post_step_grad_norm"] > 50 * row["pre_step_grad_norm"]
    assert {p["name"] for p in row["params"]} >= {"0.weight", "4.bias"}
    # stdout is the script's own: its header and rows, none of sfdiag's table
    assert done.stdout.splitlines()[0].split()[:2] == ["step", "loss"]
    assert len(done.stdout.splitlines()) == 1 + 3 + 1
    assert "verdict" not in done.stdout and "adam-normalized" not in done.stdout
    assert "adam-normalized" in done.stderr and "AdamWScheduleFree" in done.stderr


def test_script_exit_code_passes_through(cli_runs):
    done, _ = cli_runs["exit3"]
    assert done.returncode == 3, done.stderr
    assert "mutated" in done.stderr


def test_missing_script_is_a_usage_error(cli_runs):
    done, _ = cli_runs["missing"]
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "script not found" in line and "nope.py" in line


def test_existing_report_is_not_overwritten_without_force(cli_runs):
    done, tmp = cli_runs["existing"]
    assert done.returncode == 2
    assert "already exists" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""  # checked before the script ran
    assert (tmp / "r.json").read_text() == "keep me"


# ---- in this process --------------------------------------------------------------------------
PROBE_ENV = """\
    import json, sys
    out = sys.argv[1]
    with open(out, "w") as handle:
        json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0]}, handle)
"""


def test_script_sees_argv_name_and_path_as_under_python(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    write_script(tmp_path / "sub", PROBE_ENV)
    seen = tmp_path / "seen.json"
    argv_before, path_before = list(sys.argv), list(sys.path)
    hooks_before = len(torch_optimizer._global_optimizer_pre_hooks)

    code = run_script(
        ["python", "sub/train.py", str(seen), "--flag", "a b"], report=None, strict=False
    )

    assert code == 0
    data = json.loads(seen.read_text())
    assert data["argv"] == ["sub/train.py", str(seen), "--flag", "a b"]
    assert data["name"] == "__main__"
    assert data["path0"] == str((tmp_path / "sub").resolve())
    assert (sys.argv, sys.path) == (argv_before, path_before)
    assert len(torch_optimizer._global_optimizer_pre_hooks) == hooks_before
    assert len(torch_optimizer._global_optimizer_post_hooks) == hooks_before
    assert "stepped no torch.optim.Optimizer" in capsys.readouterr().err


def test_strict_turns_a_flagged_run_into_exit_1(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    command = ["python", EXAMPLE, "--steps", "2"]
    assert run_script(command, report=None, strict=True) == 1
    assert run_script(command, report=None, strict=False) == 0
    assert run_script([*command, "--exit-code", "3"], report=None, strict=True) == 3
    assert "mutated" in capsys.readouterr().err


def test_clean_optimizer_is_clean_and_stdout_is_the_scripts(tmp_path, capsys):
    script = write_script(tmp_path, CLEAN_SCRIPT)
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report, strict=True) == 0
    out, err = capsys.readouterr()
    assert out == "trained\n"
    assert "AdamW" in err and "clean" in err
    (row,) = json.loads(report.read_text())["results"]
    assert (row["optimizer"], row["class"], row["verdict"]) == (
        "AdamW",
        "torch.optim:AdamW",
        "clean",
    )


def test_existing_report_is_overwritten_with_force(tmp_path, capsys):
    script = write_script(tmp_path, CLEAN_SCRIPT)
    report = tmp_path / "r.json"
    report.write_text("old")
    with pytest.raises(SfdiagError, match="already exists"):
        run_script(["python", str(script)], report=report, strict=False)
    assert capsys.readouterr().out == ""
    assert run_script(["python", str(script)], report=report, strict=False, force=True) == 0
    assert json.loads(report.read_text())["results"][0]["verdict"] == "clean"


def test_bare_script_and_module_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_script(tmp_path, PROBE_ENV, name="probe_env_mod.py")
    assert run_script(["probe_env_mod.py", "a.json"], report=None, strict=False) == 0
    assert json.loads((tmp_path / "a.json").read_text())["argv"][1:] == ["a.json"]
    assert run_script(["python", "-m", "probe_env_mod", "b.json"], report=None, strict=False) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["argv"] == [str(tmp_path / "probe_env_mod.py"), "b.json"]
    assert data["name"] == "__main__"
    sys.modules.pop("probe_env_mod", None)


@pytest.mark.parametrize(
    ("body", "code", "stderr_has"),
    [
        ("import sys; sys.exit()", 0, None),
        ("import sys; sys.exit(4)", 4, None),
        ("import sys; sys.exit('goodbye')", 1, "goodbye"),
        ("def f():\n    raise ValueError('boom')\nf()", 1, "ValueError: boom"),
        ("raise KeyboardInterrupt", 130, "KeyboardInterrupt"),
    ],
)
def test_exit_codes_as_python_gives_them(tmp_path, capsys, body, code, stderr_has):
    script = write_script(tmp_path, body + "\n")
    assert run_script(["python", str(script)], report=None, strict=True) == code
    err = capsys.readouterr().err
    if stderr_has:
        assert stderr_has in err
    if "raise" in body:  # the script's traceback, without sfdiag's or runpy's frames
        assert str(script) in err and "launch.py" not in err and "runpy" not in err


BEFORE_STEPPING = "sfdiag: the script exited with code 1 before any optimizer stepped"


@pytest.mark.parametrize(
    ("body", "code", "said"),
    [
        ("import torch\nraise ValueError('no data')", 1, BEFORE_STEPPING),
        ("import sys; sys.exit(3)", 3, "exited with code 3 before any optimizer stepped"),
        ("raise KeyboardInterrupt", 130, "was interrupted before any optimizer stepped"),
        ("import sys; sys.exit(0)", 0, "stepped no torch.optim.Optimizer; nothing to audit"),
    ],
)
def test_a_script_that_ends_before_stepping_says_how(tmp_path, capsys, body, code, said):
    script = write_script(tmp_path, body + "\n")
    assert run_script(["python", str(script)], report=None, strict=False) == code
    err = capsys.readouterr().err
    assert said in err
    if code != 0:  # it never reached an optimizer: nothing is said about one
        assert "sfdiag: the script " in err and "stepped no" not in err


# the environment torch's elastic launcher gives the one rank of a job
ONE_RANK = {"TORCHELASTIC_RUN_ID": "sfdiag-test", "WORLD_SIZE": "1", "RANK": "0"}


@pytest.mark.parametrize(
    ("argv", "nproc", "environment", "message"),
    [
        (["python", "train.py"], 0, {}, "--nproc: expected a whole number from 1 to 1024"),
        (["python", "train.py"], 1025, {}, "--nproc: expected a whole number from 1 to 1024"),
        (["torchrun", "--nproc-per-node", "1", "train.py"], 1, {}, "not both"),
        (["python", "train.py"], 1, ONE_RANK, "already rank 0 of a job of 1"),
    ],
)
def test_job_requests_that_cannot_work_are_refused(
    tmp_path, monkeypatch, argv, nproc, environment, message
):
    monkeypatch.chdir(tmp_path)
    write_script(tmp_path, CLEAN_SCRIPT)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SfdiagError, match=message):
        run_script(argv, nproc=nproc)


def test_a_process_with_world_size_1_but_no_launcher_runs_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # some clusters set it for every process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    script = write_script(tmp_path, CLEAN_SCRIPT)
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report) == 0
    assert "distributed" not in json.loads(report.read_text())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to run"),
        (["python"], "no script"),
        (["python3.11", "-m"], "no module"),
        (["python", "-c", "print(1)"], "-c is not supported"),
        (["python", "missing_script.py"], "script not found"),
        (["python", "-m", "no_such_module_sfdiag"], "no module named"),
    ],
)
def test_bad_commands_are_sfdiag_errors(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SfdiagError, match=message):
        run_script(argv, report=None, strict=False)


def test_parse_command_accepts_interpreter_spellings():
    for python in ("python", "python3", "/usr/bin/python3.11", sys.executable):
        assert parse_command([python, "-u", "t.py", "-x"]).args == ("-x",)
    assert parse_command(["t.py", "--steps", "3"]).path == "t.py"
    assert parse_command(["python", "-m", "pkg.mod", "a"]).module == "pkg.mod"


TWO_OPTIMIZERS = """\
    import torch
    class Trainer:
        def __init__(self):
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    def main():
        t = Trainer()
        x = torch.randn(8, 3)
        for optimizer in (torch.optim.SGD(t.net.parameters(), lr=0.1),
                          torch.optim.SGD(t.net.parameters(), lr=0.1),
                          torch.optim.LBFGS(t.net.parameters())):
            def closure():
                optimizer.zero_grad()
                loss = t.net(x).pow(2).mean()
                loss.backward()
                return loss
            for _ in range(2):
                optimizer.step(closure)
    main()
"""


def test_every_optimizer_instance_is_a_row_with_param_names(tmp_path, capsys):
    script = write_script(tmp_path, TWO_OPTIMIZERS)
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report, strict=True) == 0
    rows = json.loads(report.read_text())["results"]
    assert [r["optimizer"] for r in rows] == ["SGD", "SGD#2", "LBFGS"]
    assert all(r["verdict"] == "clean" for r in rows)  # closures recompute grads: not a change
    assert all(len(r["steps"]) == 2 for r in rows)
    assert [p["name"] for p in rows[0]["params"]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert "SGD#2" in capsys.readouterr().err


MUTATOR_SCRIPT = """\
    import torch
    import mutators
    model = torch.nn.Linear(6, 3)
    torch.optim.SGD(model.parameters(), lr=0.1)  # hooks SGD.step too: step() nests
    optimizer = mutators.{name}(model.parameters())
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        optimizer.step()
"""


@pytest.mark.parametrize(
    ("name", "verdict", "fingerprint"),
    [
        ("AdamNormalize", "mutated", "adam-normalized"),
        ("ScaleGrads", "mutated", "scaled"),
        ("ClearGrads", "cleared", None),
    ],
)
def test_mutators_are_flagged_and_strict_fails(tmp_path, capsys, name, verdict, fingerprint):
    import mutators  # noqa: F401 - the script finds it in sys.modules

    script = write_script(tmp_path, MUTATOR_SCRIPT.format(name=name))
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report, strict=True) == 1
    (row,) = json.loads(report.read_text())["results"]
    assert (row["verdict"], row["fingerprint"]) == (verdict, fingerprint)
    assert len(row["steps"]) == 3  # nested hooks count one step per step()
    assert row["class"] == f"mutators:{name}"


RAISES_ONCE = """\
    import torch
    class Flaky(torch.optim.SGD):
        calls = 0
        def step(self, closure=None):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("first step fails")
            return super().step(closure)
    model = torch.nn.Linear(3, 2)
    optimizer = Flaky(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        try:
            optimizer.step()
        except RuntimeError:
            pass
"""


def test_a_step_that_raised_does_not_stop_the_audit(tmp_path):
    script = write_script(tmp_path, RAISES_ONCE)
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report, strict=True) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert row["verdict"] == "clean" and len(row["steps"]) == 2


def test_interrupted_run_still_reports(tmp_path):
    body = CLEAN_SCRIPT.replace('print("trained")', "raise KeyboardInterrupt")
    script = write_script(tmp_path, body)
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report, strict=False) == 130
    data = json.loads(report.read_text())
    assert data["interrupted"] is True and len(data["results"][0]["steps"]) == 3


def test_class_path_prefers_the_public_module():
    import torch

    from sfdiag.optim import AdamWScheduleFree

    model = torch.nn.Linear(2, 2)
    assert class_path(torch.optim.AdamW(model.parameters())) == "torch.optim:AdamW"
    assert class_path(AdamWScheduleFree(model.parameters())) == "sfdiag.optim:AdamWScheduleFree"


def test_long_runs_are_sampled(tmp_path):
    body = CLEAN_SCRIPT.replace("range(3)", "range(150)")
    script = write_script(tmp_path, body)
    report = tmp_path / "r.json"
    assert run_script(["python", str(script)], report=report, strict=False) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert [s["step"] for s in row["steps"]] == [*range(AUDIT_FIRST), 100]
    assert not audited(AUDIT_MAX * AUDIT_EVERY, AUDIT_MAX)


SNEAKY_LOCALS = """\
    import warnings
    import torch

    class Sneaky:  # like torch.distributed.reduce_op: reading __class__ warns
        @property
        def __class__(self):
            warnings.warn("read __class__", FutureWarning)
            return Sneaky

    class Holder:
        def __init__(self):
            self.sneaky = Sneaky()
            self.model = torch.nn.Linear(3, 1)

    warnings.simplefilter("error")  # any warning from sfdiag's scan fails the script
    holder, sneaky = Holder(), Sneaky()
    optimizer = torch.optim.SGD(holder.model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        holder.model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
"""


def test_scanning_the_scripts_frames_runs_none_of_its_code(tmp_path):
    import warnings

    script = write_script(tmp_path, SNEAKY_LOCALS)
    report = tmp_path / "r.json"
    with warnings.catch_warnings():  # the script turns warnings into errors in this process
        assert run_script(["python", str(script)], report=report, strict=True) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert row["verdict"] == "clean"
    assert [p["name"] for p in row["params"]] == ["weight", "bias"]
