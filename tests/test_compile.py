"""A compiled ``optimizer.step()`` (torch's tutorial recipe) and a compiled model, audited.

Each case runs ``examples/train_compiled.py`` twice at once, with plain ``python`` and under
``sfdiag run``: the script must print the same losses to the last digit, and every verdict
must be right. Where the step is compiled into one graph (``fullgraph=True``) sfdiag's hooks
cannot run in it: the report says which steps it did not see, and judges nothing against them.

Real torch.compile throughout. The default backend (inductor) compiles C++ on the CPU, about
20 s cold: one case uses it, as users do; the others use ``aot_eager`` (the same dynamo
tracing and graph breaks, no code generation).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, start_cli

pytest.importorskip("tensorboard")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_compiled.py"
STEPS = 3


def _has_schedulefree() -> bool:
    try:
        import schedulefree  # noqa: F401
    except ImportError:
        return False
    return True


def audit_beside_plain(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """The example with ``args`` run by ``python`` and by ``sfdiag run`` side by side (their
    stdout asserted equal): sfdiag's tables (its stderr) and the JSON report."""
    script = [str(EXAMPLE), "--steps", str(STEPS), *args]
    plain = subprocess.Popen(
        [sys.executable, *script, "--logdir", str(tmp_path / "plain")],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    report = tmp_path / "report.json"
    audited = start_cli(
        "run",
        "--report",
        str(report),
        "--",
        "python",
        *script,
        "--logdir",
        str(tmp_path / "audited"),
        cwd=tmp_path,
    )
    plain_out, plain_err = plain.communicate(timeout=300)
    audited_out, audited_err = audited.communicate(timeout=300)
    assert plain.returncode == 0, plain_err[-2000:]
    assert audited.returncode == 0, audited_err[-2000:]
    assert audited_out == plain_out  # the same losses, to the last digit
    assert plain_out.count(" loss ") == STEPS
    return audited_err, json.loads(report.read_text())


def the_optimizer(report: dict) -> dict:
    (result,) = report["results"]
    assert result["verdict"] != "error" and result["error"] is None
    return result


def verdicts(report: dict) -> dict[str, tuple[str, int]]:
    return {m["name"]: (m["verdict"], m["steps_judged"]) for m in report["metrics"]}


@pytest.mark.slow
def test_adamw_compiled_by_inductor_as_the_tutorial_does(tmp_path):
    """torch.optim.AdamW with a tensor lr, its step compiled (fullgraph=False) and the model
    compiled too, by inductor: every step audited, both logged norms right (AdamW leaves
    p.grad alone, so the one read after step() is the gradient's too)."""
    _, report = audit_beside_plain(tmp_path, "--optimizer", "adamw", "--compile-model")
    result = the_optimizer(report)
    assert result["verdict"] == "clean"
    assert len(result["steps"]) == STEPS
    assert "not_audited" not in result
    assert verdicts(report) == {
        "grad_norm": ("correct", STEPS),
        "post/grad_norm": ("correct", STEPS),
    }


SCHEDULE_FREE = [
    pytest.param("sf-adamw", id="sf-adamw"),
    pytest.param(
        "schedulefree",
        id="schedulefree",
        marks=pytest.mark.skipif(not _has_schedulefree(), reason="schedulefree not installed"),
    ),
]


@pytest.mark.parametrize("optimizer", SCHEDULE_FREE)
def test_schedule_free_compiled_step_and_model_with_grad_monitor(tmp_path, optimizer):
    """Schedule-free AdamW writes its update into p.grad: under torch.compile the norm read
    before step() is correct, the one after it post-step, GradMonitor's correct, at every
    step; the optimizer is audited (mutated), no error row."""
    tables, report = audit_beside_plain(
        tmp_path,
        "--optimizer",
        optimizer,
        "--compile-model",
        "--monitor",
        "--backend",
        "aot_eager",
    )
    # the mode watch's global forward hook: torch's warning about it is not the script's
    assert "global hooks" not in tables
    result = the_optimizer(report)
    assert result["verdict"] == "mutated"
    assert len(result["steps"]) == STEPS
    assert "not_audited" not in result
    assert verdicts(report) == {
        "grad_norm": ("correct", STEPS),
        "post/grad_norm": ("post-step", STEPS),
        "monitor/grad_norm": ("correct", STEPS),
    }


def test_a_step_compiled_into_one_graph_is_said_not_audited(tmp_path):
    """fullgraph=True: a graph break would fail the script's compile, so sfdiag's hooks stay
    out of the graph (the script runs as without sfdiag, where the hooks of old broke it).
    The report says how many steps it did not see, judges no logged value against them,
    and shows no error and no verdict it could not reach."""
    tables, report = audit_beside_plain(
        tmp_path, "--optimizer", "sf-adamw", "--fullgraph", "--backend", "aot_eager"
    )
    result = the_optimizer(report)
    assert result["not_audited"] == {"why": "torch.compile", "steps": STEPS, "of": STEPS}
    assert result["steps"] == []
    assert report["metrics"] == []
    assert "not audited (torch.compile)" in tables
    assert f"steps under torch.compile: not audited, {STEPS} of {STEPS}" in tables
    assert "no gradient metric judged" in tables


# ---- GradMonitor without sfdiag run -----------------------------------------------------------
def _monitored_run(fullgraph: bool) -> list[tuple[float, float]]:
    """(GradMonitor's last_grad_norm, the true norm) after each step of a compiled model
    whose step() is compiled too."""
    from sfdiag import GradMonitor
    from sfdiag.optim import AdamWScheduleFree

    torch.manual_seed(0)
    inputs = torch.randn(16, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = AdamWScheduleFree(model.parameters(), lr=0.01)
    optimizer.train()
    monitor = GradMonitor(optimizer)
    compiled = torch.compile(model, backend="aot_eager")

    @torch.compile(fullgraph=fullgraph, backend="aot_eager")
    def step() -> None:
        optimizer.step()

    seen = []
    try:
        for _ in range(STEPS):
            optimizer.zero_grad()
            compiled(inputs).pow(2).mean().backward()
            true = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])
            ).item()
            step()
            seen.append((monitor.last_grad_norm, true))
    finally:
        monitor.remove()
        torch._dynamo.reset()
    return seen


def test_grad_monitor_reads_a_compiled_step_eagerly():
    """Its hooks run between the compiled graphs, on the real grads: the norm step() was
    given, at every step."""
    for monitored, true in _monitored_run(fullgraph=False):
        assert monitored == pytest.approx(true, rel=1e-6)


def test_grad_monitor_under_fullgraph_reads_nan_not_a_stale_norm():
    """A step compiled into one graph runs no hook: the training runs (the hooks of old
    broke the compile) and the monitor says it does not know (NaN), not the last norm."""
    seen = _monitored_run(fullgraph=True)
    assert len(seen) == STEPS
    assert all(math.isnan(monitored) for monitored, _ in seen)


# ---- schedule-free modes with a compiled model ----------------------------------------------
def _evaluate_in_train_mode(audited: bool) -> tuple[list[float], int, tuple]:
    """A compiled model trained with schedule-free AdamW and evaluated with the optimizer in
    train mode (the mistake): (the losses, the graphs dynamo compiled, the findings)."""
    import sfdiag
    from sfdiag.optim import AdamWScheduleFree

    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    inputs = torch.randn(16, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = AdamWScheduleFree(model.parameters(), lr=0.01)
    optimizer.train()
    compiled = torch.compile(model, backend="aot_eager")
    losses = []

    def train() -> None:
        for _ in range(4):
            optimizer.zero_grad()
            compiled(inputs).pow(2).mean().backward()
            optimizer.step()
            compiled.eval()
            with torch.no_grad():
                losses.append(compiled(inputs).pow(2).mean().item())
            compiled.train()

    findings: tuple = ()
    try:
        if audited:
            with sfdiag.audit(show=False) as audit:
                train()
            findings = audit.report.findings
        else:
            train()
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    return losses, graphs, findings


def test_mode_watch_leaves_a_compiled_models_graphs_alone():
    """The mode watch's global forward hook, traced into the model's graph, guarded it on the
    optimizer's step count: a recompile at every step. Now the graphs are the ones compiled
    without sfdiag, and the evaluation in train mode is still found (torch runs global
    hooks eagerly for the compiled wrapper)."""
    losses, graphs, _ = _evaluate_in_train_mode(audited=False)
    audited_losses, audited_graphs, findings = _evaluate_in_train_mode(audited=True)
    assert audited_losses == losses
    assert audited_graphs == graphs
    assert [f.kind for f in findings] == ["eval-in-train-mode"]
