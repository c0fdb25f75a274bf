"""The probe engine end to end, in process: verdict and fingerprint for every kind of change.

Each purpose-built optimizer in tests/mutators.py changes p.grad one way; the in-repo
optimizers change it as docs/algorithms.md says. Both are named by import path or registry
name, exactly as a user's config would.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import sfdiag
from sfdiag.errors import SfdiagError
from sfdiag.probe.api import ProbeOptions, run_probe
from sfdiag.probe.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def probe(optimizers, *, steps=3, model="mlp", options=ProbeOptions(), **extra):
    config = parse_config(
        {"steps": steps, "model": model, "optimizers": optimizers, **extra}, "<test>"
    )
    return {r.optimizer: r for r in run_probe(config, options).results}


EXPECTED = [
    # optimizer, verdict, fingerprint
    ("mutators:Clean", "clean", None),
    ("mutators:ScaleGrads", "mutated", "scaled"),
    ("mutators:ScaleGradsViaData", "mutated", "scaled"),  # invisible to the version counter
    ("mutators:FoldWeightDecay", "mutated", "weight-decay"),
    ("mutators:SignGrads", "mutated", "sign"),
    ("mutators:ZeroGrads", "mutated", "zeroed"),
    ("mutators:NoiseGrads", "mutated", "unknown"),
    ("mutators:AdamNormalize", "mutated", "adam-normalized"),
    ("mutators:ReplaceGrads", "replaced", None),
    ("mutators:ClearGrads", "cleared", None),
    ("adamw", "clean", None),
    ("sf-adamw", "mutated", "adam-normalized"),
    ("sf-ref", "clean", None),
    ("sf-sgd", "clean", None),
    ("sf-sgd-ref", "clean", None),
]


@pytest.mark.parametrize("forensics", [False, True], ids=["sampled", "forensics"])
def test_every_kind_of_change_is_classified(forensics):
    found = probe([name for name, _, _ in EXPECTED], options=ProbeOptions(forensics=forensics))
    got = [(name, found[name].verdict, found[name].fingerprint) for name, _, _ in EXPECTED]
    assert got == EXPECTED
    for name, verdict, _ in EXPECTED:
        result = found[name]
        assert result.flagged == (verdict != "clean")
        assert (result.advice is None) == (verdict == "clean")
        assert result.params_with_grad == 4
        assert result.params_mutated == (0 if verdict == "clean" else 4)


def test_clean_optimizers_read_the_same_norm_before_and_after_step():
    found = probe(["adamw", "sf-ref"], steps=4)
    for result in found.values():
        for step in result.steps:
            assert step.post_step_grad_norm == step.pre_step_grad_norm
            assert step.params_mutated == 0
        assert result.norm_ratio == 1.0


def test_sf_adamw_post_step_norm_is_about_sqrt_numel_on_the_first_step():
    result = probe(["sf-adamw"], steps=1)["sf-adamw"]
    numel = 64 * 128 + 128 + 128 * 10 + 10
    assert result.steps[0].post_step_grad_norm == pytest.approx(math.sqrt(numel), rel=0.01)
    assert result.pre_step_grad_norm < 5


@pytest.mark.parametrize("foreach", [True, False])
def test_sf_sgd_weight_decay_is_flagged_although_the_norm_barely_moves(foreach):
    found = probe(
        [
            {"name": "wd", "class": "sf-sgd", "kwargs": {"weight_decay": 0.01, "foreach": foreach}},
            {"name": "no-wd", "class": "sf-sgd", "kwargs": {"foreach": foreach}},
        ]
    )
    assert (found["wd"].verdict, found["wd"].fingerprint) == ("mutated", "weight-decay")
    assert abs(found["wd"].norm_ratio - 1) < 0.01
    assert found["no-wd"].verdict == "clean"


def test_an_import_path_works_like_its_registry_name():
    found = probe(
        [
            {"name": "by-name", "class": "sf-sgd", "kwargs": {"weight_decay": 0.01}},
            {
                "name": "by-path",
                "class": "sfdiag.optim:SGDScheduleFree",
                "kwargs": {"weight_decay": 0.01},
            },
        ]
    )
    by_name, by_path = found["by-name"].to_dict(), found["by-path"].to_dict()
    for key in ("optimizer", "class"):
        by_name.pop(key), by_path.pop(key)
    assert by_name == by_path
    assert found["by-path"].cls == "sfdiag.optim:SGDScheduleFree"


def test_a_learning_rate_written_1e_minus_3_probes_as_0_001(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\noptimizers: [{name: adamw, kwargs: {lr: 1e-3}}]\n")
    report = run_probe(load_config(path))
    [result] = report.results
    assert (result.verdict, result.error) == ("clean", None)
    assert report.config["optimizers"][0]["kwargs"]["lr"] == 0.001


def test_data_input_shape_overrides_the_inferred_shape():
    shaped = {"name": "gaussian", "kwargs": {"input_shape": [64]}}
    assert probe(["adamw"], steps=1, data=shaped)["adamw"].verdict == "clean"
    wrong = {"name": "gaussian", "kwargs": {"input_shape": [65]}}  # the mlp takes 64 features
    with pytest.raises(SfdiagError, match=r"shape \(32, 65\)"):
        probe(["adamw"], steps=1, data=wrong)


def test_failing_optimizers_are_error_rows_and_the_rest_still_runs():
    found = probe(["mutators:FailsToConstruct", "mutators:FailsToStep", "adamw"])
    assert found["mutators:FailsToConstruct"].verdict == "error"
    assert "needs a closure-capable model" in found["mutators:FailsToConstruct"].error
    assert found["mutators:FailsToStep"].verdict == "error"
    assert "cannot step" in found["mutators:FailsToStep"].error
    assert found["adamw"].verdict == "clean"


def test_closure_and_create_graph():
    found = probe(
        [
            {
                "name": "lbfgs",
                "class": "torch.optim:LBFGS",
                "closure": True,
                "kwargs": {"max_iter": 3},
            },
            {
                "name": "sgd-graph",
                "class": "torch.optim:SGD",
                "create_graph": True,
                "kwargs": {"lr": 0.01},
            },
        ]
    )
    assert found["lbfgs"].verdict == "clean"  # grads recomputed by the closure are not mutation
    assert found["sgd-graph"].verdict == "clean"


def _documented_memory() -> dict[str, int]:
    """docs/algorithms.md's memory table: registry name -> bytes per element (float32)."""
    text = (REPO / "docs" / "algorithms.md").read_text(encoding="utf-8")
    section = text.split("\n## Memory\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|[^|]*\| (\d+) \|$", section, re.M)
    return {name: int(size) for name, size in rows}


def test_state_bytes_per_element_match_the_documented_memory_table():
    documented = _documented_memory()
    assert set(documented) == {"adamw", "sf-adamw", "sf-ref", "sf-sgd", "sf-sgd-ref"}
    found = probe(list(documented), steps=1)
    for name, size in documented.items():
        if name == "adamw":  # + torch's per-tensor step counters
            assert found[name].state_bytes_per_element == pytest.approx(size, abs=0.01)
        else:
            assert found[name].state_bytes_per_element == size, name


def test_the_readme_links_the_algorithms_it_implements():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "../shared/" not in readme  # users have no such directory
    assert "(docs/algorithms.md)" in readme


def test_every_optimizer_sees_the_same_model_and_data():
    found = probe(["adamw", "sf-adamw", "sf-ref", "sf-sgd"], steps=2)
    first_losses = {r.steps[0].loss for r in found.values()}
    first_norms = {r.steps[0].pre_step_grad_norm for r in found.values()}
    assert len(first_losses) == 1 and len(first_norms) == 1


def test_mnist_cnn_shows_the_hundreds_versus_under_five():
    found = probe(["adamw", "sf-adamw", "sf-ref"], steps=5, model="mnist-cnn")
    sf = found["sf-adamw"]
    assert sf.verdict == "mutated" and sf.fingerprint == "adam-normalized"
    assert sf.pre_step_grad_norm < 5
    assert 100 < sf.post_step_grad_norm < 2000
    for clean in ("adamw", "sf-ref"):
        assert found[clean].verdict == "clean"
        assert found[clean].post_step_grad_norm == found[clean].pre_step_grad_norm


FINGERPRINTED = [
    ("sf-adamw", "adam-normalized"),
    ({"name": "sf-sgd-wd", "class": "sf-sgd", "kwargs": {"weight_decay": 0.01}}, "weight-decay"),
    ("mutators:ScaleGrads", "scaled"),
    ("mutators:AdamNormalize", "adam-normalized"),
    ("mutators:FoldWeightDecay", "weight-decay"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_fingerprints_hold_in_every_dtype(dtype):
    found = probe([spec for spec, _ in FINGERPRINTED], dtype=dtype)
    got = [r.fingerprint for r in found.values()]
    assert got == [fingerprint for _, fingerprint in FINGERPRINTED]


def test_fingerprints_hold_with_nan_and_inf_in_the_grads():
    found = probe(
        [spec for spec, _ in FINGERPRINTED], model={"name": "hostile_models:nan_grad_model"}
    )
    assert [r.fingerprint for r in found.values()] == [fp for _, fp in FINGERPRINTED]


def test_an_optimizer_without_step_hooks_is_audited_around_step():
    found = probe(
        [
            {"name": "duck", "class": "mutators:DuckTyped"},
            {"name": "duck-scaling", "class": "mutators:DuckTyped", "kwargs": {"scale": 0.5}},
        ]
    )
    assert found["duck"].verdict == "clean"
    assert (found["duck-scaling"].verdict, found["duck-scaling"].fingerprint) == (
        "mutated",
        "scaled",
    )


def test_run_probe_takes_a_path_a_dict_or_a_config(tmp_path):
    data = {"steps": 2, "optimizers": ["adamw", "sf-adamw"]}
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\noptimizers: [adamw, sf-adamw]\n", encoding="utf-8")
    reports = [
        sfdiag.run_probe(given) for given in (str(path), path, data, parse_config(data, "<test>"))
    ]
    results = [[r.to_dict() for r in report.results] for report in reports]
    assert all(found == results[0] for found in results)
    assert [r["verdict"] for r in results[0]] == ["clean", "mutated"]


@pytest.mark.parametrize(
    ("given", "named"), [(42, "int 42"), (["adamw"], "list ['adamw']"), (None, "NoneType None")]
)
def test_run_probe_names_anything_else_it_is_given(given, named):
    with pytest.raises(sfdiag.SfdiagError, match="a config file's path") as caught:
        sfdiag.run_probe(given)
    assert f"got {named}" in str(caught.value)


def test_run_probe_of_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(sfdiag.SfdiagError, match="config file not found"):
        sfdiag.run_probe(tmp_path / "nope.yaml")
