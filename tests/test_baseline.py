"""Baselines (save / load / compare / render) and the atomic file writer. No torch."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sfdiag.baseline import (
    BASELINE_FORMAT,
    Baseline,
    CheckResult,
    compare,
    load_baseline,
    render_check,
    save_baseline,
)
from sfdiag.errors import SfdiagError
from sfdiag.fileio import check_writable, write_atomic
from sfdiag.report import RenderOptions
from sfdiag.results import OptimizerResult, ProbeReport, StepRecord

ANSI = re.compile(r"\x1b\[")
REPO = Path(__file__).resolve().parents[1]


def _steps(pre, post, mutated=0):
    return tuple(
        StepRecord(i, 1.0, a, b, mutated) for i, (a, b) in enumerate(zip(pre, post, strict=True))
    )


def make_report() -> ProbeReport:
    return ProbeReport(
        config={"seed": 0, "steps": 3, "model": {"name": "mlp"}, "optimizers": [{"name": "x"}]},
        results=(
            OptimizerResult(
                "fused",
                "sfdiag.optim:AdamWScheduleFree",
                "mutated",
                pre_step_grad_norm=0.9,
                post_step_grad_norm=800.0,
                norm_ratio=888.9,
                params_mutated=4,
                params_with_grad=4,
                fingerprint="adam-normalized",
                advice="log before step()",
                steps=_steps([1.0, 0.9, 0.8], [1000.0, 800.0, 700.0], 4),
            ),
            OptimizerResult(
                "adamw",
                "torch.optim:AdamW",
                "clean",
                pre_step_grad_norm=0.9,
                post_step_grad_norm=0.9,
                norm_ratio=1.0,
                params_with_grad=4,
                steps=_steps([1.0, 0.9, 0.8], [1.0, 0.9, 0.8]),
            ),
            OptimizerResult(  # NaN norms must compare equal to themselves
                "diverged",
                "sfdiag.optim:SGDScheduleFree",
                "mutated",
                pre_step_grad_norm=math.nan,
                post_step_grad_norm=math.nan,
                norm_ratio=math.nan,
                fingerprint="weight-decay-folded",
                steps=_steps([1.0, math.nan, math.inf], [2.0, math.nan, math.inf]),
            ),
            OptimizerResult("broken", "mypkg:Broken", "error", error="TypeError: boom"),
        ),
        sfdiag_version="0.1.0",
        torch_version="2.13.0",
    )


@pytest.fixture
def report() -> ProbeReport:
    return make_report()


@pytest.fixture
def saved(report, tmp_path):
    path = tmp_path / "baseline.json"
    save_baseline(report, path)
    return path


def _replace_result(report: ProbeReport, name: str, **changes) -> ProbeReport:
    results = tuple(
        dataclasses.replace(r, **changes) if r.optimizer == name else r for r in report.results
    )
    return dataclasses.replace(report, results=results)


def _scale_norms(report, name, *, post=1.0, pre=1.0, step=None) -> ProbeReport:
    result = next(r for r in report.results if r.optimizer == name)
    steps = tuple(
        dataclasses.replace(
            s,
            pre_step_grad_norm=s.pre_step_grad_norm * (pre if step in (None, s.step) else 1),
            post_step_grad_norm=s.post_step_grad_norm * (post if step in (None, s.step) else 1),
        )
        for s in result.steps
    )
    return _replace_result(report, name, steps=steps)


def _kinds(check: CheckResult) -> list[tuple[str | None, str]]:
    return [(d.optimizer, d.kind) for d in check.regressions]


# -- save / load ---------------------------------------------------------------------


def test_round_trip(report, saved):
    loaded = load_baseline(saved)
    assert loaded.path == str(saved)
    assert dataclasses.replace(loaded, path=None) == dataclasses.replace(
        Baseline.from_report(report), results=loaded.results
    )
    assert [r.optimizer for r in loaded.results] == ["fused", "adamw", "diverged", "broken"]
    fused = loaded.results[0]
    assert fused.post_step_grad_norms == (1000.0, 800.0, 700.0)
    assert fused.fingerprint == "adam-normalized"
    assert math.isnan(loaded.results[2].pre_step_grad_norms[1])
    assert loaded.results[2].post_step_grad_norms[2] == math.inf
    assert loaded.results[3].error == "TypeError: boom"


def test_file_is_deterministic_strict_json(report, saved, tmp_path):
    text = saved.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in baseline"))
    assert data["sfdiag_baseline"] == BASELINE_FORMAT
    assert set(data) == {"sfdiag_baseline", "sfdiag_version", "torch_version", "config", "results"}
    assert data["config"] == report.config
    again = tmp_path / "again.json"
    save_baseline(report, again)
    assert again.read_bytes() == saved.read_bytes()


def test_interrupted_report_is_not_saved(report, tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(SfdiagError, match="interrupted"):
        save_baseline(dataclasses.replace(report, interrupted=True), path)
    assert not path.exists()


def test_refuses_to_overwrite_without_force(report, saved):
    before = saved.read_bytes()
    changed = _replace_result(report, "adamw", verdict="mutated")
    with pytest.raises(SfdiagError, match="--force") as info:
        save_baseline(changed, saved)
    assert str(saved) in str(info.value)
    assert saved.read_bytes() == before
    save_baseline(changed, saved, force=True)
    assert load_baseline(saved).results[1].verdict == "mutated"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(SfdiagError, match=re.escape(str(path))) as info:
        load_baseline(path)
    assert "does not exist" in str(info.value)


def _load_error(tmp_path, content: str | bytes) -> str:
    path = tmp_path / "b.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(SfdiagError) as info:
        load_baseline(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_corrupt_json(tmp_path):
    assert "not valid JSON" in _load_error(tmp_path, '{"sfdiag_baseline": 1, "results": [')


def test_binary_garbage(tmp_path):
    assert "UTF-8" in _load_error(tmp_path, b"\x89PNG\r\n\x1a\n\xff\xfe")


def test_foreign_json(tmp_path):
    assert "not an sfdiag baseline" in _load_error(tmp_path, '{"name": "package.json"}')
    assert "not an sfdiag baseline" in _load_error(tmp_path, "[1, 2, 3]")


def test_json_report_is_not_a_baseline_but_the_message_says_what_to_do(report, tmp_path):
    from sfdiag.report import render

    message = _load_error(tmp_path, render(report, "json"))
    assert "--format json" in message and "sfdiag baseline" in message


def test_future_format_version(saved, tmp_path):
    data = json.loads(saved.read_text())
    data["sfdiag_baseline"] = BASELINE_FORMAT + 1
    message = _load_error(tmp_path, json.dumps(data))
    assert "newer" in message and "upgrade" in message


@pytest.mark.parametrize("version", [0, "1", True, None, 1.5])
def test_unknown_format_version(saved, tmp_path, version):
    data = json.loads(saved.read_text())
    data["sfdiag_baseline"] = version
    assert "format" in _load_error(tmp_path, json.dumps(data))


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d.pop("config"), "'config'"),
        (lambda d: d.pop("torch_version"), "'torch_version'"),
        (lambda d: d["results"][1].pop("verdict"), "'results[1].verdict'"),
        (lambda d: d["results"][0].pop("post_step_grad_norms"), "post_step_grad_norms"),
        (lambda d: d["results"][0].update(pre_step_grad_norms=[1, "x", 2]), "[1]"),
        (lambda d: d["results"][0].update(optimizer=3), "'results[0].optimizer'"),
        (lambda d: d["results"][0].update(pre_step_grad_norms=[1.0]), "length"),
        (lambda d: d["results"].append(dict(d["results"][0])), "twice"),
        (lambda d: d.update(results={}), "'results'"),
    ],
)
def test_missing_or_bad_fields(saved, tmp_path, mutate, words):
    data = json.loads(saved.read_text())
    mutate(data)
    assert words in _load_error(tmp_path, json.dumps(data))


def _with(saved, change) -> str:
    data = json.loads(saved.read_text())
    change(data)
    return json.dumps(data)


def _nest(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"a": value}
    return value


HOSTILE = [
    # (id, the file's text from the good one's, words the message must hold)
    ("nested-arrays", lambda saved: "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("nested-objects", lambda saved: '{"a":' * 100_000 + "1" + "}" * 100_000, ["too deeply"]),
    (
        "nested-config",
        lambda saved: _with(saved, lambda d: d["config"].update(model=_nest(100))),
        ["nested more than 64 levels deep", "config.model.a.a"],
    ),
    (
        "400-digit-norm",
        lambda saved: _with(
            saved, lambda d: d["results"][0]["pre_step_grad_norms"].insert(0, 10**400)
        ),
        ["results[0].pre_step_grad_norms[0]", "too large", "about 401 digits"],
    ),
    (
        "negative-400-digit-median",
        lambda saved: _with(saved, lambda d: d["results"][1].update(norm_ratio=-(10**400))),
        ["results[1].norm_ratio", "too large"],
    ),
    (
        "integer-just-beyond-a-float",
        lambda saved: _with(saved, lambda d: d["results"][1].update(norm_ratio=2**1024 - 1)),
        ["'results[1].norm_ratio' is a number too large"],
    ),
    (
        "5000-digit-integer",
        lambda saved: saved.read_text().replace('"steps": 3', '"steps": 1' + "0" * 5000),
        ["integer too long to read"],
    ),
    (
        "400-digit-format-version",
        lambda saved: _with(saved, lambda d: d.update(sfdiag_baseline=10**400)),
        ["field 'sfdiag_baseline' holds a number too large"],
    ),
    (
        "300-digit-format-version",
        lambda saved: _with(saved, lambda d: d.update(sfdiag_baseline=10**300)),
        ["baseline format <an integer of about 301 digits> is newer"],
    ),
    (
        "negative-300-digit-format-version",
        lambda saved: _with(saved, lambda d: d.update(sfdiag_baseline=-(10**300))),
        ["unknown baseline format -<an integer of about 301 digits>"],
    ),
    (
        "lone-surrogate-in-a-name",
        lambda saved: _with(saved, lambda d: d["results"][1].update(optimizer="ad\ud800mw")),
        ["field 'results[1].optimizer' is not valid Unicode"],
    ),
    (
        "lone-surrogate-in-a-key",
        lambda saved: _with(saved, lambda d: d["config"].update({"\udfff": 1})),
        ["a key in 'config' is not valid Unicode"],
    ),
    (
        "duplicate-key",
        lambda saved: saved.read_text().replace('"steps": 3', '"steps": 3, "steps": 4'),
        ["key 'steps' appears twice"],
    ),
    (
        "long-string-norm",
        lambda saved: _with(saved, lambda d: d["results"][0].update(norm_ratio="x" * 100_000)),
        ["results[0].norm_ratio", "should be a number"],
    ),
]


@pytest.mark.parametrize(("make", "words"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_baselines_are_input_errors_naming_the_file(saved, tmp_path, make, words):
    message = _load_error(tmp_path, make(saved))
    assert "\n" not in message and len(message) < len(str(tmp_path)) + 300, message[:500]
    for word in words:
        assert word in message, (word, message)


def test_a_file_larger_than_any_baseline_is_refused_unread(saved, tmp_path, monkeypatch):
    from sfdiag import baseline as module

    monkeypatch.setattr(module, "MAX_BASELINE_BYTES", 100)
    assert "larger than 100 bytes" in _load_error(tmp_path, saved.read_text())


# -- compare -------------------------------------------------------------------------


def test_identical_is_no_regression(report, saved):
    check = compare(load_baseline(saved), report)
    assert not check.regressed
    assert check.differences == []
    assert check.optimizers == ("fused", "adamw", "diverged", "broken")


def test_nan_equals_nan_but_not_a_number(report, saved):
    baseline = load_baseline(saved)
    assert not compare(baseline, report).regressed  # the 'diverged' row is all nan / inf
    steps = list(report.results[2].steps)
    steps[1] = dataclasses.replace(steps[1], post_step_grad_norm=3.0)
    check = compare(baseline, _replace_result(report, "diverged", steps=tuple(steps)))
    assert _kinds(check) == [("diverged", "post_step_grad_norm")]
    assert check.regressions[0].step == 1


def test_verdict_change(report, saved):
    check = compare(load_baseline(saved), _replace_result(report, "adamw", verdict="mutated"))
    assert check.regressed
    assert _kinds(check) == [("adamw", "verdict")]
    diff = check.regressions[0]
    assert (diff.baseline_value, diff.current_value) == ("clean", "mutated")


def test_class_change(report, saved):
    changed = _replace_result(report, "adamw", cls="torch.optim:Adam")
    assert _kinds(compare(load_baseline(saved), changed)) == [("adamw", "class")]


def test_fingerprint_change(report, saved):
    changed = _replace_result(report, "fused", fingerprint="sign")
    assert _kinds(compare(load_baseline(saved), changed)) == [("fused", "fingerprint")]


def test_norm_beyond_rtol_reports_the_worst_step(report, saved):
    changed = _scale_norms(report, "fused", post=1.01, step=2)
    changed = _scale_norms(changed, "fused", post=1.001, step=0)
    check = compare(load_baseline(saved), changed, rtol=1e-4)
    assert _kinds(check) == [("fused", "post_step_grad_norm")]
    diff = check.regressions[0]
    assert diff.step == 2
    assert diff.baseline_value == 700.0
    assert diff.current_value == pytest.approx(707.0)
    assert diff.change == pytest.approx(0.01)
    assert diff.allowed == 1e-4
    assert "step 2" in diff.what


def test_pre_step_norm_is_compared_too(report, saved):
    changed = _scale_norms(report, "adamw", pre=0.5, step=1)
    assert _kinds(compare(load_baseline(saved), changed)) == [("adamw", "pre_step_grad_norm")]


def test_norm_within_rtol_passes(report, saved):
    changed = _scale_norms(report, "fused", post=1 + 1e-6)
    check = compare(load_baseline(saved), changed, rtol=1e-4)
    assert not check.regressed
    [diff] = check.differences  # listed as moved, but within tolerance
    assert diff.kind == "post_step_grad_norm" and not diff.regression
    assert compare(load_baseline(saved), changed, rtol=1e-7).regressed
    doubled = _scale_norms(report, "fused", post=2)
    assert not compare(load_baseline(saved), doubled, rtol=1.5).regressed


def test_optimizer_added(report, saved):
    extra = dataclasses.replace(report.results[1], optimizer="adamw-2")
    changed = dataclasses.replace(report, results=(*report.results, extra))
    check = compare(load_baseline(saved), changed)
    assert _kinds(check) == [("adamw-2", "added")]
    assert check.optimizers[-1] == "adamw-2"


def test_optimizer_missing(report, saved):
    changed = dataclasses.replace(report, results=report.results[1:])
    check = compare(load_baseline(saved), changed)
    assert _kinds(check) == [("fused", "missing")]
    assert check.regressions[0].baseline_value == "sfdiag.optim:AdamWScheduleFree"


def test_config_mismatch_names_the_keys(report, saved):
    config = {**report.config, "seed": 1, "dtype": "float64"}
    config["model"] = {"name": "mnist-cnn"}
    check = compare(load_baseline(saved), dataclasses.replace(report, config=config))
    assert check.regressed
    config_diffs = [d.what for d in check.regressions if d.kind == "config"]
    assert config_diffs == ["config: seed", "config: model.name", "config: dtype"]


def test_config_mismatch_names_the_leaf_that_moved(report, saved):
    config = {**report.config, "optimizers": [{"name": "x", "kwargs": {"weight_decay": 0.02}}]}
    check = compare(load_baseline(saved), dataclasses.replace(report, config=config))
    (diff,) = [d for d in check.regressions if d.kind == "config"]
    assert diff.what == "config: optimizers[0].kwargs"
    assert (diff.baseline_value, diff.current_value) == (None, {"weight_decay": 0.02})


def _on(report, config_device, ran_on):
    return dataclasses.replace(
        report, config={**report.config, "device": config_device}, device=ran_on
    )


def _saved_on(report, tmp_path, config_device, ran_on, name="b.json"):
    path = tmp_path / name
    save_baseline(_on(report, config_device, ran_on), path)
    return load_baseline(path)


def test_the_device_it_ran_on_is_recorded(report, tmp_path):
    loaded = _saved_on(report, tmp_path, "auto", "cpu")
    assert loaded.device == "cpu" and loaded.ran_on == "cpu"
    assert json.loads((tmp_path / "b.json").read_text())["device"] == "cpu"
    unknown = _saved_on(report, tmp_path, "auto", None, "old.json")  # as older files are
    assert "device" not in json.loads((tmp_path / "old.json").read_text())
    assert unknown.device is None and unknown.ran_on is None


@pytest.mark.parametrize("recorded", ["cpu", None], ids=["recorded", "older-file"])
def test_device_auto_on_the_baselines_device_is_no_regression(report, tmp_path, recorded):
    baseline = _saved_on(report, tmp_path, "cpu", recorded)
    check = compare(baseline, _on(report, "auto", "cpu"))
    assert not check.regressed
    [diff] = check.differences
    assert (diff.kind, diff.baseline_value, diff.current_value) == ("config", "cpu", "auto")
    assert "both ran on cpu" in diff.what


def test_device_auto_on_another_device_is_a_regression(report, tmp_path):
    check = compare(_saved_on(report, tmp_path, "cpu", "cpu"), _on(report, "auto", "cuda"))
    assert _kinds(check) == [(None, "config")]
    assert check.regressions[0].what == "config: device"


def test_device_auto_that_moved_is_a_note(report, tmp_path):
    check = compare(_saved_on(report, tmp_path, "auto", "cuda"), _on(report, "auto", "cpu"))
    assert not check.regressed
    [diff] = check.differences
    assert (diff.kind, diff.baseline_value, diff.current_value) == ("device", "cuda", "cpu")


def test_config_with_tuples_and_non_finite_floats_round_trips(report, tmp_path):
    odd = dataclasses.replace(report, config={**report.config, "betas": (0.9, 0.99), "x": math.inf})
    path = tmp_path / "b.json"
    save_baseline(odd, path)
    assert not compare(load_baseline(path), odd).regressed


def test_steps_count_change(report, saved):
    fused = report.results[0]
    changed = _replace_result(report, "fused", steps=fused.steps[:2])
    check = compare(load_baseline(saved), changed)
    assert _kinds(check) == [("fused", "steps")]
    assert (check.regressions[0].baseline_value, check.regressions[0].current_value) == (3, 2)


def test_version_change_is_a_note_not_a_regression(report, saved):
    check = compare(load_baseline(saved), dataclasses.replace(report, torch_version="2.14.0"))
    assert not check.regressed
    assert [d.kind for d in check.differences] == ["version"]


@pytest.mark.parametrize("rtol", [-1e-3, math.nan, math.inf, "0.1", True])
def test_bad_rtol(report, saved, rtol):
    with pytest.raises(SfdiagError, match="--rtol"):
        compare(load_baseline(saved), report, rtol=rtol)


def test_rtol_zero_is_exact(report, saved):
    assert not compare(load_baseline(saved), report, rtol=0).regressed


# -- render_check --------------------------------------------------------------------


@pytest.fixture
def check(report, saved) -> CheckResult:
    changed = _replace_result(report, "adamw", verdict="mutated")
    changed = _scale_norms(changed, "fused", post=1.5, step=1)
    changed = _scale_norms(changed, "fused", pre=1 + 1e-7)
    return compare(load_baseline(saved), dataclasses.replace(changed, torch_version="2.14.0"))


def test_check_table(check):
    out = render_check(check, "table")
    assert not ANSI.search(out)
    assert "REGRESSION" in out and "2 regressions" in out.splitlines()[-1]
    assert "post-step grad norm" in out and "+50%" in out
    assert ANSI.search(render_check(check, "table", RenderOptions(color=True)))


def test_check_table_no_regression(report, saved):
    out = render_check(compare(load_baseline(saved), report), "table")
    assert out.splitlines()[-1] == "no regression"


def test_check_json(check):
    data = json.loads(render_check(check, "json"))
    assert data["schema_version"] == 1
    assert data["regressed"] is True
    kinds = [(d["optimizer"], d["kind"], d["regression"]) for d in data["differences"]]
    assert ("adamw", "verdict", True) in kinds
    assert ("fused", "post_step_grad_norm", True) in kinds
    assert ("fused", "pre_step_grad_norm", False) in kinds
    assert (None, "version", False) in kinds


def test_check_csv(check):
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(io.StringIO(render_check(check, "csv")))
    assert len(frame) == len(check.differences)
    assert frame["regression"].sum() == 2


def test_check_markdown(check):
    out = render_check(check, "markdown")
    assert out.startswith("### sfdiag check: 2 regressions")
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(check.differences)
    assert sum("**REGRESSION**" in row for row in rows) == 2


def test_check_junit(check):
    suite = ET.fromstring(render_check(check, "junit")).find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"config", "fused", "adamw", "diverged", "broken"}
    assert suite.get("failures") == "2"
    assert "verdict" in cases["adamw"].find("failure").get("message")
    assert cases["broken"].find("failure") is None


def test_check_unknown_format(check):
    with pytest.raises(SfdiagError, match="sarif"):
        render_check(check, "sarif")


# -- write_atomic / check_writable ---------------------------------------------------


def test_write_atomic_leaves_no_temp_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text("old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(SfdiagError, match="No space left") as info:
        write_atomic(path, "new", force=True)
    assert str(path) in str(info.value)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_atomic_cleans_up_on_keyboard_interrupt(tmp_path, monkeypatch):
    path = tmp_path / "out.json"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"data")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_missing_parent(tmp_path):
    path = tmp_path / "no" / "such" / "out.json"
    with pytest.raises(SfdiagError, match=re.escape(str(path))) as info:
        write_atomic(path, "x")
    assert "does not exist" in str(info.value)


def test_write_atomic_into_a_directory_path(tmp_path):
    with pytest.raises(SfdiagError, match="is a directory"):
        write_atomic(tmp_path, "x", force=True)


def test_write_atomic_text_and_bytes_and_mode(tmp_path):
    path = tmp_path / "out.txt"
    write_atomic(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    os.chmod(path, 0o600)
    write_atomic(path, b"\x00\x01", force=True)
    assert path.read_bytes() == b"\x00\x01"
    assert path.stat().st_mode & 0o777 == 0o600  # an overwritten file keeps its mode


def test_check_writable(tmp_path):
    existing = tmp_path / "there.json"
    existing.write_text("x")
    with pytest.raises(SfdiagError, match="--force"):
        check_writable(existing)
    assert check_writable(existing, force=True) == existing
    assert check_writable(tmp_path / "new.json") == tmp_path / "new.json"
    with pytest.raises(SfdiagError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.json")
    with pytest.raises(SfdiagError, match="not a directory"):
        check_writable(existing / "x.json")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere"
)
def test_check_writable_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SfdiagError, match="not writable"):
            check_writable(locked / "x.json")
        with pytest.raises(SfdiagError, match=re.escape(str(locked / "x.json"))):
            write_atomic(locked / "x.json", "x")
    finally:
        locked.chmod(0o700)


# -- module structure ----------------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_report_formats_do_not_import_baseline():
    """No import circle: the check result is a record like the others, in sfdiag.results."""
    for path in sorted((REPO / "sfdiag" / "report").glob("*.py")):
        assert "sfdiag.baseline" not in _imported_modules(path), path.name
    from sfdiag import baseline, results

    assert baseline.CheckResult is results.CheckResult  # the old import still works
    assert baseline.Difference is results.Difference
