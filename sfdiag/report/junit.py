"""``--format junit``: JUnit XML, one test case per optimizer, for CI test-report viewers.

A flagged optimizer is a ``<failure>`` (type = its verdict), an error row an
``<error>``; the norms ride along as ``<properties>`` and, step by step, in
``<system-out>``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sfdiag.report import _text

if TYPE_CHECKING:  # pragma: no cover
    from xml.etree.ElementTree import Element

    from sfdiag.report._options import RenderOptions
    from sfdiag.results import CheckResult, OptimizerResult, ProbeReport

SUITE = "sfdiag"

# Characters XML 1.0 cannot hold at all (ANSI escapes in an error message, say).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: Any) -> str:
    return _NOT_XML.sub("\ufffd", str(text))


def _el(parent: Element | None, tag: str, text: str | None = None, **attrs: Any) -> Element:
    from xml.etree.ElementTree import Element, SubElement

    clean = {k: _clean(v) for k, v in attrs.items() if v is not None}
    node = Element(tag, clean) if parent is None else SubElement(parent, tag, clean)
    if text is not None:
        node.text = _clean(text)
    return node


def _properties(parent: Element, values: dict[str, Any]) -> None:
    props = _el(parent, "properties")
    for name, value in values.items():
        _el(props, "property", name=name, value=value)


def _classname(cls: str) -> str:
    return f"{SUITE}.{_text.short_class(cls)}"


def _serialize(root: Element) -> str:
    from xml.etree.ElementTree import indent, tostring

    indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + tostring(root, encoding="unicode") + "\n"


def _suites(tests: int, failures: int, errors: int) -> tuple[Element, Element]:
    counts = {"tests": tests, "failures": failures, "errors": errors}
    root = _el(None, "testsuites", name=SUITE, **counts)
    suite = _el(root, "testsuite", name=SUITE, skipped=0, **counts)
    return root, suite


def _steps_text(result: OptimizerResult) -> str:
    lines = [
        f"{result.optimizer} ({result.cls}): {_text.verdict_text(result)}",
        f"pre-step grad norm (median): {_text.fmt_num(result.pre_step_grad_norm)}",
        f"post-step grad norm (median): {_text.fmt_num(result.post_step_grad_norm)}",
        f"ratio: {_text.fmt_ratio(result.norm_ratio)}",
        f"params mutated: {_text.fmt_mutated(result)}",
    ]
    if result.steps:
        lines.append("step  loss  pre-step  post-step  ratio  mutated")
        lines.extend(
            f"{s.step}  {_text.fmt_num(s.loss)}  {_text.fmt_num(s.pre_step_grad_norm)}  "
            f"{_text.fmt_num(s.post_step_grad_norm)}  {_text.fmt_ratio(s.ratio)}  "
            f"{s.params_mutated}"
            for s in result.steps
        )
    return "\n".join(lines) + "\n"


def render_report(report: ProbeReport, options: RenderOptions) -> str:
    results = report.results
    errors = sum(r.verdict == "error" for r in results)
    failures = sum(r.flagged for r in results) - errors
    root, suite = _suites(len(results), failures, errors)
    suite_props = {
        "sfdiag_version": report.sfdiag_version,
        "torch_version": report.torch_version,
    }
    if report.interrupted:
        suite_props["interrupted"] = "true"
    _properties(suite, suite_props)
    for r in results:
        case = _el(suite, "testcase", classname=_classname(r.cls), name=r.optimizer, time=0)
        _properties(
            case,
            {
                "class": r.cls,
                "verdict": r.verdict,
                "fingerprint": r.fingerprint or "",
                "pre_step_grad_norm": _text.fmt_num(r.pre_step_grad_norm),
                "post_step_grad_norm": _text.fmt_num(r.post_step_grad_norm),
                "norm_ratio": _text.fmt_num(r.norm_ratio),
                "params_mutated": r.params_mutated,
                "params_with_grad": r.params_with_grad,
                "state_bytes_per_element": _text.fmt_num(r.state_bytes_per_element),
            },
        )
        details = _steps_text(r)
        if r.verdict == "error":
            _el(case, "error", details, message=_text.advice_sentence(r), type="error")
        elif r.flagged:
            _el(case, "failure", details, message=_text.advice_sentence(r), type=r.verdict)
        else:
            _el(case, "system-out", details)
    if report.interrupted:
        _el(suite, "system-err", _text.interrupted_line(report))
    return _serialize(root)


def render_check(check: CheckResult, options: RenderOptions) -> str:
    # One case for run-wide differences (config, versions), then one per optimizer.
    groups: dict[str | None, list] = {None: []}
    for name in check.optimizers:
        groups.setdefault(name, [])
    for d in check.differences:
        groups.setdefault(d.optimizer, []).append(d)
    failing = sum(any(d.regression for d in diffs) for diffs in groups.values())
    root, suite = _suites(len(groups), failing, 0)
    if check.baseline_path:
        _properties(suite, {"baseline": str(check.baseline_path)})
    for name, diffs in groups.items():
        label = name if name is not None else "config"
        case = _el(suite, "testcase", classname=f"{SUITE}.check", name=label, time=0)
        lines = [
            f"{d.what}: {_text.fmt_value(d.baseline_value)} -> {_text.fmt_value(d.current_value)}"
            f" (change {_text.fmt_change(d.change)}, allowed {_text.fmt_allowed(d)}):"
            f" {_text.difference_status(d)}"
            for d in diffs
        ]
        regressions = [d for d in diffs if d.regression]
        if regressions:
            message = "; ".join(d.what for d in regressions)
            _el(case, "failure", "\n".join(lines) + "\n", message=message, type="regression")
        elif lines:
            _el(case, "system-out", "\n".join(lines) + "\n")
    return _serialize(root)
