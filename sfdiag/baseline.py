"""Baselines: what a probe found, saved, and compared with a later run (the CI gate).

A baseline file is deterministic JSON (no timestamps, no timings), so re-creating it
from the same run gives the same bytes and a diff in review shows what really moved::

    {"sfdiag_baseline": 1, "sfdiag_version": ..., "torch_version": ..., "device": "cpu",
     "config": {...}, "results": [{"optimizer": ..., "class": ..., "verdict": ...,
     "fingerprint": ..., "error": ..., "pre_step_grad_norm": ..., "post_step_grad_norm": ...,
     "norm_ratio": ..., "pre_step_grad_norms": [...], "post_step_grad_norms": [...]}]}

Non-finite norms are written as the strings "nan", "inf", "-inf" (as in the JSON report).
``device`` is where the probe ran (``device: auto`` resolved); older files lack it.
``compare`` is pure: a baseline and a report in, a ``CheckResult`` out (that record and
its ``Difference`` rows live with the other records in ``sfdiag.results``; importing them
from here still works).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdiag.errors import SfdiagError, shown
from sfdiag.fileio import write_atomic
from sfdiag.results import CHECK_ATOL, CHECK_RTOL, CheckResult, Difference, json_safe

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.report import RenderOptions
    from sfdiag.results import OptimizerResult, ProbeReport

BASELINE_FORMAT = 1  # the "sfdiag_baseline" value this sfdiag writes and reads
MAX_BASELINE_BYTES = 256 << 20  # some 50 optimizers of 100,000 steps
_MAX_DEPTH = 64  # a config's kwargs nest 32 levels at most, and the rest of a baseline 4
DEFAULT_RTOL = CHECK_RTOL
DEFAULT_ATOL = CHECK_ATOL

# -- records -------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineResult:
    """One optimizer's row of a baseline."""

    optimizer: str
    cls: str
    verdict: str
    fingerprint: str | None
    error: str | None
    pre_step_grad_norm: float
    post_step_grad_norm: float
    norm_ratio: float
    pre_step_grad_norms: tuple[float, ...]
    post_step_grad_norms: tuple[float, ...]

    @classmethod
    def from_result(cls, result: OptimizerResult) -> BaselineResult:
        return cls(
            optimizer=result.optimizer,
            cls=result.cls,
            verdict=result.verdict,
            fingerprint=result.fingerprint,
            error=result.error,
            pre_step_grad_norm=float(result.pre_step_grad_norm),
            post_step_grad_norm=float(result.post_step_grad_norm),
            norm_ratio=float(result.norm_ratio),
            pre_step_grad_norms=tuple(float(s.pre_step_grad_norm) for s in result.steps),
            post_step_grad_norms=tuple(float(s.post_step_grad_norm) for s in result.steps),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "class": self.cls,
            "verdict": self.verdict,
            "fingerprint": self.fingerprint,
            "error": self.error,
            "pre_step_grad_norm": json_safe(self.pre_step_grad_norm),
            "post_step_grad_norm": json_safe(self.post_step_grad_norm),
            "norm_ratio": json_safe(self.norm_ratio),
            "pre_step_grad_norms": [json_safe(v) for v in self.pre_step_grad_norms],
            "post_step_grad_norms": [json_safe(v) for v in self.post_step_grad_norms],
        }


@dataclass(frozen=True)
class Baseline:
    config: dict[str, Any]
    results: tuple[BaselineResult, ...]
    sfdiag_version: str
    torch_version: str
    path: str | None = None  # where it was loaded from, for messages
    device: str | None = None  # where the probe ran: "cpu", "cuda"; None: not recorded

    @classmethod
    def from_report(cls, report: ProbeReport) -> Baseline:
        return cls(
            config=json_safe(report.config),
            results=tuple(BaselineResult.from_result(r) for r in report.results),
            sfdiag_version=str(report.sfdiag_version),
            torch_version=str(report.torch_version),
            device=report.device,
        )

    @property
    def ran_on(self) -> str | None:
        """The device the probe ran on; a config that named one (not auto) says it too."""
        if self.device is not None:
            return self.device
        named = self.config.get("device")
        return named if named in ("cpu", "cuda") else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sfdiag_baseline": BASELINE_FORMAT,
            "sfdiag_version": self.sfdiag_version,
            "torch_version": self.torch_version,
        }
        if self.device is not None:
            out["device"] = self.device
        out["config"] = self.config
        out["results"] = [r.to_dict() for r in self.results]
        return out


# -- save / load ---------------------------------------------------------------------


def baseline_json(report: ProbeReport) -> str:
    """The bytes ``save_baseline`` writes (deterministic for a given report)."""
    data = Baseline.from_report(report).to_dict()
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def save_baseline(
    report: ProbeReport, path: str | os.PathLike[str], *, force: bool = False
) -> Path:
    """Write ``report`` as a baseline file, atomically; refuses to overwrite without force."""
    if report.interrupted:
        raise SfdiagError(
            f"not writing baseline {path}: the probe was interrupted, its results are partial"
        )
    return write_atomic(path, baseline_json(report), force=force, what="baseline")


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read and validate a baseline file; every problem is an SfdiagError naming the path
    and what is wrong with it (a corrupt file is the user's input, never a crash)."""
    where = str(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_BASELINE_BYTES + 1)
    except FileNotFoundError:
        raise SfdiagError(
            f"baseline file {where} does not exist "
            "(create one with: sfdiag baseline CONFIG.yaml --output FILE)"
        ) from None
    except IsADirectoryError:
        raise SfdiagError(f"baseline file {where} is a directory") from None
    except OSError as exc:
        raise SfdiagError(f"cannot read baseline file {where}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BASELINE_BYTES:
        raise SfdiagError(
            f"baseline file {where} is larger than {MAX_BASELINE_BYTES} bytes; not a baseline"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SfdiagError(f"baseline file {where} is not a text (UTF-8 JSON) file") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise SfdiagError(
            f"baseline file {where} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg})"
        ) from None
    except _DuplicateKey as exc:
        raise _fail(where, f"key {shown(exc.args[0])} appears twice in one object") from None
    except RecursionError:
        raise _fail(where, "JSON nested too deeply; not a baseline") from None
    except ValueError:  # Python reads no integer of more than 4300 digits
        raise _fail(where, "holds an integer too long to read; not a baseline") from None
    _check_values(data, where)
    return _parse(data, where)


class _DuplicateKey(Exception):
    """A JSON object names one key twice (json keeps the last, silently)."""


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_values(data: Any, where: str) -> None:
    """What JSON can hold but no baseline does: deep nesting (the comparison recurses),
    numbers beyond a float, text that is not Unicode (a lone surrogate cannot be printed)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        field = shown(path or "(top level)", 120)
        if depth > _MAX_DEPTH:
            raise _fail(where, f"nested more than {_MAX_DEPTH} levels deep (at {field})")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where, f"a key in {field}")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where, f"field {field}")
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1024:
            raise _fail(where, f"field {field} holds a number too large: {shown(value)}")


def _check_text(text: str, where: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(where, f"{what} is not valid Unicode text (a lone surrogate)") from None


def _fail(where: str, problem: str) -> SfdiagError:
    return SfdiagError(f"baseline file {where}: {problem}")


class _Reader:
    """Typed field access that names the path and the field in every error."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> SfdiagError:
        return _fail(self.where, problem)

    def get(self, obj: dict[str, Any], key: str, ctx: str) -> Any:
        if key not in obj:
            raise self.fail(f"missing field {ctx + key!r}")
        return obj[key]

    def text(self, obj: dict[str, Any], key: str, ctx: str = "", optional: bool = False) -> Any:
        value = self.get(obj, key, ctx)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"field {ctx + key!r} should be text, not {_type(value)}")
        return value

    def number(self, value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.fail(f"field {name!r} should be a number, not {_type(value)}")
        if isinstance(value, str) and value not in ("nan", "inf", "-inf"):
            raise self.fail(f"field {name!r} should be a number, not {shown(value)}")
        try:
            return float(value)
        except OverflowError:
            raise self.fail(f"field {name!r} is a number too large: {shown(value)}") from None

    def numbers(self, obj: dict[str, Any], key: str, ctx: str) -> tuple[float, ...]:
        value = self.get(obj, key, ctx)
        if not isinstance(value, list):
            raise self.fail(f"field {ctx + key!r} should be a list, not {_type(value)}")
        return tuple(self.number(v, f"{ctx}{key}[{i}]") for i, v in enumerate(value))


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse(data: Any, where: str) -> Baseline:
    read = _Reader(where)
    if not isinstance(data, dict) or "sfdiag_baseline" not in data:
        hint = ""
        if isinstance(data, dict) and "schema_version" in data and "results" in data:
            hint = (
                "; it looks like a --format json report: write baselines with "
                "sfdiag baseline CONFIG.yaml --output FILE"
            )
        raise read.fail(f"not an sfdiag baseline file (no 'sfdiag_baseline' key){hint}")
    version = data["sfdiag_baseline"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise read.fail(f"unknown baseline format {shown(version)}")
    if version > BASELINE_FORMAT:
        raise read.fail(
            f"baseline format {shown(version)} is newer than this sfdiag reads "
            f"(format {BASELINE_FORMAT}): upgrade sfdiag, or re-create the baseline"
        )
    if version < 1:
        raise read.fail(f"unknown baseline format {shown(version)}")
    config = read.get(data, "config", "")
    if not isinstance(config, dict):
        raise read.fail(f"field 'config' should be an object, not {_type(config)}")
    rows = read.get(data, "results", "")
    if not isinstance(rows, list):
        raise read.fail(f"field 'results' should be a list, not {_type(rows)}")
    results = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        ctx = f"results[{i}]."
        if not isinstance(row, dict):
            raise read.fail(f"field 'results[{i}]' should be an object, not {_type(row)}")
        result = BaselineResult(
            optimizer=read.text(row, "optimizer", ctx),
            cls=read.text(row, "class", ctx),
            verdict=read.text(row, "verdict", ctx),
            fingerprint=read.text(row, "fingerprint", ctx, optional=True),
            error=read.text(row, "error", ctx, optional=True),
            pre_step_grad_norm=read.number(
                read.get(row, "pre_step_grad_norm", ctx), ctx + "pre_step_grad_norm"
            ),
            post_step_grad_norm=read.number(
                read.get(row, "post_step_grad_norm", ctx), ctx + "post_step_grad_norm"
            ),
            norm_ratio=read.number(read.get(row, "norm_ratio", ctx), ctx + "norm_ratio"),
            pre_step_grad_norms=read.numbers(row, "pre_step_grad_norms", ctx),
            post_step_grad_norms=read.numbers(row, "post_step_grad_norms", ctx),
        )
        if len(result.pre_step_grad_norms) != len(result.post_step_grad_norms):
            raise read.fail(f"{ctx}pre_step_grad_norms and post_step_grad_norms differ in length")
        if result.optimizer in seen:
            raise read.fail(f"optimizer {shown(result.optimizer)} appears twice")
        seen.add(result.optimizer)
        results.append(result)
    return Baseline(
        config=config,
        results=tuple(results),
        sfdiag_version=read.text(data, "sfdiag_version"),
        torch_version=read.text(data, "torch_version"),
        path=where,
        device=read.text(data, "device", optional=True) if "device" in data else None,
    )


# -- compare -------------------------------------------------------------------------


def check_tolerance(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SfdiagError(f"{name} must be a finite number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise SfdiagError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def compare(
    baseline: Baseline,
    report: ProbeReport,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> CheckResult:
    """What moved between ``baseline`` and ``report``; ``.regressed`` is the CI gate.

    Regressions: a config difference (one per top-level key), an optimizer added or
    missing, a class / verdict / fingerprint change, a different number of steps, a
    pre- or post-step norm at any step beyond ``atol + rtol * |baseline|`` (the worst
    step is reported). NaN equals NaN. Version changes and norms that moved within
    tolerance are listed, but are not regressions.
    """
    rtol = check_tolerance(rtol, "--rtol")
    atol = check_tolerance(atol, "atol")
    current = Baseline.from_report(report)
    diffs: list[Difference] = list(_config_diffs(baseline, current))

    before = {r.optimizer: r for r in baseline.results}
    now = {r.optimizer: r for r in current.results}
    order = list(before) + [name for name in now if name not in before]
    for name in order:
        if name not in now:
            gone = before[name].cls
            diffs.append(Difference(name, "optimizer missing", gone, None, None, True, "missing"))
        elif name not in before:
            new = now[name]
            diffs.append(Difference(name, "optimizer added", None, new.cls, None, True, "added"))
        else:
            diffs.extend(_result_diffs(before[name], now[name], rtol, atol))
    return CheckResult(
        differences=diffs,
        optimizers=tuple(order),
        baseline_path=baseline.path,
        rtol=rtol,
        atol=atol,
    )


_ABSENT = object()


def _leaf_diffs(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, old, new) for every leaf that differs: ``optimizers[1].kwargs.weight_decay``.

    Optimizers are matched by position; a list of another length differs as a whole.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            yield from _leaf_diffs(old.get(key, _ABSENT), new.get(key, _ABSENT), sub)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _leaf_diffs(a, b, f"{path}[{i}]")
    elif old is _ABSENT or new is _ABSENT or old != new:
        yield path, None if old is _ABSENT else old, None if new is _ABSENT else new


def _config_diffs(baseline: Baseline, current: Baseline) -> Iterator[Difference]:
    ran_on = baseline.ran_on if baseline.ran_on == current.ran_on else None
    for path, a, b in _leaf_diffs(baseline.config, current.config, ""):
        if path == "device" and ran_on is not None:  # `auto` that resolved to the same device
            yield Difference(
                None, f"config: device (both ran on {ran_on})", a, b, None, False, "config"
            )
        else:
            yield Difference(None, f"config: {path}", a, b, None, True, "config")
    if baseline.config.get("device") == current.config.get("device"):
        before, now = baseline.ran_on, current.ran_on
        if before is not None and now is not None and before != now:  # `auto` moved
            yield Difference(None, "device it ran on", before, now, None, False, "device")
    for what, a, b in (
        ("sfdiag version", baseline.sfdiag_version, current.sfdiag_version),
        ("torch version", baseline.torch_version, current.torch_version),
    ):
        if a != b:
            yield Difference(None, what, a, b, None, False, "version")


def _result_diffs(
    old: BaselineResult, new: BaselineResult, rtol: float, atol: float
) -> Iterator[Difference]:
    name = old.optimizer
    for kind, what, a, b in (
        ("class", "class", old.cls, new.cls),
        ("verdict", "verdict", old.verdict, new.verdict),
        ("fingerprint", "fingerprint", old.fingerprint, new.fingerprint),
    ):
        if a != b:
            yield Difference(name, what, a, b, None, True, kind)
    if old.error != new.error:
        yield Difference(name, "error message", old.error, new.error, None, False, "error")
    if len(old.pre_step_grad_norms) != len(new.pre_step_grad_norms):
        n_old, n_new = len(old.pre_step_grad_norms), len(new.pre_step_grad_norms)
        yield Difference(name, "number of steps", n_old, n_new, None, True, "steps")
        return
    trajectories = (
        ("pre_step_grad_norm", "pre-step grad norm", "pre_step_grad_norms"),
        ("post_step_grad_norm", "post-step grad norm", "post_step_grad_norms"),
    )
    for kind, label, attr in trajectories:
        a, b = getattr(old, attr), getattr(new, attr)
        diff = _trajectory_diff(name, kind, label, a, b, rtol, atol)
        if diff is not None:
            yield diff


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _within(a: float, b: float, rtol: float, atol: float) -> bool:
    if _same(a, b):
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(b - a) <= atol + rtol * abs(a)


def relative_change(a: float, b: float) -> float:
    """(b - a) / |a|; 0 when the same (NaN == NaN), inf when it cannot be scaled."""
    if _same(a, b):
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
        return math.inf
    return (b - a) / abs(a)


def _trajectory_diff(
    name: str,
    kind: str,
    label: str,
    old: Sequence[float],
    new: Sequence[float],
    rtol: float,
    atol: float,
) -> Difference | None:
    """The worst step of one norm trajectory, or None when no step moved at all."""
    worst: tuple[bool, float, int] | None = None  # (beyond tolerance, |change|, step)
    for step, (a, b) in enumerate(zip(old, new, strict=True)):
        if _same(a, b):
            continue
        key = (not _within(a, b, rtol, atol), abs(relative_change(a, b)), step)
        if worst is None or key[:2] > worst[:2]:
            worst = key
    if worst is None:
        return None
    beyond, _, step = worst
    a, b = old[step], new[step]
    return Difference(
        name,
        f"{label} (worst: step {step})",
        a,
        b,
        rtol,
        beyond,
        kind,
        change=relative_change(a, b),
        step=step,
    )


def render_check(check: CheckResult, fmt: str, options: RenderOptions | None = None) -> str:
    """``check`` in one of the report formats (table, json, csv, markdown, junit)."""
    from sfdiag import report as formats

    return formats.render_check(check, fmt, options or formats.RenderOptions())
