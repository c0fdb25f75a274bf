"""Every advice sentence the table prints ends in the docs anchor of the kind it explains.

``sfdiag compare``/``probe``/``run`` print, under their tables, one sentence per flagged
optimizer, wrong logged metric and schedule-free finding; each ends in
``[docs: verdicts#<kind>]``, an anchor that ``docs/verdicts.md`` has. The anchor is added
where the sentence is rendered: the ``advice`` of the records (the JSON report) stays bare.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
from pathlib import Path

import pytest

from sfdiag import results as records
from sfdiag.report import render
from sfdiag.report._options import RenderOptions
from sfdiag.report._text import docs_anchor
from sfdiag.results import (
    FINDING_KINDS,
    FINGERPRINTS,
    METRIC_VERDICTS,
    VERDICTS,
    Finding,
    MetricResult,
    NotAudited,
    OptimizerResult,
    ProbeReport,
    StepRecord,
)

VERDICTS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "verdicts.md"
_ANCHORED_HEADING = re.compile(r"^#{1,6} [^\n]*\{#([A-Za-z0-9_.:-]+)\}[ \t]*$", re.MULTILINE)
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_DOCS = re.compile(r" \[docs: verdicts#([A-Za-z0-9_.:-]+)\]$")
WIDE = RenderOptions(width=200)


def _anchors() -> set[str]:
    text = VERDICTS_PAGE.read_text(encoding="utf-8")
    return set(_ANCHORED_HEADING.findall(_FENCED.sub("", text)))


def _returned_fingerprints() -> set[str]:
    """Every name ``sfdiag.step_audit.verdict`` can give a mutated grad: what its
    ``fingerprint`` and ``fingerprint_rows`` return or assign, and its advice table's keys."""
    from sfdiag.step_audit import verdict

    names = set(verdict._ADVICE)
    for function in (verdict.fingerprint, verdict.fingerprint_rows):
        for node in ast.walk(ast.parse(inspect.getsource(function))):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                names.add(node.value.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "name":
                names.add(node.args[1].value)  # name(rows, "scaled")
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if isinstance(node.value.value, str) and node.value.value:
                    names.add(node.value.value)  # kinds[open_] = "unknown"
    return names


def test_fingerprints_lists_every_kind_the_audit_can_name():
    assert set(FINGERPRINTS) == _returned_fingerprints()
    assert len(FINGERPRINTS) == len(set(FINGERPRINTS))


@pytest.mark.parametrize(
    "family", [VERDICTS, FINGERPRINTS, METRIC_VERDICTS, FINDING_KINDS], ids=lambda f: f[0]
)
def test_every_kind_has_an_anchor(family):
    missing = sorted(set(family) - _anchors())
    assert not missing, f"docs/verdicts.md has no {{#kind}} heading for {missing}"


def test_the_anchor_of_a_kind_is_its_name_as_printed():
    assert docs_anchor("post-step") == "[docs: verdicts#post-step]"
    assert docs_anchor("not audited") == "[docs: verdicts#not-audited]"
    for kind in ("not audited", "undetermined"):
        assert _DOCS.search(" " + docs_anchor(kind)).group(1) in _anchors()


# ---- a report with every kind of sentence ------------------------------------------------


def _row(label: str, verdict: str, fingerprint: str | None = None, **kw) -> OptimizerResult:
    from sfdiag.step_audit.verdict import advice

    steps = (StepRecord(0, 1.0, 2.0, 8.0 if verdict != "clean" else 2.0, 1),)
    base = dict(
        optimizer=label,
        cls="torch.optim:AdamW",
        verdict=verdict,
        pre_step_grad_norm=2.0,
        post_step_grad_norm=8.0,
        norm_ratio=4.0,
        params_mutated=1,
        params_with_grad=2,
        fingerprint=fingerprint,
        advice=advice(verdict, fingerprint, "torch.optim:AdamW"),
        steps=steps,
    )
    base.update(kw)
    return OptimizerResult(**base)


def _optimizer_rows() -> dict[str, tuple[OptimizerResult, str | None]]:
    """label -> (row, the kind its sentence must point at; None: no sentence)."""
    rows: dict[str, tuple[OptimizerResult, str | None]] = {}
    for fp in FINGERPRINTS:
        rows[f"fp-{fp}"] = (_row(f"fp-{fp}", "mutated", fp), fp)
    rows["mutated-bare"] = (_row("mutated-bare", "mutated", None), "mutated")
    for verdict in ("replaced", "cleared"):
        rows[verdict] = (_row(verdict, verdict), verdict)
    rows["broken"] = (_row("broken", "error", error="TypeError: nope", steps=()), "error")
    rows["fine"] = (_row("fine", "clean", post_step_grad_norm=2.0, norm_ratio=1.0), None)
    rows["nan"] = (
        _row("nan", "clean", undetermined=True, advice="probe it where the grads are finite"),
        "undetermined",
    )
    return rows


def _metric(verdict: str, quantity: str = "grad_norm") -> MetricResult:
    return MetricResult(
        name=f"train/{verdict}",
        quantity=quantity,
        logger="tensorboard",
        optimizer="AdamW",
        steps_judged=3,
        verdict=verdict,
        matches=None,
        logged_median=1.0,
        true_median=2.0,
        ratio=0.5,
        advice=None if verdict == "correct" else f"train/{verdict} is off: log it elsewhere",
    )


def _metrics() -> tuple[MetricResult, ...]:
    rates = {"base-lr", "next-step", "other-group"}
    return tuple(
        _metric(v, "learning_rate" if v in rates else "grad_norm") for v in METRIC_VERDICTS
    )


def _findings() -> tuple[Finding, ...]:
    return tuple(
        Finding(kind, "AdamWScheduleFree", 3, 2, f"the fix for {kind}", gap=0.5)
        for kind in FINDING_KINDS
    )


@pytest.fixture(scope="module")
def run_report() -> tuple[ProbeReport, dict[str, tuple[OptimizerResult, str | None]]]:
    rows = _optimizer_rows()
    unseen = OptimizerResult(
        "compiled", "torch.optim:AdamW", "clean", not_audited=NotAudited("torch.compile", 5, 5)
    )
    report = ProbeReport(
        config={"command": ["python", "train.py"]},
        results=(*(row for row, _ in rows.values()), unseen),
        sfdiag_version="0",
        torch_version="0",
        metrics=_metrics(),
        findings=_findings(),
    )
    return report, rows


def _line(out: str, start: str) -> str:
    found = [line for line in out.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, out)
    return found[0]


def _anchor_of(line: str) -> str:
    match = _DOCS.search(line)
    assert match, f"no [docs: verdicts#kind] at the end of: {line!r}"
    assert match.group(1) in _anchors(), f"docs/verdicts.md has no anchor #{match.group(1)}"
    return match.group(1)


def test_each_optimizer_sentence_points_at_its_fingerprint_or_verdict(run_report):
    report, rows = run_report
    out = render(report, "table", WIDE)
    for label, (_, kind) in rows.items():
        if kind is None:
            assert not any(line.startswith(f"{label}:") for line in out.splitlines())
            assert "verdicts#clean" not in out
            continue
        assert _anchor_of(_line(out, f"{label}: ")) == kind, label
    assert _anchor_of(_line(out, "compiled: ")) == "not-audited"


def test_each_metric_and_finding_sentence_points_at_its_kind(run_report):
    report, _ = run_report
    out = render(report, "table", WIDE)
    for metric in report.metrics:
        start = f"{metric.verdict} ({metric.logger}): "
        if metric.verdict == "correct":
            assert not any(line.startswith(start) for line in out.splitlines())
        else:
            assert _anchor_of(_line(out, start)) == metric.verdict
    assert "verdicts#base-lr" in out  # a learning rate's verdict is one of the same list
    for finding in report.findings:
        level = "" if finding.failing else "warning: "
        assert _anchor_of(_line(out, f"{level}{finding.kind}: ")) == finding.kind


def test_every_anchor_printed_exists_and_ends_its_line(run_report):
    report, _ = run_report
    for fmt in ("table", "markdown"):
        out = render(report, fmt, WIDE)
        printed = re.findall(r"\[docs: verdicts#([^\]]*)\]", out)
        assert printed, fmt
        assert set(printed) <= _anchors(), fmt
        for line in out.splitlines():
            if "[docs: " in line:
                _anchor_of(line)


def test_markdown_bullets_end_in_the_same_anchors(run_report):
    report, rows = run_report
    out = render(report, "markdown", WIDE)
    bullets = [line for line in out.splitlines() if line.startswith("- ")]
    expected = {f"{label}:": kind for label, (_, kind) in rows.items() if kind}
    expected["compiled:"] = "not-audited"
    for bullet in bullets:
        label = bullet[2:].split(" ", 1)[0]
        assert _anchor_of(bullet) == expected.pop(label), bullet
    assert not expected, f"no bullet for {sorted(expected)}"


def test_the_json_advice_stays_as_the_records_hold_it(run_report):
    report, _ = run_report
    out = render(report, "json")
    assert "[docs:" not in out and "verdicts#" not in out
    data = json.loads(out)
    assert [r["advice"] for r in data["results"]] == [r.advice for r in report.results]
    assert [m["advice"] for m in data["metrics"]] == [m.advice for m in report.metrics]
    assert [f["advice"] for f in data["findings"]] == [f.advice for f in report.findings]
    for fmt in ("csv", "junit"):
        assert "[docs:" not in render(report, fmt)


def test_a_real_compare_points_at_adam_normalized():
    import sfdiag

    report = sfdiag.run_probe({"steps": 2, "optimizers": ["adamw", "sf-adamw"]})
    clean, mutated = report.results
    assert (clean.verdict, mutated.verdict, mutated.fingerprint) == (
        "clean",
        "mutated",
        "adam-normalized",
    )
    out = render(report, "table", WIDE)
    assert _anchor_of(_line(out, "sf-adamw: ")) == "adam-normalized"
    assert not any(line.startswith("adamw:") for line in out.splitlines())
    assert out.count("[docs: ") == 1
    assert "[docs:" not in (mutated.advice or "")
    assert math.isfinite(mutated.norm_ratio)


def test_the_metric_table_names_its_quantity_column(run_report):
    report, _ = run_report
    out = render(report, "table", WIDE)
    header = next(line for line in out.splitlines() if "logged metric" in line)
    assert "quantity" in header.split()
    assert " is " not in f" {header} "
    rows = [line for line in out.splitlines() if line.lstrip().startswith("train/")]
    assert any("‖g‖" in row for row in rows) and any(" lr " in row for row in rows)


def test_the_records_module_exports_the_kinds():
    for name in ("VERDICTS", "FINGERPRINTS", "METRIC_VERDICTS", "FINDING_KINDS"):
        kinds = getattr(records, name)
        assert isinstance(kinds, tuple) and kinds and all(isinstance(k, str) for k in kinds)
