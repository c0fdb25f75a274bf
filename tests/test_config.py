"""sfdiag.probe.config: YAML -> validated Config; every bad input is one clear SfdiagError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import alias_bomb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfdiag.errors import SfdiagError
from sfdiag.probe import registry
from sfdiag.probe.config import (
    DEFAULT_OPTIMIZERS,
    EXAMPLE_CONFIG,
    Config,
    DataSpec,
    DistributedSpec,
    ModelSpec,
    OptimizerSpec,
    default_config,
    load_config,
    parse_config,
    parse_optimizer_list,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _load_text(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Config:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_config(path)


# --------------------------------------------------------------------------- bad inputs

# (id, YAML text, substrings the message must contain besides the file name)
BAD = [
    ("yaml-syntax", "optimizers: [adamw\nsteps: 3\n", ["invalid YAML", "line 2"]),
    ("yaml-tab-indent", "optimizers:\n\t- adamw\n", ["invalid YAML", "line 2"]),
    ("yaml-bad-date", "optimizers: [adamw]\nseed: 2001-13-01\n", ["invalid YAML", "month"]),
    ("yaml-unhashable-key", "[a]: 1\n", ["invalid YAML", "line 1"]),
    ("yaml-python-tag", "optimizers: !!python/object:os.system {}\n", ["invalid YAML", "line 1"]),
    ("empty", "", ["empty"]),
    ("only-comments", "# nothing\n\n", ["only comments"]),
    ("null-document", "---\n~\n", ["null"]),
    ("top-level-list", "- adamw\n- sf-adamw\n", ["top level", "mapping", "a list"]),
    ("top-level-scalar", "hello\n", ["top level", "'hello'"]),
    ("missing-optimizers", "steps: 3\n", ["'optimizers'"]),
    ("unknown-top-key", "optimizers: [adamw]\nstepz: 3\n", ["'stepz'", "'steps'", "allowed"]),
    ("unknown-singular", "optimizer: [adamw]\n", ["'optimizer'", "'optimizers'"]),
    ("non-string-key", "optimizers: [adamw]\n1: 2\n", ["unknown key", "1"]),
    ("steps-zero", "optimizers: [adamw]\nsteps: 0\n", ["steps", "got 0"]),
    ("steps-float", "optimizers: [adamw]\nsteps: 1.5\n", ["steps", "1.5"]),
    ("steps-bool", "optimizers: [adamw]\nsteps: true\n", ["steps", "true"]),
    ("steps-string", "optimizers: [adamw]\nsteps: '10'\n", ["steps", "'10'"]),
    ("steps-huge", "optimizers: [adamw]\nsteps: 1000000\n", ["steps", "1000000", "100000"]),
    ("seed-negative", "optimizers: [adamw]\nseed: -1\n", ["seed", "-1"]),
    ("seed-huge", "optimizers: [adamw]\nseed: 99999999999999\n", ["seed", "99999999999999"]),
    ("device", "optimizers: [adamw]\ndevice: gpu\n", ["device", "'gpu'", "cuda"]),
    ("device-case", "optimizers: [adamw]\ndevice: CPU\n", ["'CPU'", "(did you mean 'cpu'?)"]),
    ("optimizer-case", "optimizers: [AdamW]\n", ["'AdamW' (did you mean 'adamw'?)"]),
    ("dtype", "optimizers: [adamw]\ndtype: float16\n", ["dtype", "'float16'", "bfloat16"]),
    ("schema-version", "schema_version: 2\noptimizers: [adamw]\n", ["schema_version", "2"]),
    ("schema-version-bool", "schema_version: true\noptimizers: [adamw]\n", ["schema_version"]),
    ("optimizers-empty", "optimizers: []\n", ["optimizers", "at least one"]),
    ("optimizers-null", "optimizers:\n", ["optimizers", "null"]),
    ("optimizers-string", "optimizers: adamw\n", ["optimizers", "list", "[adamw]"]),
    ("optimizer-int", "optimizers: [3]\n", ["optimizers[0]", "3"]),
    (
        "optimizer-unknown",
        "optimizers: [sf-adamx]\n",
        ["optimizers[0]", "'sf-adamx'", "'sf-adamw'"],
    ),
    (
        "class-unknown",
        "optimizers: [{name: a, class: adamx}]\n",
        ["optimizers[0].class", "'adamx'", "'adamw'"],
    ),
    (
        "class-missing",
        "optimizers: [adamw, {name: fused}]\n",
        ["optimizers[1].name", "'fused'", "class:"],
    ),
    ("name-missing", "optimizers: [{class: adamw}]\n", ["optimizers[0]", "'name'"]),
    ("name-empty", "optimizers: [{name: '', class: adamw}]\n", ["optimizers[0].name", "''"]),
    ("name-int", "optimizers: [{name: 7, class: adamw}]\n", ["optimizers[0].name", "7"]),
    (
        "duplicate-label",
        "optimizers: [adamw, sf-sgd, {name: adamw, class: sf-adamw}]\n",
        ["optimizers[2]", "duplicate", "'adamw'"],
    ),
    (
        "optimizer-unknown-key",
        "optimizers: [{name: adamw, kwarg: {lr: 1}}]\n",
        ["optimizers[0]", "'kwarg'", "'kwargs'"],
    ),
    (
        "lr-outside-kwargs",
        "optimizers: [{name: adamw, lr: 0.1}]\n",
        ["optimizers[0]", "'lr'", "kwargs:"],
    ),
    (
        "kwargs-list",
        "optimizers: [adamw, {name: b, class: adamw, kwargs: [lr, 1]}]\n",
        ["optimizers[1].kwargs", "mapping", "['lr', 1]"],
    ),
    (
        "kwargs-int-key",
        "optimizers: [{name: adamw, kwargs: {1: 2}}]\n",
        ["optimizers[0].kwargs", "keys must be strings", "1"],
    ),
    (
        "kwargs-nan",
        "optimizers: [{name: adamw, kwargs: {betas: [0.9, .nan]}}]\n",
        ["optimizers[0].kwargs.betas[1]", "nan"],
    ),
    (
        "kwargs-date",
        "optimizers: [{name: adamw, kwargs: {when: 2020-01-01}}]\n",
        ["optimizers[0].kwargs.when", "2020"],
    ),
    (
        "kwargs-self-reference",
        "optimizers: [{name: adamw, kwargs: {a: &x [*x]}}]\n",
        ["optimizers[0].kwargs.a[0]", "levels deep"],
    ),
    (
        "kwargs-billion-laughs",
        "optimizers:\n- name: adamw\n  kwargs:\n"
        "    a: &a [1,1,1,1,1,1,1,1,1,1]\n"
        "    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        "    f: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
        ["optimizers[0].kwargs.", "10000 values"],
    ),
    (
        "duplicate-top-key",
        "steps: 3\noptimizers: [adamw]\nsteps: 4\n",
        ["duplicate key 'steps'", "line 3", "first at line 1"],
    ),
    (
        "duplicate-kwarg",
        "optimizers:\n  - name: adamw\n    kwargs:\n      lr: 1e-3\n      lr: 0.1\n",
        ["optimizers[0].kwargs: duplicate key 'lr'", "line 5", "first at line 4"],
    ),
    (
        "duplicate-flow-key-deep",
        "model: {name: mlp, kwargs: {layers: [{w: 1}, {w: 2, w: 3}]}}\noptimizers: [adamw]\n",
        ["model.kwargs.layers[1]: duplicate key 'w'", "line 1"],
    ),
    (
        "duplicate-key-first-in-the-text-is-named",
        "optimizers: [{name: adamw, name: sgd}]\nseed: 1\nseed: 2\n",
        ["optimizers[0]: duplicate key 'name'"],
    ),
    (
        "seed-huge-hex-int",
        f"optimizers: [adamw]\nseed: 0x{'f' * 4000}\n",
        ["seed", "from 0 to 4294967295", "an integer of about 4817 digits"],
    ),
    (
        "kwargs-huge-hex-int",
        f"optimizers: [{{name: adamw, kwargs: {{lr: 0x{'f' * 4000}}}}}]\n",
        ["optimizers[0].kwargs.lr", "integer too large", "about 4817 digits"],
    ),
    ("steps-exponent", "optimizers: [adamw]\nsteps: 1e1\n", ["steps", "10.0 (a number)"]),
    (
        "closure-string",
        "optimizers: [{name: adamw, closure: 'yes please'}]\n",
        ["optimizers[0].closure", "'yes please'"],
    ),
    (
        "create-graph-int",
        "optimizers: [{name: adamw, create_graph: 1}]\n",
        ["optimizers[0].create_graph", "1"],
    ),
    ("bad-import-path", "optimizers: [{name: a, class: 'torch.optim:'}]\n", ["'torch.optim:'"]),
    ("bad-import-path-2", "optimizers: [{name: a, class: ':SGD'}]\n", ["':SGD'"]),
    (
        "model-unknown",
        "model: mnist_cnn\noptimizers: [adamw]\n",
        ["model", "'mnist_cnn'", "mnist-cnn"],
    ),
    ("model-list", "model: [mlp]\noptimizers: [adamw]\n", ["model", "['mlp']"]),
    (
        "model-unknown-key",
        "model: {name: mlp, hiden: 3}\noptimizers: [adamw]\n",
        ["model", "'hiden'"],
    ),
    (
        "model-kwargs-string",
        "model: {name: mlp, kwargs: wide}\noptimizers: [adamw]\n",
        ["model.kwargs", "'wide'"],
    ),
    ("data-unknown", "data: gausian\noptimizers: [adamw]\n", ["data", "'gausian'", "'gaussian'"]),
    ("batch-size-zero", "data: {batch_size: 0}\noptimizers: [adamw]\n", ["data.batch_size", "0"]),
    (
        "batch-size-huge",
        "data: {batch_size: 1000000}\noptimizers: [adamw]\n",
        ["data.batch_size", "1000000", "65536"],
    ),
    (
        "batch-size-string",
        "data: {batch_size: big}\noptimizers: [adamw]\n",
        ["data.batch_size", "'big'"],
    ),
    ("data-unknown-key", "data: {batch: 8}\noptimizers: [adamw]\n", ["data", "'batch'"]),
    ("loss-unknown", "loss: crossentropy\noptimizers: [adamw]\n", ["loss", "'crossentropy'"]),
    ("loss-mapping", "loss: {name: mse}\noptimizers: [adamw]\n", ["loss", "mapping"]),
    (
        "distributed-list",
        "distributed: [2]\noptimizers: [adamw]\n",
        ["distributed", "mapping", "[2]"],
    ),
    (
        "distributed-nproc-one",
        "distributed: {nproc: 1}\noptimizers: [adamw]\n",
        ["distributed.nproc", "from 2 to 64", "1"],
    ),
    (
        "distributed-strategy-typo",
        "distributed: {strategy: fsdp}\noptimizers: [adamw]\n",
        ["distributed.strategy", "'fsdp'", "fsdp2"],
    ),
    (
        "distributed-unknown-key",
        "distributed: {ranks: 2}\noptimizers: [adamw]\n",
        ["distributed", "'ranks'", "nproc"],
    ),
    (
        "distributed-uneven-batch",
        "data: {batch_size: 7}\ndistributed: {nproc: 2}\noptimizers: [adamw]\n",
        ["data.batch_size", "7", "2"],
    ),
    (
        "distributed-cuda",
        "device: cuda\ndistributed: {nproc: 2}\noptimizers: [adamw]\n",
        ["distributed", "cpu"],
    ),
    (
        "distributed-closure",
        "distributed: {nproc: 2}\noptimizers: [{name: lbfgs, class: 'torch.optim:LBFGS', "
        "closure: true}]\n",
        ["distributed", "'lbfgs'", "closure"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(SfdiagError) as info:
        _load_text(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "cfg.yaml") + ": ")
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


_TIMED_LOAD = """
import sys, time
from sfdiag.probe.config import load_config
from sfdiag.errors import SfdiagError
start = time.perf_counter()
try:
    load_config(sys.argv[1])
except SfdiagError as exc:
    print(time.perf_counter() - start)
    print(exc)
"""


@pytest.mark.parametrize("key", ["seed", "loss", "model", "distributed", "optimizers"])
def test_an_alias_bomb_is_refused_at_once_naming_the_key(tmp_path: Path, key: str) -> None:
    # In a subprocess, so that a regression times out instead of eating the machine.
    path = tmp_path / "bomb.yaml"
    text = alias_bomb(key)
    if key == "optimizers":
        text = text.replace("optimizers: [adamw]\n", "")
    path.write_text(text, encoding="utf-8")
    assert len(text) < 500
    done = subprocess.run(
        [sys.executable, "-c", _TIMED_LOAD, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds, message = done.stdout.split("\n", 1)
    assert float(seconds) < 1.0
    assert message.startswith(f"{path}: {key}"), message
    assert len(message) < len(str(path)) + 300, message


@pytest.mark.parametrize(
    "text",
    [
        f"optimizers: [adamw]\n? {'k' * 100_000}\n: 1\n",
        f"optimizers: [adamw]\nmodel: {'m' * 100_000}\n",
        f"optimizers: [adamw]\nmodel: 'a:{'m' * 100_000}-'\n",
        f"optimizers: [adamw]\nseed: '{'s' * 100_000}'\n",
        f"optimizers:\n  - name: adamw\n    ? {'k' * 100_000}\n    : 1\n",
        f"optimizers: {'o' * 100_000}\n",
        f"optimizers: [{{name: {'n' * 100_000}}}]\n",
        f"optimizers:\n  - name: adamw\n    kwargs:\n      ? {'k' * 100_000}\n      : .nan\n",
        "optimizers: [adamw]\nseed: &x [*x]\n",
        "optimizers: [adamw]\nseed: &x {a: *x}\n",
    ],
    ids=[
        "long-key",
        "long-model",
        "long-bad-import-path",
        "long-string-seed",
        "long-optimizer-key",
        "long-optimizers-string",
        "long-label",
        "long-kwargs-key",
        "self-referencing-list",
        "self-referencing-mapping",
    ],
)
def test_messages_show_values_bounded(tmp_path: Path, text: str) -> None:
    with pytest.raises(SfdiagError) as info:
        _load_text(tmp_path, text)
    assert len(str(info.value)) < len(str(tmp_path)) + 400, str(info.value)[:1000]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SfdiagError, match="not found") as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SfdiagError, match="directory"):
        load_config(tmp_path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04\x80\xff\xfe\x00garbage")
    with pytest.raises(SfdiagError, match="not a UTF-8 text file") as info:
        load_config(path)
    assert "model.pt" in str(info.value)


def test_nul_bytes_are_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"optimizers: [adamw]\x00\n")
    with pytest.raises(SfdiagError, match="invalid YAML") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("optimizers: [adamw]\n" + "#" * (2 << 20))
    with pytest.raises(SfdiagError, match="larger than"):
        load_config(path)


def test_deeply_nested_yaml(tmp_path: Path) -> None:
    with pytest.raises(SfdiagError, match="cfg.yaml"):
        _load_text(tmp_path, "optimizers: " + "[" * 5000 + "]" * 5000 + "\n")


@pytest.mark.skipif(
    os.name != "posix" or (hasattr(os, "geteuid") and os.geteuid() == 0),
    reason="needs file permissions that root ignores",
)
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("optimizers: [adamw]\n")
    path.chmod(0)
    try:
        with pytest.raises(SfdiagError, match="cannot read"):
            load_config(path)
    finally:
        path.chmod(0o600)


def test_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffoptimizers: [adamw]\n".encode())
    assert load_config(path).optimizers == (OptimizerSpec("adamw", "adamw", {}),)


def test_parse_config_rejects_non_mappings() -> None:
    for data in (None, [], "optimizers", 3, b"optimizers: [adamw]"):
        with pytest.raises(SfdiagError, match="<config>"):
            parse_config(data)
    with pytest.raises(SfdiagError, match="here.yaml"):
        parse_config([], "here.yaml")


# --------------------------------------------------------------------------- good inputs


def test_minimal_config_fills_defaults() -> None:
    config = parse_config({"optimizers": [{"name": "adamw"}]})
    assert config == Config(optimizers=(OptimizerSpec("adamw", "adamw", {}),))
    assert (config.seed, config.steps, config.device, config.dtype) == (0, 10, "cpu", "float32")
    assert config.model == ModelSpec("mlp", {})
    assert config.data == DataSpec("auto", 32, {})
    assert config.loss == "auto"
    assert config.schema_version == 1


def test_bare_string_forms(tmp_path: Path) -> None:
    config = _load_text(
        tmp_path,
        "model: mnist-cnn\ndata: gaussian\nloss: cross_entropy\noptimizers:\n  - adamw\n"
        "  - name: fused\n    class: sf-adamw\n    kwargs: {lr: 0.0025}\n",
    )
    assert config.model == ModelSpec("mnist-cnn", {})
    assert config.data == DataSpec("gaussian", 32, {})
    assert config.loss == "cross_entropy"
    assert config.optimizers == (
        OptimizerSpec("adamw", "adamw", {}),
        OptimizerSpec("fused", "sf-adamw", {"lr": 0.0025}),
    )


def test_full_config(tmp_path: Path) -> None:
    config = _load_text(
        tmp_path,
        """
schema_version: 1
seed: 7
steps: 3
device: auto
dtype: float64
model: {name: "mypkg.models:build", kwargs: {width: 8}}
data: {name: gaussian-regression, batch_size: 4, kwargs: {noise: 0.5}}
loss: mse
optimizers:
  - name: hess
    class: mypkg.optim:AdaHessian
    kwargs: {lr: 0.1, betas: [0.9, 0.999], nested: {a: [1, null, true, "x"]}}
    closure: true
    create_graph: true
  - name: "torch.optim:SGD"
""",
    )
    assert config.seed == 7 and config.steps == 3
    assert config.device == "auto" and config.dtype == "float64"
    assert config.model == ModelSpec("mypkg.models:build", {"width": 8})
    assert config.data == DataSpec("gaussian-regression", 4, {"noise": 0.5})
    hess, sgd = config.optimizers
    assert hess == OptimizerSpec(
        "hess",
        "mypkg.optim:AdaHessian",
        {"lr": 0.1, "betas": [0.9, 0.999], "nested": {"a": [1, None, True, "x"]}},
        closure=True,
        create_graph=True,
    )
    assert sgd == OptimizerSpec("torch.optim:SGD", "torch.optim:SGD", {})
    assert parse_config(config.to_dict()) == config


def test_floats_are_read_as_yaml_1_2_reads_them_anywhere(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML's default) reads 1e-3 as the string "1e-3": the way ML configs
    # write a learning rate must give a number.
    config = _load_text(
        tmp_path,
        "model: {name: mlp, kwargs: {init_scale: 1E5, shift: .5}}\n"
        "data: {name: gaussian, kwargs: {noise: -2.5e-4}}\n"
        "optimizers:\n  - name: adamw\n"
        "    kwargs: {lr: 1e-3, eps: +1e-8, betas: [.9, 9.99e-1], decay: 1.5e2, bias: -.25}\n",
    )
    kwargs = config.optimizers[0].kwargs
    assert kwargs == {
        "lr": 0.001,
        "eps": 1e-8,
        "betas": [0.9, 0.999],
        "decay": 150.0,
        "bias": -0.25,
    }
    numbers = [kwargs["lr"], kwargs["eps"], *kwargs["betas"], kwargs["decay"], kwargs["bias"]]
    assert all(type(v) is float for v in numbers)
    assert config.model.kwargs == {"init_scale": 100000.0, "shift": 0.5}
    assert config.data.kwargs == {"noise": -0.00025}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 0.001),
        ("1E5", 1e5),
        (".5", 0.5),
        ("-2.5e-4", -2.5e-4),
        ("1_000.5", 1000.5),
        ("3.", 3.0),
        ("12", 12),
        ("0x1f", 31),
        ("1e", "1e"),
        ("e5", "e5"),
        ("1.2.3", "1.2.3"),
        ("'1e-3'", "1e-3"),
    ],
)
def test_scalar_types_yaml_1_2_floats_and_the_rest_as_before(
    tmp_path: Path, text: str, value: object
) -> None:
    config = _load_text(tmp_path, f"optimizers: [{{name: adamw, kwargs: {{x: {text}}}}}]\n")
    got = config.optimizers[0].kwargs["x"]
    assert (type(got), got) == (type(value), value)


def test_infinity_and_nan_stay_non_finite_numbers(tmp_path: Path) -> None:
    for text in (".inf", "-.inf", ".NaN", "1e400"):
        with pytest.raises(SfdiagError, match="must be a finite number"):
            _load_text(tmp_path, f"optimizers: [{{name: adamw, kwargs: {{x: {text}}}}}]\n")


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    config = _load_text(
        tmp_path,
        "optimizers:\n"
        "  - name: a\n    class: adamw\n    kwargs: &common {lr: 1e-3, weight_decay: 0.1}\n"
        "  - name: b\n    class: adamw\n    kwargs: {<<: *common, lr: 2e-3}\n",
    )
    assert config.optimizers[1].kwargs == {"lr": 0.002, "weight_decay": 0.1}


def test_an_anchored_mapping_with_a_duplicate_is_named_once(tmp_path: Path) -> None:
    text = "optimizers:\n  - {name: a, class: adamw, kwargs: &k {lr: 1, lr: 2}}\n" + "".join(
        f"  - {{name: n{i}, class: adamw, kwargs: *k}}\n" for i in range(3)
    )
    with pytest.raises(SfdiagError, match=r"optimizers\[0\]\.kwargs: duplicate key 'lr'"):
        _load_text(tmp_path, text)


def test_empty_kwargs_key_is_empty_mapping(tmp_path: Path) -> None:
    config = _load_text(tmp_path, "optimizers:\n  - name: adamw\n    kwargs:\n      # lr: 1\n")
    assert config.optimizers[0].kwargs == {}


def test_to_dict_is_plain_json_with_yaml_key_names() -> None:
    config = parse_config(
        {"optimizers": [{"name": "x", "class": "sf-sgd", "kwargs": {"betas": (0.9, 0.99)}}]}
    )
    data = config.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["optimizers"][0] == {
        "name": "x",
        "class": "sf-sgd",
        "kwargs": {"betas": [0.9, 0.99]},
        "closure": False,
        "create_graph": False,
    }
    assert set(data) == {
        "schema_version",
        "seed",
        "steps",
        "device",
        "dtype",
        "model",
        "data",
        "loss",
        "optimizers",
    }
    assert parse_config(data) == config
    assert parse_config(yaml.safe_load(yaml.safe_dump(data))) == config


def test_config_does_not_alias_input_or_output() -> None:
    kwargs = {"lr": 0.1, "betas": [0.9, 0.99]}
    config = parse_config({"optimizers": [{"name": "adamw", "kwargs": kwargs}]})
    kwargs["betas"].append(1.0)
    assert config.optimizers[0].kwargs == {"lr": 0.1, "betas": [0.9, 0.99]}
    config.to_dict()["optimizers"][0]["kwargs"]["betas"].append(2.0)
    assert config.optimizers[0].kwargs == {"lr": 0.1, "betas": [0.9, 0.99]}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse_and_round_trip(path: Path) -> None:
    config = load_config(path)
    assert parse_config(config.to_dict()) == config


def test_shipped_configs_say_what_they_promise() -> None:
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "mnist.yaml", "weight-decay.yaml", "import-path.yaml"} <= names
    assert load_config(REPO / "configs" / "default.yaml") == default_config()
    mnist = load_config(REPO / "configs" / "mnist.yaml")
    assert mnist.model.name == "mnist-cnn" and mnist.steps == 5
    assert [o.cls for o in mnist.optimizers] == ["adamw", "sf-adamw", "sf-ref"]
    wd = {o.name: o for o in load_config(REPO / "configs" / "weight-decay.yaml").optimizers}
    assert wd["sf-sgd-wd"] == OptimizerSpec("sf-sgd-wd", "sf-sgd", {"weight_decay": 0.01})
    assert wd["sf-sgd"] == OptimizerSpec("sf-sgd", "sf-sgd", {})
    paths = load_config(REPO / "configs" / "import-path.yaml").optimizers
    assert {o.cls for o in paths} == {"sfdiag.optim:SGDScheduleFree", "torch.optim:SGD"}
    sgd = next(o for o in paths if o.cls == "torch.optim:SGD")
    assert sgd.kwargs == {"lr": 0.01, "momentum": 0.9}


def test_example_config_parses(tmp_path: Path) -> None:
    config = _load_text(tmp_path, EXAMPLE_CONFIG)
    assert parse_config(yaml.safe_load(EXAMPLE_CONFIG)) == parse_config(config.to_dict())
    assert len(config.optimizers) >= 2
    assert any(o.name != o.cls for o in config.optimizers)  # shows a label with `class:`


def test_default_config() -> None:
    config = default_config()
    assert tuple(o.name for o in config.optimizers) == DEFAULT_OPTIMIZERS
    assert all(o.cls == o.name and o.kwargs == {} for o in config.optimizers)
    assert (config.model.name, config.data.name, config.steps, config.seed) == (
        "mlp",
        "auto",
        10,
        0,
    )
    assert parse_config(config.to_dict()) == config
    for name in DEFAULT_OPTIMIZERS:
        assert name in registry.OPTIMIZERS


def test_registry_names_all_accepted() -> None:
    for name in registry.OPTIMIZERS:
        parse_config({"optimizers": [name]})
    for name in registry.MODELS:
        parse_config({"optimizers": ["adamw"], "model": name})
    for name in registry.DATASETS:
        parse_config({"optimizers": ["adamw"], "data": {"name": name}})
    for name in registry.LOSSES:
        parse_config({"optimizers": ["adamw"], "loss": name})


# --------------------------------------------------------------------------- CLI overrides


def test_parse_optimizer_list() -> None:
    assert parse_optimizer_list("adamw, sf-adamw") == ["adamw", "sf-adamw"]
    assert parse_optimizer_list(" adamw ") == ["adamw"]
    assert parse_optimizer_list("adamw,torch.optim:SGD") == ["adamw", "torch.optim:SGD"]
    for bad in ("", "  ", "adamw,,sf-adamw", "adamw,", ",adamw"):
        with pytest.raises(SfdiagError, match="--optimizers"):
            parse_optimizer_list(bad)


def test_with_overrides_replaces_what_was_given() -> None:
    base = load_config(REPO / "configs" / "weight-decay.yaml")
    config = with_overrides(
        base,
        optimizers=["adamw", "sfdiag.optim:SGDScheduleFree"],
        model="mnist-cnn",
        steps=3,
        seed=5,
        device="auto",
    )
    assert config.optimizers == (
        OptimizerSpec("adamw", "adamw", {}),
        OptimizerSpec("sfdiag.optim:SGDScheduleFree", "sfdiag.optim:SGDScheduleFree", {}),
    )
    assert (config.model, config.steps, config.seed, config.device) == (
        ModelSpec("mnist-cnn"),
        3,
        5,
        "auto",
    )
    assert config.data == base.data and config.loss == base.loss
    assert parse_config(config.to_dict()) == config
    assert with_overrides(base) == base


def test_with_overrides_keeps_model_kwargs_for_the_same_model() -> None:
    base = parse_config({"optimizers": ["adamw"], "model": {"name": "mlp", "kwargs": {"w": 3}}})
    assert with_overrides(base, model="mlp").model == ModelSpec("mlp", {"w": 3})
    assert with_overrides(base, model="mnist-cnn").model == ModelSpec("mnist-cnn", {})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"optimizers": ["sf-adamx"]}, "--optimizers: unknown optimizer 'sf-adamx' (did you mean"),
        ({"optimizers": []}, "--optimizers: no optimizers"),
        ({"optimizers": ["adamw", "adamw"]}, "--optimizers: 'adamw' is listed twice"),
        ({"optimizers": "adamw"}, "--optimizers"),
        ({"optimizers": ["torch.optim:"]}, "--optimizers: 'torch.optim:'"),
        ({"model": "resnet"}, "--model: unknown model 'resnet'"),
        ({"steps": 0}, "--steps: must be from 1"),
        ({"steps": True}, "--steps: must be an integer"),
        ({"steps": 10**9}, "--steps: must be from 1 to 100000"),
        ({"seed": -3}, "--seed: must be from 0"),
        ({"device": "gpu"}, "--device: must be one of cpu, cuda, auto, got 'gpu'"),
    ],
)
def test_with_overrides_errors(kwargs: dict, expected: str) -> None:
    with pytest.raises(SfdiagError) as info:
        with_overrides(default_config(), **kwargs)
    assert expected in str(info.value)


# --------------------------------------------------------------------------- properties

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["adamw", "sf-adamw", "mlp", "auto", "cpu", "float64", "pkg:Obj", "gpu"])
)
_keys = st.sampled_from(
    ["optimizers", "name", "class", "kwargs", "closure", "create_graph", "seed", "steps"]
    + ["device", "dtype", "model", "data", "batch_size", "loss", "schema_version", "lr"]
) | st.text(max_size=6)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(_keys | st.integers(), children, max_size=5)
    ),
    max_leaves=25,
)
_optimizer_entries = st.sampled_from(list(registry.OPTIMIZERS) + ["bogus"]) | st.fixed_dictionaries(
    {"name": st.sampled_from(["adamw", "x", "sf-sgd"]) | _scalars},
    optional={
        "class": st.sampled_from(["sf-adamw", "torch.optim:SGD", "nope", "a:"]) | _scalars,
        "kwargs": _values,
        "closure": _scalars,
        "create_graph": _scalars,
    },
)
_near_configs = st.fixed_dictionaries(
    {"optimizers": st.lists(_optimizer_entries, max_size=4) | _values},
    optional={
        "seed": _scalars,
        "steps": _scalars | st.integers(min_value=0, max_value=200_000),
        "device": _scalars,
        "dtype": _scalars,
        "model": _values,
        "data": st.fixed_dictionaries({}, optional={"name": _scalars, "batch_size": _scalars})
        | _values,
        "loss": _scalars,
        "schema_version": _scalars,
        "extra": _values,
    },
)

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
_kwargs = st.dictionaries(st.text(max_size=8), _json, max_size=3)
_valid_optimizer = st.sampled_from(list(registry.OPTIMIZERS)) | st.fixed_dictionaries(
    {
        "name": st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1),
        "class": st.sampled_from([*registry.OPTIMIZERS, "torch.optim:SGD", "a.b:C.d"]),
    },
    optional={"kwargs": _kwargs, "closure": st.booleans(), "create_graph": st.booleans()},
)
_valid_configs = st.fixed_dictionaries(
    {
        "optimizers": st.lists(
            _valid_optimizer,
            min_size=1,
            max_size=4,
            unique_by=lambda o: o if isinstance(o, str) else o["name"],
        )
    },
    optional={
        "schema_version": st.just(1),
        "seed": st.integers(0, 2**32 - 1),
        "steps": st.integers(1, 100_000),
        "device": st.sampled_from(["cpu", "cuda", "auto"]),
        "dtype": st.sampled_from(["float32", "float64", "bfloat16"]),
        "model": st.sampled_from(list(registry.MODELS))
        | st.fixed_dictionaries({}, optional={"name": st.just("mnist-cnn"), "kwargs": _kwargs}),
        "data": st.sampled_from(list(registry.DATASETS))
        | st.fixed_dictionaries(
            {}, optional={"batch_size": st.integers(1, 65536), "kwargs": _kwargs | st.none()}
        ),
        "loss": st.sampled_from([*registry.LOSSES, "pkg.losses:focal"]),
    },
)


def _check_valid(config: Config) -> None:
    assert isinstance(config, Config) and config.optimizers
    assert len({o.name for o in config.optimizers}) == len(config.optimizers)
    data = config.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert parse_config(data) == config


@settings(max_examples=300, deadline=None)
@given(_values | _near_configs)
def test_parse_config_only_raises_sfdiag_error(data: object) -> None:
    try:
        config = parse_config(data, "prop.yaml")
    except SfdiagError as exc:
        assert str(exc).startswith("prop.yaml")
        return
    _check_valid(config)


@settings(max_examples=200, deadline=None)
@given(_valid_configs)
def test_valid_configs_parse_and_round_trip(data: dict) -> None:
    config = parse_config(data)
    _check_valid(config)
    assert parse_config(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    assert config.seed == data.get("seed", 0) and config.steps == data.get("steps", 10)


_yaml_fragments = st.sampled_from(
    [
        "optimizers:",
        " - adamw",
        "  - name: x",
        "    class: sf-sgd",
        "    kwargs: {lr: 0.1}",
        "steps: 3",
        "seed: -1",
        "model: mnist-cnn",
        "data: {batch_size: 8}",
        "&a [*a]",
        "!!binary zz",
        "!!python/name:os.system",
        "2001-13-99",
        "- [",
        "{",
        ": :",
        "\t",
        "'",
        '"\\x"',
        "%YAML 1.1",
        "---",
        "...",
        "? complex",
        "<<: *a",
        "!!float nope",
        "0x",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_yaml_fragments | st.text(max_size=10), max_size=10).map("\n".join)
    | st.text(max_size=60)
)
def test_loader_only_raises_sfdiag_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except SfdiagError as exc:
        assert str(exc).startswith(str(path))
        return
    _check_valid(config)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_loader_on_random_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.bin"
    path.write_bytes(raw)
    try:
        _check_valid(load_config(path))
    except SfdiagError:
        pass


# --------------------------------------------------------------------------- import paths


def test_import_paths_find_the_current_directory_and_leave_sys_path_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sfdiag_cwd_module.py").write_text("VALUE = 42\n")
    monkeypatch.chdir(tmp_path)
    # sys.path as the `sfdiag` console script has it: neither '' nor the cwd on it
    console = [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)]
    monkeypatch.setattr(sys, "path", console)
    monkeypatch.delitem(sys.modules, "sfdiag_cwd_module", raising=False)
    try:
        assert registry.import_object("sfdiag_cwd_module:VALUE", "model.name") == 42
        assert sys.path == console and sys.path is console
        with pytest.raises(SfdiagError, match="no module named 'sfdiag_no_such_module'"):
            registry.import_object("sfdiag_no_such_module:x", "model.name")
        assert sys.path == console
    finally:
        sys.modules.pop("sfdiag_cwd_module", None)


# --------------------------------------------------------------------------- import hygiene


def test_importing_config_does_not_import_torch() -> None:
    code = "import sfdiag.probe.config, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_distributed_round_trips_and_older_configs_keep_their_dict(tmp_path: Path) -> None:
    config = _load_text(
        tmp_path, "data: {batch_size: 8}\ndistributed: {strategy: fsdp2}\noptimizers: [adamw]\n"
    )
    assert config.distributed == DistributedSpec(nproc=2, strategy="fsdp2")
    assert config.to_dict()["distributed"] == {"nproc": 2, "strategy": "fsdp2"}
    assert parse_config(config.to_dict()) == config
    plain = _load_text(tmp_path, "optimizers: [adamw]\n")
    assert plain.distributed is None and "distributed" not in plain.to_dict()
    with pytest.raises(SfdiagError, match="cpu"):
        with_overrides(config, device="cuda")
