"""Determinism: one config on one machine gives bit-identical results, run after run,
in-process or through the CLI, whatever the output format."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from conftest import start_cli

from sfdiag.baseline import baseline_json
from sfdiag.probe.api import run_probe
from sfdiag.probe.config import parse_config
from sfdiag.report import RenderOptions, render

# Dropout (torch's global RNG), a mutator drawing noise from it, schedule-free state and a
# NaN-free but otherwise ordinary model: everything that could drift between runs.
CONFIG = {
    "seed": 3,
    "steps": 3,
    "model": {"name": "hostile_models:dropout_model"},
    "data": {"batch_size": 8},
    "optimizers": [
        "adamw",
        "sf-adamw",
        "sf-sgd",
        {"name": "noise", "class": "mutators:NoiseGrads"},
        {"name": "adam-normalize", "class": "mutators:AdamNormalize"},
    ],
}
YAML = json.dumps(CONFIG)  # JSON is YAML


def _results_text(results: list) -> str:
    """The results exactly: NaN is "nan" already, floats print their shortest repr."""
    return json.dumps(results, sort_keys=True, allow_nan=False)


@pytest.fixture(scope="module")
def in_process():
    return run_probe(parse_config(CONFIG))


def test_two_in_process_runs_compare_equal(in_process):
    again = run_probe(parse_config(CONFIG))
    first = [r.to_dict() for r in in_process.results]
    second = [r.to_dict() for r in again.results]
    assert first == second
    assert _results_text(first) == _results_text(second)
    assert baseline_json(in_process) == baseline_json(again)  # a baseline is the same bytes
    # Timings live outside `results`; everything else in the report is equal too.
    one, two = in_process.to_dict(), again.to_dict()
    one.pop("timing", None), two.pop("timing", None)
    assert one == two


def test_the_seed_matters(in_process):
    other = run_probe(parse_config({**CONFIG, "seed": 4}))
    assert other.results[0].steps[0].loss != in_process.results[0].steps[0].loss


def test_results_hold_no_timings(in_process):
    text = _results_text([r.to_dict() for r in in_process.results])
    assert "time" not in text and "seconds" not in text


def test_cli_runs_and_formats_agree(tmp_path, in_process):
    """A CLI process gives this process's numbers, in JSON and in CSV alike."""
    (tmp_path / "c.yaml").write_text(YAML, encoding="utf-8")
    started = [
        start_cli("probe", "c.yaml", "--format", fmt, cwd=tmp_path) for fmt in ("json", "csv")
    ]
    outputs = []
    for process in started:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        outputs.append(stdout)
    first = json.loads(outputs[0])
    expected = [r.to_dict() for r in in_process.results]
    assert _results_text(first["results"]) == _results_text(expected)
    assert first["config"] == parse_config(CONFIG).to_dict()

    rows = list(csv.DictReader(io.StringIO(outputs[1])))
    assert [row["optimizer"] for row in rows] == [r["optimizer"] for r in first["results"]]
    for row, result in zip(rows, first["results"], strict=True):
        assert row["verdict"] == result["verdict"]
        assert row["flagged"] == str(result["flagged"])
        assert row["fingerprint"] == (result["fingerprint"] or "")
        for key in ("params_mutated", "params_with_grad"):
            assert int(row[key]) == result[key]
        for key in ("pre_step_grad_norm", "post_step_grad_norm", "norm_ratio"):
            value = result[key]
            expected_value = float(value) if isinstance(value, str) else value
            got = float(row[key])
            assert got == expected_value or (math.isnan(got) and math.isnan(expected_value))


def test_json_and_table_render_identically_twice(in_process):
    for fmt in ("table", "json", "csv", "markdown", "junit"):
        assert render(in_process, fmt, RenderOptions()) == render(in_process, fmt, RenderOptions())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cudnn_runs_deterministic_algorithms_during_a_cuda_probe_only(device):
    """No CUDA is needed to check the switch: it only sets torch's cuDNN flags, and puts
    them back however the probe ends."""
    import torch

    from sfdiag.probe.runner import deterministic_kernels

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = False, True
    try:
        with pytest.raises(KeyboardInterrupt):
            with deterministic_kernels(torch.device(device)):
                inside = cudnn.deterministic, cudnn.benchmark
                raise KeyboardInterrupt
        assert inside == ((True, False) if device == "cuda" else (False, True))
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
