"""Bad input through the CLI: exit 2, one clear message, no traceback, nothing written.

Every case runs through the Typer app in-process, in a directory holding only the files
it names, which must be byte for byte the same afterwards. The cases named in SUBPROCESS
also run through a real ``python -m sfdiag`` subprocess, all started at once. FAST cases
fail before torch is imported (~0.3 s as a subprocess); TORCH cases fail while names and
import paths are resolved (~1.5 s), and also ask for an ``--output`` file that must not
appear.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import alias_bomb, start_cli
from typer.testing import CliRunner

from sfdiag.cli import app

OK = "optimizers: [adamw]\nsteps: 1\n"
REPORT = json.dumps({"schema_version": 1, "results": [], "config": {}})
_ROW = {"optimizer": "a", "class": "c", "verdict": "clean", "fingerprint": None, "error": None}
_ROW |= {"pre_step_grad_norm": 1, "post_step_grad_norm": 1, "norm_ratio": 10**400}
HUGE_NORM = json.dumps({"sfdiag_baseline": 1, "config": {}, "results": [_ROW]})

# (id, files to create, CLI arguments, substrings the one error line must contain)
FAST = [
    (
        "yaml-syntax",
        {"c.yaml": "optimizers: [adamw\nsteps: 3\n"},
        ["probe", "c.yaml"],
        ["c.yaml", "invalid YAML", "line 2"],
    ),
    (
        "yaml-tab",
        {"c.yaml": "optimizers:\n\t- adamw\n"},
        ["probe", "c.yaml"],
        ["invalid YAML", "line 2"],
    ),
    (
        "top-level-list",
        {"c.yaml": "- adamw\n- sf-adamw\n"},
        ["probe", "c.yaml"],
        ["top level", "mapping", "a list"],
    ),
    ("top-level-scalar", {"c.yaml": "adamw\n"}, ["probe", "c.yaml"], ["top level", "'adamw'"]),
    ("empty-file", {"c.yaml": ""}, ["probe", "c.yaml"], ["c.yaml", "empty"]),
    ("only-comments", {"c.yaml": "# nothing here\n"}, ["probe", "c.yaml"], ["only comments"]),
    (
        "binary-file",
        {"c.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"},
        ["probe", "c.yaml"],
        ["c.yaml", "not a UTF-8 text file"],
    ),
    (
        "control-chars",
        {"c.yaml": b"optimizers: [adamw]\x00\x01\n"},
        ["probe", "c.yaml"],
        ["invalid YAML"],
    ),
    ("missing-file", {}, ["probe", "nope.yaml"], ["nope.yaml", "not found"]),
    ("directory", {"d/x": ""}, ["probe", "d"], ["d: is a directory"]),
    ("missing-optimizers", {"c.yaml": "steps: 3\n"}, ["probe", "c.yaml"], ["'optimizers'"]),
    (
        "unknown-key",
        {"c.yaml": OK + "stepz: 3\n"},
        ["probe", "c.yaml"],
        ["'stepz'", "did you mean 'steps'"],
    ),
    (
        "unknown-optimizer-key",
        {"c.yaml": "optimizers: [{name: adamw, kwarg: {}}]\n"},
        ["probe", "c.yaml"],
        ["'kwarg'", "did you mean 'kwargs'"],
    ),
    (
        "steps-string",
        {"c.yaml": "optimizers: [adamw]\nsteps: ten\n"},
        ["probe", "c.yaml"],
        ["steps", "'ten'"],
    ),
    (
        "steps-zero",
        {"c.yaml": "optimizers: [adamw]\nsteps: 0\n"},
        ["probe", "c.yaml"],
        ["steps", "got 0"],
    ),
    (
        "steps-float",
        {"c.yaml": "optimizers: [adamw]\nsteps: 2.5\n"},
        ["probe", "c.yaml"],
        ["steps", "2.5"],
    ),
    (
        "seed-negative",
        {"c.yaml": "optimizers: [adamw]\nseed: -1\n"},
        ["probe", "c.yaml"],
        ["seed", "-1"],
    ),
    (
        "seed-huge",
        {"c.yaml": "optimizers: [adamw]\nseed: 99999999999999\n"},
        ["probe", "c.yaml"],
        ["seed", "99999999999999"],
    ),
    (
        "batch-size-zero",
        {"c.yaml": OK + "data: {batch_size: 0}\n"},
        ["probe", "c.yaml"],
        ["data.batch_size", "got 0"],
    ),
    (
        "batch-size-bool",
        {"c.yaml": OK + "data: {batch_size: true}\n"},
        ["probe", "c.yaml"],
        ["data.batch_size", "boolean"],
    ),
    ("dtype", {"c.yaml": OK + "dtype: float16\n"}, ["probe", "c.yaml"], ["dtype", "'float16'"]),
    (
        "device-in-config",
        {"c.yaml": OK + "device: tpu\n"},
        ["probe", "c.yaml"],
        ["device", "'tpu'"],
    ),
    (
        "device-option",
        {"c.yaml": OK},
        ["probe", "c.yaml", "--device", "gpu"],
        ["--device", "'gpu'"],
    ),
    (
        "unknown-optimizer",
        {"c.yaml": "optimizers: [adamww]\n"},
        ["probe", "c.yaml"],
        ["'adamww'", "did you mean 'adamw'"],
    ),
    (
        "unknown-model",
        {"c.yaml": OK + "model: mlpp\n"},
        ["probe", "c.yaml"],
        ["'mlpp'", "did you mean 'mlp'"],
    ),
    (
        "unknown-data",
        {"c.yaml": OK + "data: {name: gausian}\n"},
        ["probe", "c.yaml"],
        ["'gausian'", "did you mean 'gaussian'"],
    ),
    ("unknown-loss", {"c.yaml": OK + "loss: hinge\n"}, ["probe", "c.yaml"], ["loss", "'hinge'"]),
    (
        "malformed-import-path",
        {"c.yaml": "optimizers: [{name: x, class: 'my pkg:Opt'}]\n"},
        ["probe", "c.yaml"],
        ["'my pkg:Opt'", "import path"],
    ),
    (
        "duplicate-labels",
        {"c.yaml": "optimizers: [adamw, {name: adamw, class: sf-ref}]\n"},
        ["probe", "c.yaml"],
        ["duplicate label 'adamw'"],
    ),
    (
        "label-needs-class",
        {"c.yaml": "optimizers: [{name: mine}]\n"},
        ["probe", "c.yaml"],
        ["'mine'", "class"],
    ),
    (
        "kwargs-not-mapping",
        {"c.yaml": "optimizers: [{name: adamw, kwargs: [0.1]}]\n"},
        ["probe", "c.yaml"],
        ["optimizers[0].kwargs", "[0.1]"],
    ),
    (
        "kwargs-nan",
        {"c.yaml": "optimizers: [{name: adamw, kwargs: {lr: .nan}}]\n"},
        ["probe", "c.yaml"],
        ["kwargs.lr", "nan"],
    ),
    (
        "closure-string",
        {"c.yaml": "optimizers: [{name: adamw, closure: 'yes'}]\n"},
        ["probe", "c.yaml"],
        ["closure", "'yes'"],
    ),
    (
        "schema-version",
        {"c.yaml": OK + "schema_version: 2\n"},
        ["probe", "c.yaml"],
        ["schema_version", "2"],
    ),
    ("optimizers-empty-option", {}, ["compare", "--optimizers", ""], ["--optimizers"]),
    (
        "optimizers-empty-item",
        {},
        ["compare", "--optimizers", "adamw,,sf-ref"],
        ["--optimizers", "empty item"],
    ),
    (
        "optimizers-unknown-option",
        {},
        ["compare", "--optimizers", "adamw,sgdd"],
        ["--optimizers", "'sgdd'"],
    ),
    ("optimizers-twice", {}, ["compare", "--optimizers", "adamw,adamw"], ["'adamw'", "twice"]),
    ("compare-steps", {}, ["compare", "--steps", "0"], ["--steps", "got 0"]),
    ("compare-seed", {}, ["compare", "--seed", "-3"], ["--seed", "-3"]),
    ("compare-model", {}, ["compare", "--model", "resnet"], ["--model", "'resnet'"]),
    (
        "compare-bad-config",
        {"c.yaml": "optimizers: 3\n"},
        ["compare", "--config", "c.yaml"],
        ["c.yaml", "optimizers", "list"],
    ),
    (
        "duplicate-key",
        {"c.yaml": OK + "steps: 2\n"},
        ["probe", "c.yaml"],
        ["c.yaml: duplicate key 'steps'", "line 3", "first at line 2"],
    ),
    *(
        (
            f"alias-bomb-{key}",
            {"c.yaml": alias_bomb(key)},
            ["probe", "c.yaml"],
            [f"c.yaml: {key}: must be", "(a list)"],
        )
        for key in ("seed", "loss", "model")
    ),
    ("format", {"c.yaml": OK}, ["probe", "c.yaml", "--format", "bogus"], ["--format", "'bogus'"]),
    (
        "format-upper-case",
        {"c.yaml": OK},
        ["probe", "c.yaml", "--format", "JSON"],
        ["--format", "'JSON' (did you mean 'json'?)"],
    ),
    (
        "format-check",
        {"c.yaml": OK, "b.json": "{}"},
        ["check", "c.yaml", "--baseline", "b.json", "--format", "yaml"],
        ["--format", "'yaml'"],
    ),
    (
        "output-missing-dir",
        {"c.yaml": OK},
        ["probe", "c.yaml", "--format", "json", "--output", "/nonexistent/dir/x.json"],
        ["/nonexistent/dir"],
    ),
    (
        "output-is-dir",
        {"c.yaml": OK, "out/keep": ""},
        ["probe", "c.yaml", "--format", "json", "--output", "out"],
        ["out", "directory"],
    ),
    (
        "output-parent-is-file",
        {"c.yaml": OK},
        ["probe", "c.yaml", "--format", "csv", "--output", "c.yaml/x.csv"],
        ["c.yaml/x.csv", "not a directory"],
    ),
    (
        "output-exists",
        {"c.yaml": OK, "out.json": "precious"},
        ["probe", "c.yaml", "--format", "json", "--output", "out.json"],
        ["out.json", "already exists", "--force"],
    ),
    (
        "plot-missing-dir",
        {"c.yaml": OK},
        ["probe", "c.yaml", "--plot", "/nonexistent/p.png"],
        ["/nonexistent"],
    ),
    (
        "baseline-exists",
        {"c.yaml": OK, "base.json": "precious"},
        ["baseline", "c.yaml", "--output", "base.json"],
        ["base.json", "already exists", "--force"],
    ),
    (
        "baseline-missing-dir",
        {"c.yaml": OK},
        ["baseline", "c.yaml", "--output", "/nonexistent/base.json"],
        ["/nonexistent"],
    ),
    (
        "check-baseline-corrupt",
        {"c.yaml": OK, "base.json": '{"sfdiag_baseline": 1, "res'},
        ["check", "c.yaml", "--baseline", "base.json"],
        ["base.json", "not valid JSON", "line 1"],
    ),
    (
        "check-baseline-binary",
        {"c.yaml": OK, "base.json": b"\xff\xfe\x00garbage"},
        ["check", "c.yaml", "--baseline", "base.json"],
        ["base.json", "not a text"],
    ),
    (
        "check-baseline-is-report",
        {"c.yaml": OK, "base.json": REPORT},
        ["check", "c.yaml", "--baseline", "base.json"],
        ["base.json", "--format json report"],
    ),
    (
        "check-baseline-missing",
        {"c.yaml": OK},
        ["check", "c.yaml", "--baseline", "nope.json"],
        ["nope.json", "does not exist"],
    ),
    (
        "check-baseline-fields",
        {"c.yaml": OK, "base.json": '{"sfdiag_baseline": 1}'},
        ["check", "c.yaml", "--baseline", "base.json"],
        ["base.json", "'config'"],
    ),
    (
        "check-baseline-nested",
        {"c.yaml": OK, "base.json": "[" * 100_000 + "]" * 100_000},
        ["check", "c.yaml", "--baseline", "base.json"],
        ["base.json", "nested too deeply"],
    ),
    (
        "check-baseline-400-digits",
        {"c.yaml": OK, "base.json": HUGE_NORM},
        ["check", "c.yaml", "--baseline", "base.json"],
        ["base.json", "results[0].norm_ratio", "too large"],
    ),
    (
        "check-rtol-negative",
        {"c.yaml": OK, "base.json": "{}"},
        ["check", "c.yaml", "--baseline", "base.json", "--rtol", "-1"],
        ["--rtol", "-1"],
    ),
    (
        "check-rtol-nan",
        {"c.yaml": OK, "base.json": "{}"},
        ["check", "c.yaml", "--baseline", "base.json", "--rtol", "nan"],
        ["--rtol", "nan"],
    ),
    (
        "check-rtol-inf",
        {"c.yaml": OK, "base.json": "{}"},
        ["check", "c.yaml", "--baseline", "base.json", "--rtol", "inf"],
        ["--rtol", "inf"],
    ),
    ("init-exists", {"sfdiag.yaml": "mine"}, ["init"], ["sfdiag.yaml", "already exists"]),
]

_IMPORTED = "optimizers: [{{name: x, class: '{cls}'{kwargs}}}]\nsteps: 1\ndata: {{batch_size: 4}}\n"


def _opt(cls: str, kwargs: str = "") -> dict[str, str]:
    return {"c.yaml": _IMPORTED.format(cls=cls, kwargs=kwargs)}


def _model(name: str, kwargs: str = "") -> dict[str, str]:
    extra = f", kwargs: {{{kwargs}}}" if kwargs else ""
    return {"c.yaml": f"optimizers: [adamw]\nsteps: 1\nmodel: {{name: '{name}'{extra}}}\n"}


JSON_OUT = ["--format", "json", "--output", "out.json"]
TORCH = [
    (
        "optimizer-kwarg",
        _opt("adamw", ", kwargs: {lrr: 0.1}"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'lrr'", "did you mean 'lr'"],
    ),
    (
        "missing-module",
        _opt("nopkg.optim:Fast"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'nopkg.optim:Fast'", "'nopkg'"],
    ),
    (
        "missing-attribute",
        _opt("torch.optim:AdamX"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'torch.optim:AdamX'", "no attribute"],
    ),
    (
        "optimizer-is-module",
        _opt("os:path"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'os:path'", "not an optimizer"],
    ),
    (
        "optimizer-is-number",
        _opt("math:pi"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'math:pi'", "not an optimizer"],
    ),
    (
        "optimizer-is-function",
        _opt("os:getcwd"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'os:getcwd'", "not an optimizer"],
    ),
    (
        "optimizer-is-class",
        _opt("collections:OrderedDict"),
        ["baseline", "c.yaml", "-o", "b.json"],
        ["'collections:OrderedDict'", "not an optimizer"],
    ),
    (
        "model-is-base-module",
        _model("torch.nn:Module"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'torch.nn:Module'", "without parameters"],
    ),
    (
        "model-is-number",
        _model("math:pi"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'math:pi'", "not callable"],
    ),
    (
        "model-returns-str",
        _model("os:getcwd"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'os:getcwd'", "not a torch.nn.Module"],
    ),
    (
        "data-kwarg",
        {"c.yaml": OK + "data: {kwargs: {shape: [3]}}\n"},
        ["probe", "c.yaml", *JSON_OUT],
        ["data.kwargs", "'shape'"],
    ),
    (
        "data-kwarg-typo",
        {"c.yaml": OK + "data: {kwargs: {input_shap: [64]}}\n"},
        ["probe", "c.yaml", *JSON_OUT],
        ["data.kwargs: unknown argument 'input_shap' (did you mean 'input_shape'?)"],
    ),
    (
        "data-kwarg-passed-by-sfdiag",
        {"c.yaml": OK + "data: {kwargs: {batch_size: 8}}\n"},
        ["probe", "c.yaml", *JSON_OUT],
        ["data.kwargs: 'batch_size' is passed by sfdiag", "data.batch_size"],
    ),
    (
        "data-kwarg-bad-shape",
        {"c.yaml": OK + "data: {kwargs: {input_shape: [0]}}\n"},
        ["probe", "c.yaml", *JSON_OUT],
        ["data.kwargs.input_shape", "[0]"],
    ),
    (
        "model-kwarg",
        _model("mlp", "hiden: 3"),
        ["probe", "c.yaml", *JSON_OUT],
        ["'hiden'", "did you mean 'hidden'"],
    ),
    (
        "model-lazy-first-layer",
        _model("hostile_models:lazy_first_model"),
        ["probe", "c.yaml", *JSON_OUT],
        ["cannot infer the input shape", "(LazyLinear) is lazy", "'sfdiag_input_shape'"],
    ),
]


CASES = {case[0]: case[1:] for case in FAST + TORCH}

# Through a real `python -m sfdiag` subprocess (the rest run in-process through the same
# Typer app, which is quicker): one or more of every kind of bad input.
SUBPROCESS = [
    "yaml-syntax",
    "top-level-list",
    "empty-file",
    "binary-file",
    "missing-file",
    "unknown-key",
    "steps-zero",
    "seed-negative",
    "batch-size-zero",
    "dtype",
    "device-option",
    "duplicate-key",
    "alias-bomb-seed",
    "unknown-optimizer",
    "unknown-model",
    "duplicate-labels",
    "optimizers-empty-option",
    "optimizers-unknown-option",
    "format",
    "format-upper-case",
    "output-missing-dir",
    "output-exists",
    "baseline-exists",
    "check-baseline-corrupt",
    "check-baseline-nested",
    "check-baseline-400-digits",
    "check-rtol-negative",
    "optimizer-kwarg",
    "missing-module",
    "optimizer-is-module",
    "model-is-base-module",
    "data-kwarg-typo",
]


def _make(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden temporaries included) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _check(code: int, stdout: str, stderr: str, needles: list[str]) -> None:
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sfdiag: error: "), stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    """Start every SUBPROCESS case at once (each ~0.3 s, or ~1.5 s with torch), in parallel."""
    runs = {}
    for name in SUBPROCESS:
        files, args, _ = CASES[name]
        root = tmp_path_factory.mktemp(name)
        _make(root, files)
        runs[name] = (root, _tree(root), start_cli(*args, cwd=root))
    yield runs
    for _, _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("name", SUBPROCESS)
def test_real_cli_exits_2_and_writes_nothing(launched, name):
    root, before, process = launched[name]
    stdout, stderr = process.communicate(timeout=120)
    _check(process.returncode, stdout, stderr, CASES[name][2])
    assert _tree(root) == before, "the command wrote or changed a file"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, name):
    files, args, needles = CASES[name]
    _make(tmp_path, files)
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SFDIAG_DEBUG", raising=False)
    result = CliRunner().invoke(app, args)
    _check(result.exit_code, result.stdout, result.stderr, needles)
    assert _tree(tmp_path) == before, "the command wrote or changed a file"


def test_cuda_on_a_machine_without_cuda(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "c.yaml").write_text(OK, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["baseline", "c.yaml", "--device", "cuda", "-o", "b.json"])
    _check(result.exit_code, result.stdout, result.stderr, ["'cuda'", "no CUDA device"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_debug_shows_the_traceback(sfdiag_cli, tmp_path):
    (tmp_path / "c.yaml").write_text("optimizers: [adamw\n", encoding="utf-8")
    result = sfdiag_cli("probe", "c.yaml", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "SfdiagError" in result.stderr and "invalid YAML" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_value_typer_cannot_parse_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["compare", "--steps", "many"])
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr and "--steps" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_battery_is_big_enough():
    assert len(SUBPROCESS) >= 20 and len(CASES) >= 60
    assert set(SUBPROCESS) <= set(CASES)


def test_config_errors_fail_before_torch_is_imported(tmp_path):
    """Why FAST cases are fast: a config error never pays for importing torch."""
    (tmp_path / "c.yaml").write_text(OK + "stepz: 3\n", encoding="utf-8")
    code = (
        "import sys\n"
        "from sfdiag.cli import main\n"
        "sys.argv = ['sfdiag', 'probe', 'c.yaml', '--format', 'json']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 2, exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
