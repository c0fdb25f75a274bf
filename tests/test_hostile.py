"""Hostile numbers: NaN/Inf grads and losses, frozen and unused params, sparse and zero
grads, float64 and bfloat16. Each is a finding in the report, never a crash, and never
mistaken for a mutation; where NaN hides what step() did, the report says it could not
tell. Hostile optimizers, models and losses fail as error rows that say who failed.
Models come from tests/hostile_models.py by import path, optimizers from tests/mutators.py.
"""

from __future__ import annotations

import json
import math

import mutators
import pytest
import torch

from sfdiag.errors import SfdiagError
from sfdiag.probe.api import ProbeOptions, run_probe
from sfdiag.probe.config import parse_config
from sfdiag.report import RenderOptions, render
from sfdiag.results import ProbeReport
from sfdiag.step_audit import auditor as audit

CLEAN = [
    "adamw",
    "sf-ref",
    {"name": "sgd", "class": "torch.optim:SGD", "kwargs": {"lr": 0.01, "momentum": 0.9}},
    {"name": "clean", "class": "mutators:Clean"},
]


def _mutator(name: str) -> dict:
    return {"name": name, "class": f"mutators:{name}"}


def probe(model: str | dict, optimizers: list, *, forensics: bool = False, **extra) -> ProbeReport:
    if isinstance(model, str):
        model = {"name": f"hostile_models:{model}"}
    config = parse_config(
        {"model": model, "steps": 3, "data": {"batch_size": 8}, "optimizers": optimizers, **extra}
    )
    return run_probe(config, ProbeOptions(forensics=forensics))


def verdicts(report: ProbeReport) -> dict[str, str]:
    return {r.optimizer: r.verdict for r in report.results}


def _no_constants(token: str):
    raise AssertionError(f"JSON output holds the non-standard constant {token}")


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity tokens (which json.loads accepts by default)."""
    return json.loads(text, parse_constant=_no_constants)


# --------------------------------------------------------------------------- clean stays clean

# Models whose grads hold nothing but NaN (and the zeros a ReLU leaves): clean by bits,
# but the audit cannot tell a change that keeps NaN a NaN, and says so.
NAN_ONLY = {"nan_model", "inf_model"}


@pytest.mark.parametrize(
    ("model", "dtype"),
    [
        ("nan_model", "float32"),
        ("inf_model", "float32"),
        ("nan_grad_model", "float32"),
        ("zero_model", "float32"),
        ("frozen_model", "float32"),
        ("unused_param_model", "float32"),
        ("nan_model", "float64"),
        ("nan_grad_model", "bfloat16"),
    ],
)
@pytest.mark.parametrize("forensics", [False, True], ids=["sampled", "forensics"])
def test_clean_optimizers_stay_clean(model, dtype, forensics):
    report = probe(model, CLEAN, dtype=dtype, forensics=forensics)
    assert verdicts(report) == {r.optimizer: "clean" for r in report.results}
    for result in report.results:
        assert result.error is None and result.params_mutated == 0
        assert len(result.steps) == 3
        # a few NaN among finite elements (nan_grad_model) still tell; NaN-only grads do not
        assert result.undetermined == (model in NAN_ONLY)
        assert (result.advice is not None) == (model in NAN_ONLY)
        for finding in result.params:
            # An unchanged grad changed by 0, also where it holds NaN or Inf.
            assert finding.max_rel_change == 0.0
    strict_json(render(report, "json", RenderOptions()))


# --------------------------------------------------------------------------- NaN and Inf


def test_a_nan_loss_is_reported_not_a_crash():
    report = probe("nan_model", ["adamw", _mutator("ZeroGrads")])
    adamw, zeroing = report.results
    assert adamw.verdict == "clean"
    assert all(math.isnan(s.loss) for s in adamw.steps)
    assert math.isnan(adamw.pre_step_grad_norm) and math.isnan(adamw.post_step_grad_norm)
    # clean only because NaN equals NaN: the result says the audit could not tell
    assert adamw.undetermined and "could not tell" in adamw.advice and not adamw.flagged
    # NaN turned into zeros is a change the bits do show
    assert zeroing.verdict == "mutated" and not zeroing.undetermined

    data = strict_json(render(report, "json", RenderOptions()))
    row = data["results"][0]
    assert row["pre_step_grad_norm"] == "nan" and row["norm_ratio"] == "nan"
    assert [s["loss"] for s in row["steps"]] == ["nan"] * 3
    assert row["verdict"] == "clean" and row["undetermined"] is True
    assert data["results"][1]["undetermined"] is False

    table = render(report, "table", RenderOptions(width=200))
    adamw_line = next(line for line in table.splitlines() if line.lstrip().startswith("adamw"))
    assert "nan" in adamw_line and "clean (NaN grads: could not tell)" in adamw_line
    assert "adamw: clean, but undetermined." in table
    assert "1 undetermined (NaN grads)" in table
    markdown = render(report, "markdown", RenderOptions())
    assert "clean (NaN grads: could not tell)" in markdown


@pytest.mark.parametrize("name", ["ScaleGrads", "AdamNormalize"])
def test_a_change_that_keeps_nan_a_nan_is_undetermined_not_silently_clean(name):
    # the same mutators are caught on finite grads (test_probe): here NaN hides them
    (result,) = probe("nan_model", [_mutator(name)]).results
    assert (result.verdict, result.undetermined) == ("clean", True)
    assert "could not tell whether step() changed p.grad" in result.advice


def test_an_infinite_output_is_reported():
    report = probe("inf_model", ["adamw"])
    (result,) = report.results
    assert result.verdict == "clean" and result.undetermined
    assert not any(math.isfinite(s.loss) for s in result.steps)
    strict_json(render(report, "json", RenderOptions()))


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (_mutator("ScaleGrads"), "mutated"),
        (_mutator("ScaleGradsViaData"), "mutated"),
        (_mutator("ZeroGrads"), "mutated"),
        (_mutator("SignGrads"), "mutated"),
        (_mutator("NoiseGrads"), "mutated"),
        (_mutator("AdamNormalize"), "mutated"),
        (_mutator("FoldWeightDecay"), "mutated"),
        ("sf-adamw", "mutated"),
        (_mutator("ReplaceGrads"), "replaced"),
        (_mutator("ClearGrads"), "cleared"),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else v,
)
def test_mutators_are_detected_in_grads_holding_nan_and_inf(optimizer, expected):
    report = probe("nan_grad_model", [optimizer])
    (result,) = report.results
    assert result.verdict == expected
    # fc1.weight holds NaN, Inf and -Inf at every step: its own verdict must still show it.
    poisoned = next(p for p in result.params if p.name == "fc1.weight")
    assert poisoned.verdict == expected
    assert math.isnan(result.pre_step_grad_norm)
    strict_json(render(report, "json", RenderOptions()))


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (_mutator("ZeroGrads"), "mutated"),
        (_mutator("ReplaceGrads"), "replaced"),
        (_mutator("ClearGrads"), "cleared"),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else v,
)
def test_mutators_are_detected_in_all_nan_grads(optimizer, expected):
    (result,) = probe("nan_model", [optimizer]).results
    assert result.verdict == expected
    assert not result.undetermined  # a change the bits show is no guess


# --------------------------------------------------------------------------- missing grads


def test_frozen_layer_params_are_left_out():
    report = probe("frozen_model", ["adamw", "sf-adamw", _mutator("ScaleGrads")])
    assert verdicts(report) == {"adamw": "clean", "sf-adamw": "mutated", "ScaleGrads": "mutated"}
    for result in report.results:
        assert result.params_with_grad == 2
        assert [p.name for p in result.params] == ["fc2.weight", "fc2.bias"]
    assert report.results[2].params_mutated == 2


def test_a_param_that_gets_no_grad_is_left_out():
    report = probe("unused_param_model", ["adamw", "sf-adamw", _mutator("SignGrads")])
    assert verdicts(report) == {"adamw": "clean", "sf-adamw": "mutated", "SignGrads": "mutated"}
    for result in report.results:
        assert result.params_with_grad == 4
        assert "unused.weight" not in {p.name for p in result.params}


def test_a_model_with_every_param_frozen_gives_error_rows():
    report = probe("all_frozen_model", ["adamw", "sf-ref"])
    assert verdicts(report) == {"adamw": "error", "sf-ref": "error"}
    assert all("grad" in r.error for r in report.results)
    strict_json(render(report, "json", RenderOptions()))


# --------------------------------------------------------------------------- zero grads


def test_zero_grads():
    report = probe("zero_model", [*CLEAN, _mutator("ReplaceGrads"), _mutator("ClearGrads")])
    found = verdicts(report)
    assert found.pop("ReplaceGrads") == "replaced" and found.pop("ClearGrads") == "cleared"
    assert set(found.values()) == {"clean"}
    for result in report.results:
        assert result.pre_step_grad_norm == 0.0
    assert report.results[0].norm_ratio == 1.0  # 0 / 0: nothing moved


# --------------------------------------------------------------------------- sparse grads


@pytest.mark.parametrize("forensics", [False, True], ids=["sampled", "forensics"])
def test_sparse_grads(forensics):
    optimizers = [
        {"name": "sparse-adam", "class": "torch.optim:SparseAdam"},
        {"name": "sgd", "class": "torch.optim:SGD"},
        _mutator("ScaleGrads"),
        "adamw",
    ]
    report = probe("sparse_bag", optimizers, forensics=forensics)
    assert verdicts(report) == {
        "sparse-adam": "clean",
        "sgd": "clean",
        "ScaleGrads": "mutated",
        "adamw": "error",  # torch's Adam refuses sparse grads: an error row, not a crash
    }
    assert "sparse" in report.results[3].error
    scaled = report.results[2]
    assert scaled.fingerprint == "scaled"
    assert scaled.norm_ratio == pytest.approx(0.5)
    strict_json(render(report, "json", RenderOptions()))


def test_sparse_and_dense_grads_in_one_model():
    model = {"name": "hostile_models:sparse_bag", "kwargs": {"head": True}}
    optimizers = [
        {"name": "sgd", "class": "torch.optim:SGD", "kwargs": {"momentum": 0.9}},
        _mutator("ScaleGrads"),
    ]
    report = probe(model, optimizers)
    assert verdicts(report) == {"sgd": "clean", "ScaleGrads": "mutated"}
    assert report.results[1].params_mutated == report.results[1].params_with_grad == 3


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(("dtype", "state_bytes"), [("float64", 16), ("bfloat16", 4)])
def test_other_dtypes(dtype, state_bytes):
    report = probe("small", ["adamw", "sf-ref", "sf-adamw", _mutator("ScaleGrads")], dtype=dtype)
    assert verdicts(report) == {
        "adamw": "clean",
        "sf-ref": "clean",
        "sf-adamw": "mutated",
        "ScaleGrads": "mutated",
    }
    assert report.config["dtype"] == dtype
    # AdamW keeps two moments per element in the parameters' dtype: the model ran in it.
    assert round(report.results[0].state_bytes_per_element) == state_bytes
    assert report.results[3].norm_ratio == pytest.approx(0.5)
    for result in report.results:
        assert all(math.isfinite(s.pre_step_grad_norm) for s in result.steps)


# --------------------------------------------------------------------------- hostile optimizers


def test_an_optimizer_that_skips_optimizer_init_is_audited_around_step():
    # timm's Lookahead never calls Optimizer.__init__: no hook dicts, so no step hooks
    report = probe(
        "small",
        [
            {"name": "lookahead", "class": "mutators:NoSuperInit"},
            {"name": "lookahead-adam", "class": "mutators:NoSuperInit", "kwargs": {"base": "adam"}},
            {"name": "inherited", "class": "mutators:NoSuperInitInheritedZeroGrad"},
        ],
    )
    lookahead, adam, inherited = report.results
    assert (lookahead.verdict, lookahead.error, len(lookahead.steps)) == ("clean", None, 3)
    assert (adam.verdict, adam.params_mutated) == ("mutated", 4)  # its base divides p.grad
    assert inherited.steps == lookahead.steps  # the same steps, grads zeroed by sfdiag
    # torch's zero_grad was not called on it: that would have wrapped its step() for good
    assert not getattr(mutators.NoSuperInitInheritedZeroGrad.step, "hooked", False)


def test_an_optimizer_without_zero_grad_is_probed_with_grads_zeroed_by_sfdiag():
    report = probe(
        "small",
        [
            {"name": "duck", "class": "mutators:DuckTyped"},  # zeroes its own grads
            {"name": "step-only", "class": "mutators:StepOnly"},
            {"name": "step-only-scaling", "class": "mutators:StepOnly", "kwargs": {"scale": 0.5}},
        ],
    )
    duck, step_only, scaling = report.results
    assert step_only.verdict == "clean" and step_only.error is None
    assert step_only.steps == duck.steps  # grads did not pile up from step to step
    assert (scaling.verdict, scaling.fingerprint) == ("mutated", "scaled")


@pytest.mark.parametrize(
    "eps", [None, (None, 1e-3), (1e-30, 1e-3), (), "auto", "1e-6", math.nan, -1.0, [2e-8]]
)
def test_odd_eps_values_read_as_a_number_or_the_default(eps):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param])
    optimizer.param_groups[0]["eps"] = eps
    expected = {(1e-30, 1e-3): 1e-30, "1e-6": 1e-6, (2e-8,): 2e-8}
    key = tuple(eps) if isinstance(eps, list) else eps
    assert audit._group_eps(optimizer, param) == expected.get(key, audit.DEFAULT_EPS)


def test_an_optimizer_with_a_tuple_eps_holding_none_is_fingerprinted():
    # eps=(None, 1e-3) once crashed sfdiag's own fit (float(None)) inside step()
    (result,) = probe("small", [{"name": "tuple-eps", "class": "mutators:TupleEps"}]).results
    assert (result.verdict, result.fingerprint, result.error) == (
        "mutated",
        "adam-normalized",
        None,
    )


# --------------------------------------------------------------------------- who failed

OPTIMIZER_COULD_NOT_RUN = "the optimizer could not run on this model"


@pytest.mark.parametrize(
    ("model", "optimizer", "error_starts", "advice_has"),
    [
        (
            "small",
            "FailsToConstruct",
            "the optimizer's constructor raised ValueError: needs a closure-capable model",
            "could not be built",
        ),
        (
            "small",
            "FailsToStep",
            "the optimizer's step() raised RuntimeError: this optimizer cannot step",
            "the optimizer failed while stepping",
        ),
        (
            "broken_in_training_model",
            "Clean",
            "the model's forward raised ValueError: this model's training forward is broken",
            "the model or the loss failed, not the optimizer",
        ),
        (
            "all_frozen_model",
            "Clean",
            "backward() through the model and loss raised RuntimeError",
            "the model or the loss failed, not the optimizer",
        ),
    ],
    ids=["construct", "step", "forward", "backward"],
)
def test_error_rows_say_who_failed(model, optimizer, error_starts, advice_has):
    report = probe(model, [_mutator(optimizer), "adamw"])
    row = report.results[0]
    assert row.verdict == "error"
    assert row.error.startswith(error_starts), row.error
    assert advice_has in row.advice and OPTIMIZER_COULD_NOT_RUN not in row.advice
    if model == "small":  # the optimizer's own failure: the others still run
        assert report.results[1].verdict == "clean"


def test_a_loss_that_returns_a_non_scalar_is_the_losss_error():
    report = probe("small", ["adamw", "sf-adamw"], loss="hostile_models:per_sample_loss")
    for row in report.results:
        assert row.verdict == "error"
        assert row.error.startswith("the loss returned a non-scalar (a tensor of shape (8,))")
        assert "the model or the loss failed, not the optimizer" in row.advice
    sentence = render(report, "table", RenderOptions()).splitlines()
    assert any(
        line.startswith("adamw: could not be probed: the loss returned") for line in sentence
    )


@pytest.mark.parametrize(
    "optimizer",
    [
        _mutator("ScaleGrads"),
        {"name": "StepOnly", "class": "mutators:StepOnly", "kwargs": {"scale": 0.5}},
    ],
    ids=["hooked", "around-step"],
)
def test_sfdiag_own_failure_is_worded_as_sfdiags(monkeypatch, optimizer):
    def broken_fit(*args, **kwargs):  # stands for a bug in sfdiag's own fits
        raise ZeroDivisionError("a bug in the fits")

    monkeypatch.setattr("sfdiag.step_audit.verdict.fingerprint", broken_fit)  # one grad's fits
    monkeypatch.setattr("sfdiag.step_audit.verdict.fingerprint_rows", broken_fit)  # many grads'
    report = probe("small", [optimizer, "adamw"])  # adamw never reaches the fits
    row, clean = report.results
    assert row.verdict == "error"
    assert row.error == "sfdiag could not audit it: ZeroDivisionError: a bug in the fits"
    assert "sfdiag's failure" in row.advice and "please report" in row.advice
    assert clean.verdict == "clean"


# --------------------------------------------------------------------------- lazy layers


def test_a_lazy_first_layer_asks_for_sfdiag_input_shape():
    with pytest.raises(SfdiagError) as caught:
        probe("lazy_first_model", ["adamw"])
    message = str(caught.value)
    assert "cannot infer the input shape" in message and "(LazyLinear) is lazy" in message
    assert "sfdiag_input_shape" in message
    declared = {"name": "hostile_models:lazy_first_model", "kwargs": {"declare": True}}
    assert verdicts(probe(declared, ["adamw", "sf-adamw"])) == {
        "adamw": "clean",
        "sf-adamw": "mutated",
    }


def test_a_lazy_last_layer_after_a_convolution_needs_nothing_given():
    assert verdicts(probe("lazy_last_model", ["adamw", "sf-adamw"])) == {
        "adamw": "clean",
        "sf-adamw": "mutated",
    }


# --------------------------------------------------------------------------- through the CLI


def test_cli_table_shows_nan_and_strict_flags_the_mutator(sfdiag_cli, tmp_path):
    (tmp_path / "c.yaml").write_text(
        "steps: 2\nmodel: {name: 'hostile_models:nan_grad_model'}\n"
        "optimizers: [adamw, {name: scale, class: 'mutators:ScaleGrads'}]\n",
        encoding="utf-8",
    )
    result = sfdiag_cli("probe", "c.yaml", "--strict")
    assert result.returncode == 1, result.stderr  # --strict: ScaleGrads is flagged
    assert "Traceback" not in result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "nan" in lines["adamw"] and lines["adamw"].rstrip().endswith("clean")
    assert "mutated" in lines["scale"]


def test_cli_json_of_nan_and_sparse_is_valid_json(sfdiag_cli, tmp_path):
    (tmp_path / "c.yaml").write_text(
        "steps: 2\nmodel: {name: 'hostile_models:sparse_bag'}\n"
        "optimizers: [{name: sa, class: 'torch.optim:SparseAdam'}, adamw]\n",
        encoding="utf-8",
    )
    (tmp_path / "n.yaml").write_text(
        "steps: 2\nmodel: {name: 'hostile_models:nan_model'}\noptimizers: [sf-ref]\n",
        encoding="utf-8",
    )
    sparse = sfdiag_cli("probe", "c.yaml", "--format", "json", "--output", "sparse.json")
    assert sparse.returncode == 0, sparse.stderr
    data = strict_json((tmp_path / "sparse.json").read_text(encoding="utf-8"))
    assert [r["verdict"] for r in data["results"]] == ["clean", "error"]
    nan = sfdiag_cli("probe", "n.yaml", "--format", "json")
    assert nan.returncode == 0, nan.stderr
    (row,) = strict_json(nan.stdout)["results"]
    assert row["verdict"] == "clean" and row["pre_step_grad_norm"] == "nan"
    assert row["undetermined"] is True
    assert [r["undetermined"] for r in data["results"]] == [False, False]


def test_cli_error_rows_say_who_failed(sfdiag_cli, tmp_path):
    (tmp_path / "c.yaml").write_text(
        "steps: 2\nmodel: {name: 'hostile_models:small'}\n"
        "loss: 'hostile_models:per_sample_loss'\noptimizers: [adamw]\n",
        encoding="utf-8",
    )
    result = sfdiag_cli("probe", "c.yaml")
    assert result.returncode == 0, result.stderr  # an error row, not a crash
    assert "Traceback" not in result.stderr
    assert "adamw: could not be probed: the loss returned a non-scalar" in result.stdout
    assert OPTIMIZER_COULD_NOT_RUN not in result.stdout.lower()
