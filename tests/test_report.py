"""Report formats: each parses with its standard parser and carries every optimizer.

Records are built by hand: no torch needed.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import xml.etree.ElementTree as ET

import pytest

from sfdiag.errors import SfdiagError
from sfdiag.report import FORMATS, RenderOptions, render
from sfdiag.report import _text as text
from sfdiag.results import OptimizerResult, ParamFinding, ProbeReport, StepRecord

ANSI = re.compile(r"\x1b\[")
LABELS = ("fused", "adamw", "sgd|wd", "broken")


def _steps(pre: list[float], post: list[float], mutated: int) -> tuple[StepRecord, ...]:
    return tuple(
        StepRecord(i, 2.3 - 0.1 * i, a, b, mutated)
        for i, (a, b) in enumerate(zip(pre, post, strict=True))
    )


def make_report(*, interrupted: bool = False) -> ProbeReport:
    flagged = OptimizerResult(
        optimizer="fused",
        cls="sfdiag.optim:AdamWScheduleFree",
        verdict="mutated",
        pre_step_grad_norm=0.81,
        post_step_grad_norm=702.4,
        norm_ratio=867.2,
        params_mutated=8,
        params_with_grad=8,
        fingerprint="adam-normalized",
        advice="log the grad norm before step(), or use sf-ref",
        state_bytes_per_element=8.0,
        steps=_steps([1.1, 0.9, 0.81, 0.7], [1003.0, 800.0, 702.4, 650.0], 8),
        params=(
            ParamFinding("net.0.weight", (64, 32), "mutated", 0.5, 400.0, 799.0, "adam-normalized"),
            ParamFinding("net.0.bias", (64,), "mutated", 0.1, 80.0, 799.0, "adam-normalized"),
        ),
    )
    clean = OptimizerResult(
        optimizer="adamw",
        cls="torch.optim:AdamW",
        verdict="clean",
        pre_step_grad_norm=0.8,
        post_step_grad_norm=0.8,
        norm_ratio=1.0,
        params_mutated=0,
        params_with_grad=8,
        state_bytes_per_element=8.0,
        steps=_steps([1.1, 0.9, 0.8, 0.7], [1.1, 0.9, 0.8, 0.7], 0),
        params=(ParamFinding("net.0.weight", (64, 32), "clean", 0.5, 0.5, None, None),),
    )
    nan_row = OptimizerResult(  # NaN norms, and a '|' in its label for markdown to escape
        optimizer="sgd|wd",
        cls="sfdiag.optim:SGDScheduleFree",
        verdict="mutated",
        pre_step_grad_norm=math.nan,
        post_step_grad_norm=math.nan,
        norm_ratio=math.nan,
        params_mutated=8,
        params_with_grad=8,
        fingerprint="weight-decay-folded",
        advice="read the grad norm before step()",
        state_bytes_per_element=4.0,
        steps=_steps([1.0, math.nan, math.inf, 1.0], [1.5, math.nan, math.inf, 1.5], 8),
    )
    error = OptimizerResult(
        optimizer="broken",
        cls="mypkg.opt:Broken",
        verdict="error",
        error="TypeError: __init__() got an unexpected keyword argument 'lrr'",
    )
    return ProbeReport(
        config={
            "seed": 0,
            "steps": 4,
            "model": {"name": "mlp", "kwargs": {}},
            "optimizers": [{"name": name} for name in LABELS],
        },
        results=(flagged, clean, nan_row, error),
        sfdiag_version="0.1.0",
        torch_version="2.13.0",
        interrupted=interrupted,
    )


@pytest.fixture
def report() -> ProbeReport:
    return make_report()


def _md_cells(line: str) -> list[str]:
    """A markdown table row split on unescaped pipes."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


# -- the format table ----------------------------------------------------------------


def test_formats_table_has_the_cli_names():
    assert list(FORMATS) == ["table", "json", "csv", "markdown", "junit"]


def test_unknown_format_is_a_user_error_listing_the_formats(report):
    with pytest.raises(SfdiagError, match="yaml") as info:
        render(report, "yaml")
    for name in FORMATS:
        assert name in str(info.value)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_ends_with_a_newline_and_has_no_ansi(report, fmt):
    out = render(report, fmt, RenderOptions(per_param=True))
    assert out.endswith("\n")
    assert not ANSI.search(out)


# -- json ----------------------------------------------------------------------------


def test_json_is_to_dict(report):
    data = json.loads(render(report, "json"))
    assert data == json.loads(json.dumps(report.to_dict()))
    assert [r["optimizer"] for r in data["results"]] == list(LABELS)
    assert data["results"][2]["pre_step_grad_norm"] == "nan"  # no bare NaN in the JSON
    assert data["results"][0]["flagged"] is True


def test_json_is_strict_json(report):
    out = render(report, "json")
    assert "NaN" not in out and "Infinity" not in out
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


def test_json_marks_interruption():
    assert json.loads(render(make_report(interrupted=True), "json"))["interrupted"] is True


# -- csv -----------------------------------------------------------------------------


def test_csv_round_trips_with_pandas(report):
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(io.StringIO(render(report, "csv")))
    assert list(frame.columns) == [
        "optimizer",
        "class",
        "flagged",
        "verdict",
        "fingerprint",
        "pre_step_grad_norm",
        "post_step_grad_norm",
        "norm_ratio",
        "params_mutated",
        "params_with_grad",
        "state_bytes_per_element",
        "advice",
        "error",
    ]
    assert list(frame["optimizer"]) == list(LABELS)
    assert list(frame["flagged"]) == [True, False, True, True]
    assert frame.loc[0, "norm_ratio"] == pytest.approx(867.2)
    assert math.isnan(frame.loc[2, "pre_step_grad_norm"])
    assert frame.loc[3, "verdict"] == "error"
    assert "lrr" in frame.loc[3, "error"]
    assert frame.loc[0, "advice"] == "log the grad norm before step(), or use sf-ref"


# -- junit ---------------------------------------------------------------------------


def test_junit_parses_and_counts(report):
    root = ET.fromstring(render(report, "junit"))
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("name") == "sfdiag"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "2", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == list(LABELS)
    assert cases["fused"].get("classname") == "sfdiag.AdamWScheduleFree"
    failure = cases["fused"].find("failure")
    assert failure.get("type") == "mutated"
    assert "867x" in failure.get("message")
    assert "702.4" in failure.text
    assert cases["adamw"].find("failure") is None and cases["adamw"].find("error") is None
    assert cases["broken"].find("error") is not None
    assert cases["broken"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in cases["fused"].iter("property")}
    assert props["pre_step_grad_norm"] == "0.81"
    assert props["post_step_grad_norm"] == "702.4"


def test_junit_survives_control_characters():
    bad = make_report().results[3]
    import dataclasses

    odd = dataclasses.replace(bad, error="\x1b[31mred\x1b[0m \x00 boom")
    report = dataclasses.replace(make_report(), results=(odd,))
    root = ET.fromstring(render(report, "junit"))
    assert "boom" in root.find("testsuite/testcase/error").get("message")


# -- markdown ------------------------------------------------------------------------


def test_markdown_table_rows(report):
    out = render(report, "markdown")
    rows = [line for line in out.splitlines() if line.startswith("|")]
    header, rule, *body = rows
    width = len(_md_cells(header))
    assert set(rule.replace("|", "").replace("-", "").replace(":", "")) == set()
    assert all(len(_md_cells(row)) == width for row in body)
    assert [_md_cells(row)[0] for row in body] == list(LABELS)
    verdicts = {_md_cells(row)[0]: _md_cells(row)[-1] for row in body}
    assert verdicts["fused"].startswith("**mutated**")
    assert verdicts["adamw"] == "clean"
    assert verdicts["broken"] == "**error**"


def test_markdown_advice_bullets_for_flagged_only(report):
    out = render(report, "markdown")
    bullets = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(bullets) == 3
    assert bullets[0].startswith("- fused: p.grad was changed in place during step()")
    assert not any(b.startswith("- adamw") for b in bullets)


def test_markdown_per_param_tables(report):
    assert "net.0.bias" not in render(report, "markdown")
    out = render(report, "markdown", RenderOptions(per_param=True))
    assert "#### fused (AdamWScheduleFree)" in out
    assert "net.0.bias" in out and "64×32" in out


# -- table ---------------------------------------------------------------------------


def test_table_shows_every_optimizer_and_no_ansi_without_color(report):
    out = render(report, "table")
    assert not ANSI.search(out)
    for label in LABELS:
        assert label in out
    assert "AdamWScheduleFree" in out  # class, short
    assert "867x" in out
    assert "8/8" in out
    assert "8 B/el" in out
    assert "mutated (adam-normalized)" in out
    assert "3 of 4 optimizers flagged (1 error)" in out.splitlines()[-1]


def test_table_with_color_has_ansi(report):
    out = render(report, "table", RenderOptions(color=True))
    assert ANSI.search(out)
    assert "\x1b[1;31m" in out  # flagged verdicts in bold red


def test_table_ignores_no_color_environment(report, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    assert ANSI.search(render(report, "table", RenderOptions(color=True)))
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not ANSI.search(render(report, "table", RenderOptions(color=False)))


def test_table_advice_sentences_for_flagged_rows_only(report):
    out = render(report, "table")
    lines = out.splitlines()
    expected = (
        "fused: p.grad was changed in place during step() (adam-normalized): the norm read "
        "after step() is 867x the gradient's. Log the grad norm before step(), or use sf-ref. "
        "[docs: verdicts#adam-normalized]"
    )
    assert expected in lines
    assert any(line.startswith("sgd|wd: p.grad was changed in place") for line in lines)
    assert any(line.startswith("broken: could not be probed: TypeError") for line in lines)
    assert not any(line.startswith("adamw:") for line in lines)


def test_table_says_when_interrupted():
    out = render(make_report(interrupted=True), "table")
    assert "Interrupted" in out
    assert "Interrupted" not in render(make_report(), "table")


def test_table_per_param(report):
    assert "net.0.bias" not in render(report, "table")
    out = render(report, "table", RenderOptions(per_param=True))
    assert "fused (AdamWScheduleFree): per parameter" in out
    assert "adamw (AdamW): per parameter" in out
    assert "net.0.bias" in out and "64×32" in out and "799" in out


@pytest.mark.parametrize("width", [60, 80, 100, 120, 160])
def test_table_keeps_optimizer_and_verdict_at_any_width(report, width):
    out = render(report, "table", RenderOptions(width=width))
    table_lines = [line for line in out.splitlines() if line.startswith(" ")]  # not sentences
    assert len(table_lines) >= 6
    assert all(len(line) <= width for line in table_lines)
    for label in ("fused", "adamw", "broken"):
        assert label in out
    assert "clean" in out and "error" in out


def test_table_with_no_results():
    import dataclasses

    empty = dataclasses.replace(make_report(), results=())
    out = render(empty, "table")
    assert "0 of 0 optimizers flagged" in out


# -- shared text ---------------------------------------------------------------------


def test_sparkline_log_scale_and_bad_steps(report):
    fused, clean, nan_row, error = report.results
    scale = text.spark_scale(report.results)
    assert scale[0] == 0 and scale[1] == pytest.approx(math.log10(650 / 0.7))  # the largest ratio
    assert text.sparkline(clean, scale) == text.BLOCKS[0] * 4  # ratio 1 = the floor
    assert set(text.sparkline(fused, scale)) <= set(text.BLOCKS[-2:])
    assert text.sparkline(nan_row, scale)[1:3] == "!!"  # nan, inf/inf
    assert text.sparkline(error, scale) == ""
    assert text.sparkline(fused, scale) in render(report, "table")


def test_sparkline_buckets_long_probes():
    steps = tuple(StepRecord(i, 0.0, 1.0, 1.0 if i != 37 else 10.0, 0) for i in range(100))
    result = OptimizerResult("x", "m:X", "mutated", steps=steps)
    line = text.sparkline(result, text.spark_scale([result]))
    assert len(line) == text.SPARK_WIDTH
    assert line.count(text.BLOCKS[-1]) == 1  # the spike survives bucketing


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.81, "0.81"),
        (702.4, "702.4"),
        (0.000123456, "0.0001235"),
        (1.5e9, "1.5e+09"),
        (0.0, "0"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (None, "-"),
    ],
)
def test_fmt_num(value, expected):
    assert text.fmt_num(value) == expected


def test_fmt_ratio_and_bytes():
    assert text.fmt_ratio(867.2) == "867x"
    assert text.fmt_ratio(1.0) == "1x"
    assert text.fmt_ratio(math.nan) == "nan"
    assert text.fmt_bytes_per_element(8.0) == "8 B/el"
    assert text.fmt_bytes_per_element(None) == "-"


def test_advice_sentence_is_none_when_clean(report):
    assert text.advice_sentence(report.results[1]) is None
    assert len(text.advice_sentences(report)) == 3


# -- plot ----------------------------------------------------------------------------


def test_plot_writes_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    from sfdiag.report.plot import write_plot

    path = tmp_path / "norms.png"
    write_plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["norms.png"]
    with pytest.raises(SfdiagError, match="--force"):
        write_plot(report, path)
    write_plot(report, path, force=True)


def test_plot_needs_an_existing_directory(report, tmp_path):
    pytest.importorskip("matplotlib")
    from sfdiag.report.plot import write_plot

    path = tmp_path / "missing" / "norms.png"
    with pytest.raises(SfdiagError, match=re.escape(str(path))):
        write_plot(report, path)


def test_plot_without_matplotlib_is_a_user_error(report, tmp_path, monkeypatch):
    from sfdiag.report.plot import write_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SfdiagError, match=re.escape("pip install 'sfdiag[plot]'")):
        write_plot(report, tmp_path / "norms.png")
    assert not (tmp_path / "norms.png").exists()


def test_report_modules_do_not_import_heavy_libraries():
    import subprocess

    code = (
        "import sys, sfdiag.report, sfdiag.baseline, sfdiag.fileio, sfdiag.report.plot\n"
        "heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'rich') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
