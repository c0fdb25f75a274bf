"""bench/: every measurement runs on tiny sizes and reports every key (no timing limits).

``bench/run.py`` is the entry point; the figures live in its sibling modules (``harness``,
``audit``, ``optimizers``, ``run_figures``, ``run_host``, ``callbacks``, ``cli_figures``,
``scaling``, ``cuda_figures``, ``render``), imported as the entry point imports them: with
``bench/`` on ``sys.path``. Also: importing the CLI does not import torch (``sfdiag --help``
stays fast).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench():
    """The entry point (``run``) and the modules beside it; ``bench/`` leaves ``sys.path``
    and its modules ``sys.modules`` afterwards."""
    path, threads = list(sys.path), torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("sfdiag_bench_run", BENCH / "run.py")
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run
    spec.loader.exec_module(run)  # puts bench/ on sys.path, imports its modules
    names = ("harness", "render", "cuda_figures", "callbacks")
    yield SimpleNamespace(run=run, **{name: importlib.import_module(name) for name in names})
    torch.set_num_threads(threads)
    sys.path[:] = path
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == BENCH:
            del sys.modules[name]
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def figures(bench):
    return bench.run.collect(bench.harness.Settings.tiny())


def test_cli_import_does_not_import_torch():
    code = "import sfdiag.cli, sys; assert 'torch' not in sys.modules, 'sfdiag.cli imports torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_key_is_present_and_sane(figures, bench):
    for key in bench.harness.FIGURES:
        assert key in figures
    for key in ("scaling", "machine", "notes"):
        assert key in figures
    release = figures["machine"]["schedulefree"] is not None
    lightning = bench.callbacks.lightning_installed()
    for key in bench.harness.FIGURES:
        if key.endswith("_vs_upstream") and not release:
            assert figures[key] is None
        elif key == "callback_vs_audit_ratio" and not lightning:
            assert figures[key] is None and figures["callback_overhead"] is None
        elif "_us_per_" in key:  # a difference of times: at tiny sizes noise may turn it
            assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
        else:
            assert _positive(figures[key]), (key, figures[key])
    assert figures["machine"]["torch_threads"] == 1
    assert figures["cli"]["cli_imports_torch"] is False
    assert figures["cli"]["help"]["exit_code"] == 0
    assert figures["cli"]["compare"]["exit_code"] == 0
    for name in ("sf_adamw_step_pinned_malloc", "sf_sgd_step_pinned_malloc"):
        assert _positive(figures[name]["vs_floor"])  # the same measurement, in a worker
    json.loads(json.dumps(figures))  # JSON-ready as it is


def test_audit_figures_measure_what_the_auditor_holds(figures):
    for name in ("adamw", "sf-adamw"):
        overhead = figures["audit_overhead"][name]
        assert _positive(overhead["plain_ms"]) and _positive(overhead["audited_ms"])
        memory = figures["audit_extra_memory"][name]
        # the pending snapshot: one grad sample and one parameter sample per tensor
        assert memory["torch_held_during_step_bytes"] > 0
        assert memory["torch_peak_bytes"] >= memory["torch_held_during_step_bytes"]
        assert memory["peak_bytes"] == memory["torch_peak_bytes"] + memory["python_peak_bytes"]
        assert memory["fraction"] == pytest.approx(
            memory["peak_bytes"] / memory["param_bytes"], rel=1e-3
        )


def test_scaling_rows(figures, bench):
    rows = figures["scaling"]["sizes"]
    assert len(rows) == len(bench.harness.Settings.tiny().scaling_sizes)
    for row in rows:
        assert row["params"] > 0
        assert _positive(row["audit_overhead_ratio"])
        assert row["max_rss_plain_mb"] > 0 and row["max_rss_audited_mb"] > 0
        assert row["audit_peak_bytes"] > 0


def test_render_names_every_figure(figures, bench):
    text = bench.render.render(figures)
    for key in bench.harness.FIGURES:
        assert key in text


def test_stacked_linear_has_about_the_asked_parameters(bench):
    for size in (20_000, 1_000_000):
        model = bench.harness.stacked_linear(size, width=64)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - size) / size < 0.05


def test_cuda_figures_skip_cleanly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the figures would run")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cuda", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cuda": "not available"}
    assert "no CUDA device" in done.stderr


def test_the_cuda_figures_run_through_on_the_cpu(bench):
    """measure_cuda's code on the CPU (tiny sizes): a GPU machine's time is not spent
    finding a typo; every figure it reports is there and rendered."""
    settings = bench.harness.Settings.tiny()
    cuda = bench.cuda_figures.measure_cuda(settings, device="cpu")
    for key in ("audit_overhead_100m", "audit_overhead_100m_large_batch"):
        overhead = cuda[key]
        assert _positive(overhead["ratio"]) and overhead["hooks"]["clock"] == "thread CPU time"
        assert overhead["hooks"]["pre_hook_ms"] > 0 and overhead["hooks"]["post_hook_ms"] > 0
    large_batch = bench.cuda_figures.CUDA_LARGE_BATCH
    assert cuda["audit_overhead_100m_large_batch"]["batch"] == large_batch
    assert _positive(cuda["compare_cuda_seconds"]) and cuda["compare_cuda"]["exit_code"] in (0, 1)
    assert _positive(cuda["sf_adamw_step"]["ms"]["sfdiag"])
    text = bench.render.render_cuda(cuda)
    assert f"batch {settings.scaling_batch}:" in text and f"batch {large_batch}:" in text


def test_the_new_figures_are_there(figures, bench):
    assert figures["cuda"] == "not available" or isinstance(figures["cuda"], dict)
    for key in ("audit_overhead_ratio_100m", "audit_extra_memory_fraction_mutating"):
        assert _positive(figures[key])
    hooks = figures["audit_overhead_100m"]["hooks"]  # the breakdown that explains the ratio
    assert hooks["hooks_over_step"] > 1 and hooks["two_reads_over_step"] > 1
    assert hooks["pre_hook_ms"] > 0 and hooks["post_hook_ms"] > 0 and hooks["step_ms"] > 0
    long_run = figures["run_overhead_long"]
    assert long_run["steps_each"] > 0 and long_run["audited_steps"] > 0
    assert long_run["clock"] == "thread CPU time" and _positive(long_run["wall_ratio"])
    for spread in (long_run["chunk_pair_ratio"], long_run["wall_chunk_pair_ratio"]):
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    tiny = bench.harness.Settings.tiny()
    assert long_run["chunk_pairs"] == tiny.long_steps // long_run["chunk_steps"]
    assert long_run["metrics_judged"]["audited/grad_norm"][0] == "correct"


def test_the_callback_figure(figures, bench):
    """callback_vs_audit_ratio: bench/callbacks.py's measurement at the settings' sizes."""
    if not bench.callbacks.lightning_installed():
        pytest.skip("Lightning is not installed: the figure is skipped")
    settings = bench.harness.Settings.tiny()
    details = figures["callback_overhead"]
    assert (details["steps"], details["rounds"]) == (
        settings.callback_steps,
        settings.callback_rounds,
    )
    assert figures["callback_vs_audit_ratio"] == details["callback_vs_audit_ratio"]
    assert set(details["seconds_cpu"]) == {"callback", "audit", "plain", "noop"}
    assert all(_positive(seconds) for seconds in details["seconds_cpu"].values())
    assert "the Lightning callback" in bench.render.render(figures)


def test_the_host_cost_figures(figures, bench):
    """Round 3: the host's cost per tensor and per logged value measure what they name."""
    settings = bench.harness.Settings.tiny()
    tensors = 2 * settings.host_layers
    audit = figures["audit_host"]
    for name, mutated in (("adamw", 0), ("sf-adamw", tensors)):
        o = audit[name]
        assert o["tensors"] == tensors and o["snapshots"] == 2
        assert o["params_mutated"] == mutated  # sf-adamw's grads are fingerprinted
        assert _positive(o["plain_ms"]) and _positive(o["audited_ms"])
        assert _positive(o["pre_hook_ms"]) and _positive(o["post_hook_ms"])
    run_step = figures["run_step_host"]
    assert run_step["tensors"] == tensors and run_step["logger"] == "tensorboard (stub writer)"
    assert _positive(run_step["plain_ms"]) and _positive(run_step["run_ms"])
    assert run_step["audited_steps_untimed"] >= 20  # the first AUDIT_FIRST, never timed
    assert run_step["metrics_judged"]["train/grad_norm"][0] == "correct"
    logged = figures["run_host_logged_value"]
    assert logged["values_per_step"] == settings.logged_values
    assert all(_positive(us) for us in logged["step_us"].values())
    judged = logged["metrics_judged"]
    assert len(judged) == settings.logged_values  # every value tapped, recorded and judged
    assert all(verdict == "correct" and steps > 0 for verdict, steps in judged.values())
    step = figures["sf_adamw_step_host"]
    assert step["tensors"] == tensors and _positive(step["ms"]["sfdiag"])
    if figures["machine"]["schedulefree"] is not None:
        assert _positive(step["ms"]["release_foreach"])


def test_the_hook_profile_names_both_hooks():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_hooks.py"), "--params", "20000"]
        + ["--width", "64", "--steps", "1", "--top", "40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "take" in done.stdout  # cProfile's rows: the snapshot itself
    assert "sfdiag.pre_step" in done.stdout and "sfdiag.post_step" in done.stdout
