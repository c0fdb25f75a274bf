"""The CLI end to end, as a user runs it: real subprocesses, real files, real exit codes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_env, run_cli, start_cli

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[")
WEIGHT_DECAY = str(REPO / "configs" / "weight-decay.yaml")


def _results(stdout: str) -> dict[str, dict]:
    return {r["optimizer"]: r for r in json.loads(stdout)["results"]}


def test_compare_mnist_shows_sf_adamw_flagged_and_the_others_clean(tmp_path):
    done = run_cli(
        "compare", "--optimizers", "adamw,sf-adamw,sf-ref", "--model", "mnist-cnn",
        "--steps", "5", "--format", "json", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = _results(done.stdout)
    sf = found["sf-adamw"]
    assert sf["flagged"] and sf["verdict"] == "mutated" and sf["fingerprint"] == "adam-normalized"
    assert sf["pre_step_grad_norm"] < 5 and 100 < sf["post_step_grad_norm"] < 2000
    assert "sf-ref" in sf["advice"]
    for name in ("adamw", "sf-ref"):
        assert not found[name]["flagged"]
        assert found[name]["post_step_grad_norm"] == found[name]["pre_step_grad_norm"]


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, str]:
    """The weight-decay config in every machine format, run side by side."""
    cwd = tmp_path_factory.mktemp("formats")
    running = {
        fmt: start_cli("probe", WEIGHT_DECAY, "--format", fmt, cwd=cwd)
        for fmt in ("json", "csv", "markdown", "junit", "table")
    }
    out = {}
    for fmt, proc in running.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out[fmt] = stdout
    return out


def test_weight_decay_is_flagged_although_the_norm_barely_moves(formats):
    found = _results(formats["json"])
    wd = found["sf-sgd-wd"]
    assert (wd["verdict"], wd["fingerprint"]) == ("mutated", "weight-decay")
    assert abs(wd["norm_ratio"] - 1) < 0.01
    assert found["sf-sgd"]["verdict"] == "clean"


def test_every_format_parses_with_the_standard_parser_and_carries_every_optimizer(formats):
    labels = {"sf-sgd", "sf-sgd-wd"}
    assert set(_results(formats["json"])) == labels
    frame = pd.read_csv(io.StringIO(formats["csv"]))
    assert set(frame["optimizer"]) == labels
    assert dict(zip(frame["optimizer"], frame["verdict"], strict=True)) == {
        "sf-sgd": "clean",
        "sf-sgd-wd": "mutated",
    }
    cases = ET.fromstring(formats["junit"]).iter("testcase")
    failing = {case.get("name"): case.find("failure") is not None for case in cases}
    assert failing == {"sf-sgd": False, "sf-sgd-wd": True}
    rows = [line for line in formats["markdown"].splitlines() if line.startswith("|")]
    assert any("sf-sgd-wd" in row and "mutated" in row for row in rows)
    for text in formats.values():
        assert not ANSI.search(text)  # not a terminal: no escapes anywhere
    assert "sf-sgd-wd" in formats["table"] and "weight-decay" in formats["table"]


def test_json_and_csv_carry_the_same_numbers(formats):
    frame = pd.read_csv(io.StringIO(formats["csv"])).set_index("optimizer")
    for name, result in _results(formats["json"]).items():
        for key in ("pre_step_grad_norm", "post_step_grad_norm", "norm_ratio"):
            assert frame.loc[name, key] == result[key]


def test_output_file_keeps_stdout_empty_and_strict_gates(tmp_path):
    done = run_cli(
        "compare", "--optimizers", "sf-adamw,adamw", "--steps", "2", "--format", "json",
        "--output", "r.json", "--strict", "--plot", "norms.png", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1  # --strict and sf-adamw is flagged
    assert done.stdout == ""
    assert set(_results((tmp_path / "r.json").read_text())) == {"sf-adamw", "adamw"}
    assert (tmp_path / "norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clean = run_cli(
        "compare", "--optimizers", "adamw,sf-ref", "--steps", "2", "--strict", cwd=tmp_path
    )
    assert clean.returncode == 0, clean.stderr


def test_baseline_then_check_then_regressions(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(Path(WEIGHT_DECAY).read_text())
    made = run_cli("baseline", "c.yaml", "--output", "b.json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    recorded = (tmp_path / "b.json").read_bytes()

    again = run_cli("baseline", "c.yaml", "--output", "b.json", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (tmp_path / "b.json").read_bytes() == recorded  # untouched

    same = run_cli("check", "c.yaml", "--baseline", "b.json", cwd=tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr

    config.write_text(config.read_text().replace("class: sf-sgd", "class: sf-sgd-ref", 1))
    moved = run_cli("check", "c.yaml", "--baseline", "b.json", "--format", "json", cwd=tmp_path)
    assert moved.returncode == 1
    report = json.loads(moved.stdout)
    assert report["regressed"]
    kinds = {d["kind"] for d in report["differences"] if d["regression"]}
    assert "class" in kinds and "config" in kinds
    table = run_cli("check", "c.yaml", "--baseline", "b.json", cwd=tmp_path)
    assert table.returncode == 1 and "sf-sgd-ref" in table.stdout


def test_check_with_device_auto_against_a_cpu_baseline(tmp_path):
    import torch

    (tmp_path / "c.yaml").write_text("steps: 2\noptimizers: [adamw, sf-adamw]\n")
    made = run_cli("baseline", "c.yaml", "--device", "cpu", "-o", "b.json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    auto = run_cli(
        "check", "c.yaml", "-b", "b.json", "--device", "auto", "--format", "json", cwd=tmp_path
    )
    # auto is the CPU here, unless this machine has CUDA: only then is it another run
    assert auto.returncode == (1 if torch.cuda.is_available() else 0), auto.stdout + auto.stderr
    [diff] = [d for d in json.loads(auto.stdout)["differences"] if d["kind"] == "config"]
    assert (diff["baseline"], diff["current"]) == ("cpu", "auto")


CONSOLE_SCRIPT = Path(sys.executable).with_name("sfdiag")
MY_PIECES = """\
import torch


def make():
    return torch.nn.Linear(4, 2)


def batches(model, *, batch_size, steps, seed, loss):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 4, generator=gen), torch.randn(batch_size, 2, generator=gen))
        for _ in range(steps)
    ]


def loss(output, target):
    return torch.nn.functional.mse_loss(output, target)


class Optimizer(torch.optim.SGD):
    pass
"""


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="no sfdiag console script next to python")
def test_the_console_script_finds_import_paths_in_the_current_directory(tmp_path):
    """`sfdiag` as `python -m sfdiag` does: ./mymodels.py serves every kind of import path."""
    (tmp_path / "mymodels.py").write_text(MY_PIECES)
    (tmp_path / "c.yaml").write_text(
        "steps: 2\nmodel: {name: 'mymodels:make'}\ndata: {name: 'mymodels:batches'}\n"
        "loss: 'mymodels:loss'\noptimizers: [{name: mine, class: 'mymodels:Optimizer'}]\n"
    )
    env = cli_env(PYTHONPATH=str(REPO))  # this checkout's sfdiag; the cwd only as sfdiag puts it
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "probe", "c.yaml", "--format", "json", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [mine] = json.loads(done.stdout)["results"]
    assert (mine["class"], mine["verdict"], mine["error"]) == ("mymodels:Optimizer", "clean", None)


def test_list_init_and_version(tmp_path):
    listed = run_cli("list", cwd=tmp_path)
    assert listed.returncode == 0
    for name in ("adamw", "sf-adamw", "sf-ref", "sf-sgd", "sf-sgd-ref", "mlp", "mnist-cnn"):
        assert re.search(rf"^\s+{re.escape(name)}\s", listed.stdout, re.M), name
    assert run_cli("init", "x.yaml", cwd=tmp_path).returncode == 0
    written = (tmp_path / "x.yaml").read_text()
    refused = run_cli("init", "x.yaml", cwd=tmp_path)
    assert refused.returncode == 2 and (tmp_path / "x.yaml").read_text() == written
    probed = run_cli("probe", "x.yaml", "--format", "json", "--quiet", cwd=tmp_path)
    assert probed.returncode == 0, probed.stderr
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("sfdiag ")
