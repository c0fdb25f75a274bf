"""YAML -> a validated, typed, frozen run spec (docs/config.md, schema_version 1).

The only module that reads YAML (``ConfigLoader``, a ``yaml.SafeLoader`` that reads floats
as YAML 1.2 does and refuses duplicate keys), and it never imports torch. Every problem
raises ``SfdiagError`` with one message naming the source (file or option), the key path
(``optimizers[1].kwargs``) and the offending value. Registry names are checked here; import
paths ("pkg.mod:attr") are only checked for their form and are imported later, by whoever
builds the run. Messages show values bounded (``errors.shown``): an exploding YAML alias or a
huge integer costs nothing to report.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from sfdiag.errors import SfdiagError, shown
from sfdiag.probe import registry

SCHEMA_VERSION = 1
DEFAULT_OPTIMIZERS = ("adamw", "sf-adamw", "sf-ref", "sf-sgd")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64", "bfloat16")
MAX_SEED = 2**32 - 1  # what every seeding API (torch, numpy, random) accepts
MAX_STEPS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_FILE_BYTES = 1 << 20
_MAX_DEPTH = 32  # of nested kwargs values; also stops self-referencing YAML anchors
_MAX_NODES = 10_000  # per kwargs mapping; stops "billion laughs" alias expansion
_MAX_INT_BITS = 1024  # of an integer in kwargs: as large as a float goes

_TOP_KEYS = (
    "schema_version",
    "seed",
    "steps",
    "device",
    "dtype",
    "model",
    "data",
    "loss",
    "optimizers",
    "distributed",
)
_OPTIMIZER_KEYS = ("name", "class", "kwargs", "closure", "create_graph")
_MODEL_KEYS = ("name", "kwargs")
_DATA_KEYS = ("name", "batch_size", "kwargs")
_DISTRIBUTED_KEYS = ("nproc", "strategy")
STRATEGIES = ("ddp", "fsdp2")
MAX_NPROC = 64


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # unique label, shown in every output
    cls: str  # registry key or "pkg.mod:Class" (YAML key: ``class``)
    kwargs: dict[str, Any] = field(default_factory=dict)  # read-only by convention
    closure: bool = False  # step(closure) with a closure that recomputes the loss
    create_graph: bool = False  # backward(create_graph=True), for Hessian-based optimizers


@dataclass(frozen=True)
class ModelSpec:
    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    name: str = "auto"
    batch_size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistributedSpec:
    """Probe under sharding: ``nproc`` local ranks (gloo, CPU), the model wrapped in
    DistributedDataParallel (``ddp``) or FSDP2's ``fully_shard`` (``fsdp2``), each rank
    fed its share of every batch."""

    nproc: int = 2
    strategy: str = "ddp"


@dataclass(frozen=True)
class Config:
    optimizers: tuple[OptimizerSpec, ...]
    seed: int = 0
    steps: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    loss: str = "auto"
    schema_version: int = SCHEMA_VERSION
    distributed: DistributedSpec | None = None  # None: one process

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data, in the YAML's key names.

        Every key is written out, defaults included; ``parse_config(c.to_dict()) == c``.
        """
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "seed": self.seed,
            "steps": self.steps,
            "device": self.device,
            "dtype": self.dtype,
            "model": {"name": self.model.name, "kwargs": _copy(self.model.kwargs)},
            "data": {
                "name": self.data.name,
                "batch_size": self.data.batch_size,
                "kwargs": _copy(self.data.kwargs),
            },
            "loss": self.loss,
            "optimizers": [
                {
                    "name": spec.name,
                    "class": spec.cls,
                    "kwargs": _copy(spec.kwargs),
                    "closure": spec.closure,
                    "create_graph": spec.create_graph,
                }
                for spec in self.optimizers
            ],
        }
        if self.distributed is not None:  # only then: older configs' dicts stay as they were
            out["distributed"] = {
                "nproc": self.distributed.nproc,
                "strategy": self.distributed.strategy,
            }
        return out


EXAMPLE_CONFIG = """\
# sfdiag config, schema_version 1. Only `optimizers` is required; every other key below
# shows its default. `sfdiag list` prints the registry names.
schema_version: 1
seed: 0                 # int >= 0: every optimizer gets the same initial model and batches
steps: 10               # optimizer steps per probe, 1 .. 100000
device: cpu             # cpu | cuda | auto
dtype: float32          # float32 | float64 | bfloat16

model:
  name: mlp             # registry name (mlp, mnist-cnn) or import path "pkg.mod:factory"
  kwargs: {}            # keyword arguments for the model factory

data:
  name: auto            # auto = synthetic data matched to the model; or a registry name
  batch_size: 32        # 1 .. 65536
  kwargs: {}

loss: auto              # auto | cross_entropy | nll | mse | import path "pkg.mod:fn"

optimizers:             # at least one; each runs on a fresh copy of the same model
  - adamw               # a bare registry name: label and class are both "adamw"
  - name: fused         # a unique label, shown in every output
    class: sf-adamw     # registry name or import path "pkg.mod:OptimizerClass"; may be
                        # left out when the label is itself a registry name
    kwargs: {lr: 0.0025}
  - name: sf-ref
    kwargs: {lr: 0.0025}
  # - name: mine
  #   class: mypkg.optim:MyOptimizer   # imported when the probe starts (trusted code)
  #   kwargs: {lr: 0.001}
  #   closure: false      # true: step(closure), the closure recomputing the loss
  #   create_graph: false # true: backward(create_graph=True), for Hessian-based optimizers

# distributed:          # probe under sharding: nproc local ranks (gloo, CPU), each fed its
#   nproc: 2            # share of every batch (batch_size must split evenly)
#   strategy: ddp       # ddp (DistributedDataParallel) | fsdp2 (fully_shard, DTensor grads)
"""


# --------------------------------------------------------------------------- public API


def default_config() -> Config:
    """The embedded default: mlp, auto data, 10 steps, seed 0, the DEFAULT_OPTIMIZERS."""
    return Config(optimizers=tuple(OptimizerSpec(name, name) for name in DEFAULT_OPTIMIZERS))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read one YAML file and validate it; every failure is a SfdiagError."""
    source = os.fspath(path)
    return _parse_text(_read(source), source)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate already-loaded data (a mapping) into a Config."""
    if data is None:
        raise SfdiagError(f"{source}: the config is empty; it needs at least an `optimizers:` list")
    if not isinstance(data, Mapping):
        raise SfdiagError(
            f"{source}: the top level must be a mapping of keys ({', '.join(_TOP_KEYS)}), "
            f"got {_show(data)}"
        )
    _check_keys(data, _TOP_KEYS, source)
    if "optimizers" not in data:
        raise SfdiagError(
            f"{source}: missing required key 'optimizers' (a list of at least one optimizer)"
        )
    if "schema_version" in data:
        version = data["schema_version"]
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise SfdiagError(
                f"{source}: schema_version: this sfdiag reads schema_version "
                f"{SCHEMA_VERSION}, got {_show(version)}"
            )
    default = Config(optimizers=())
    config = Config(
        optimizers=_optimizers(data["optimizers"], source),
        seed=_int(data.get("seed", default.seed), 0, MAX_SEED, f"{source}: seed"),
        steps=_int(data.get("steps", default.steps), 1, MAX_STEPS, f"{source}: steps"),
        device=_choice(data.get("device", default.device), DEVICES, f"{source}: device"),
        dtype=_choice(data.get("dtype", default.dtype), DTYPES, f"{source}: dtype"),
        model=_model(data.get("model", default.model.name), source),
        data=_data(data.get("data", default.data.name), source),
        loss=_registry_name(data.get("loss", default.loss), "loss", f"{source}: loss"),
        distributed=_distributed(data.get("distributed"), source),
    )
    if config.distributed is not None:
        _check_distributed(config, source)
    return config


def parse_optimizer_list(text: str) -> list[str]:
    """``"adamw, sf-adamw"`` -> ``["adamw", "sf-adamw"]`` (the ``--optimizers`` option)."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise SfdiagError("--optimizers: no optimizers given; e.g. --optimizers adamw,sf-adamw")
    if "" in items:
        raise SfdiagError(
            f"--optimizers: empty item in {shown(text)}; give comma-separated names, "
            "e.g. adamw,sf-adamw"
        )
    return items


def with_overrides(
    config: Config,
    *,
    optimizers: list[str] | None = None,
    model: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> Config:
    """``config`` with command-line options applied, validated like the loader.

    Optimizers given as registry names or import paths become specs labelled by that name,
    with no kwargs. A new model name drops the old model's kwargs.
    """
    changes: dict[str, Any] = {}
    if optimizers is not None:
        changes["optimizers"] = _override_optimizers(optimizers)
    if model is not None:
        name = _registry_name(model, "model", "--model")
        if name != config.model.name:
            changes["model"] = ModelSpec(name)
    if steps is not None:
        changes["steps"] = _int(steps, 1, MAX_STEPS, "--steps")
    if seed is not None:
        changes["seed"] = _int(seed, 0, MAX_SEED, "--seed")
    if device is not None:
        changes["device"] = _choice(device, DEVICES, "--device")
    result = replace(config, **changes)
    if result.distributed is not None:
        _check_distributed(result, "the command line")
    return result


# --------------------------------------------------------------------------- reading

_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.2's floats, which is what ML configs mean: YAML 1.1 (PyYAML's) wants a dot and a
# signed exponent, so it reads `lr: 1e-3` as the string "1e-3". Every form 1.1 reads as a
# float still is one (1_000.5, sexagesimal 1:30.5, .inf, .nan).
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _DuplicateKey(Exception):
    """A mapping names one key twice; the message lacks only the source."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no object construction) with YAML 1.2 floats, refusing a key
    that appears twice in one mapping (PyYAML silently keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicate_keys(node)
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, root: yaml.Node) -> None:
        # Iterative, each node once (aliases share nodes, so an alias bomb costs what its
        # text costs), in document order: a shared node is named where it is written.
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        visited: set[int] = set()
        earliest: tuple[int, str] | None = None  # the duplicate that comes first in the text
        while stack:
            node, path = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            children: list[tuple[yaml.Node, str]] = []
            if isinstance(node, yaml.SequenceNode):
                children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            elif isinstance(node, yaml.MappingNode):
                first: dict[Any, yaml.Node] = {}
                for key_node, value_node in node.value:
                    if key_node.tag == _MERGE_TAG:  # `<<: *defaults`: keys may override it
                        children.append((value_node, path))
                        continue
                    name = _path_key(str(key_node.value)) if _is_scalar(key_node) else "?"
                    children.append((value_node, f"{path}.{name}" if path else name))
                    if not _is_scalar(key_node):
                        continue  # an unhashable key: the constructor says so
                    key = self.construct_object(key_node)
                    if key not in first:
                        first[key] = key_node
                    elif earliest is None or key_node.start_mark.index < earliest[0]:
                        message = _duplicate_message(name, path, key_node, first[key])
                        earliest = (key_node.start_mark.index, message)
            stack.extend(reversed(children))
        if earliest is not None:
            raise _DuplicateKey(earliest[1])


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _is_scalar(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode)


def _duplicate_message(name: str, path: str, again: yaml.Node, first: yaml.Node) -> str:
    def at(node: yaml.Node) -> str:
        return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"

    where = f"{path}: " if path else ""
    return (
        f"{where}duplicate key {name!r} at {at(again)} (first at {at(first)}); "
        "a key may appear only once in a mapping"
    )


def _path_key(key: str) -> str:
    """A key as shown in a key path: long keys cut short."""
    return key if len(key) <= 40 else key[:37] + "..."


def load_yaml(text: str) -> Any:
    """Parse one YAML document with ``ConfigLoader``; errors are yaml's (and _DuplicateKey)."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read(source: str) -> str:
    if not os.path.exists(source):
        raise SfdiagError(f"{source}: config file not found")
    if os.path.isdir(source):
        raise SfdiagError(f"{source}: is a directory, not a config file")
    try:
        with open(source, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SfdiagError(f"{source}: cannot read the config file: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise SfdiagError(f"{source}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SfdiagError(
            f"{source}: not a UTF-8 text file (undecodable byte 0x{raw[exc.start]:02x} at "
            f"offset {exc.start}); a config is a YAML text file"
        ) from exc


def _parse_text(text: str, source: str) -> Config:
    if not text.strip():
        raise SfdiagError(f"{source}: the config file is empty; it needs at least `optimizers:`")
    try:
        data = load_yaml(text)
    except _DuplicateKey as exc:
        raise SfdiagError(f"{source}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        problem = " ".join(problem.split())
        raise SfdiagError(f"{source}: invalid YAML{where}: {problem}") from exc
    except yaml.YAMLError as exc:  # ReaderError (control characters), ...
        raise SfdiagError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise SfdiagError(f"{source}: invalid YAML: nested too deeply") from exc
    except Exception as exc:  # yaml's constructors raise ValueError, OverflowError, ...
        raise SfdiagError(f"{source}: invalid YAML value: {exc}") from exc
    if data is None:
        raise SfdiagError(
            f"{source}: the config file holds nothing (only comments or null); "
            "it needs at least `optimizers:`"
        )
    return parse_config(data, source)


# --------------------------------------------------------------------------- validation


def _show(value: object) -> str:
    """The offending value, in YAML's words and bounded, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    text = shown(value)
    kind = {int: "an integer", float: "a number", str: "a string"}.get(type(value))
    if isinstance(value, Mapping):
        kind = "a mapping"
    elif isinstance(value, (list, tuple)):
        kind = "a list"
    return f"{text} ({kind or type(value).__name__})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(data: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    """``where`` is "source" or "source: key.path"; unknown keys are errors."""
    for key in data:
        if key in allowed:
            continue
        hint = registry.did_you_mean(key, allowed) if isinstance(key, str) else ""
        if not hint and "kwargs" in allowed and "optimizers" not in allowed:
            example = _path_key(str(key))
            hint = f" (keyword arguments go under `kwargs:`, e.g. kwargs: {{{example}: ...}})"
        named = shown(key) if isinstance(key, str) else _show(key)
        raise SfdiagError(f"{where}: unknown key {named}{hint}; allowed keys: {', '.join(allowed)}")


def _int(value: object, lo: int, hi: int, where: str) -> int:
    if not _is_int(value):
        raise SfdiagError(f"{where}: must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise SfdiagError(f"{where}: must be from {lo} to {hi}, got {shown(value)}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise SfdiagError(f"{where}: must be true or false, got {_show(value)}")
    return value


def _choice(value: object, choices: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = registry.did_you_mean(value, choices) if isinstance(value, str) else ""
        raise SfdiagError(f"{where}: must be one of {', '.join(choices)}, got {_show(value)}{hint}")
    return value


def _label(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise SfdiagError(f"{where}: must be {what}, got {_show(value)}")
    return value


def _registry_name(value: object, kind: str, where: str) -> str:
    """A registry key of ``kind`` or a well-formed import path 'package.module:attribute'."""
    what = f"a {kind} name from the registry or an import path 'package.module:attribute'"
    name = _label(value, what, where)
    registry.check_name(kind, name, where)
    if registry.is_import_path(name):
        module, _, attr = name.partition(":")
        if not all(part.isidentifier() for part in [*module.split("."), *attr.split(".")]):
            raise SfdiagError(
                f"{where}: {shown(name)} is not an import path of the form "
                "'package.module:attribute'"
            )
    return name


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(item) for item in value]
    return value


def _kwargs(value: object, where: str) -> dict[str, Any]:
    """A mapping with string keys and plain JSON values, copied (tuples become lists)."""
    if value is None:  # `kwargs:` with every line below it commented out
        return {}
    if not isinstance(value, Mapping):
        raise SfdiagError(
            f"{where}: must be a mapping of keyword arguments (e.g. {{lr: 0.001}}), "
            f"got {_show(value)}"
        )
    return _plain(value, where, 0, [_MAX_NODES])


def _plain(value: object, where: str, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if depth > _MAX_DEPTH or budget[0] < 0:
        path = where if len(where) <= 120 else where[:117] + "..."
        raise SfdiagError(
            f"{path}: more than {_MAX_DEPTH} levels deep or {_MAX_NODES} values "
            "(a self-referencing or exploding YAML anchor?)"
        )
    if _is_int(value) and value.bit_length() > _MAX_INT_BITS:
        # beyond any float; it would not even go into the JSON report (4300 digits at most)
        raise SfdiagError(f"{where}: integer too large, got {shown(value)}")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SfdiagError(f"{where}: must be a finite number, got {value}")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SfdiagError(f"{where}: keys must be strings, got key {_show(key)}")
            out[key] = _plain(item, f"{where}.{_path_key(key)}", depth + 1, budget)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1, budget) for i, item in enumerate(value)]
    raise SfdiagError(
        f"{where}: unsupported value {_show(value)}; use a number, string, boolean, null, "
        "list or mapping"
    )


def _model(value: object, source: str) -> ModelSpec:
    if not isinstance(value, Mapping):  # `model: mnist-cnn`
        return ModelSpec(_registry_name(value, "model", f"{source}: model"))
    _check_keys(value, _MODEL_KEYS, f"{source}: model")
    return ModelSpec(
        name=_registry_name(value.get("name", ModelSpec.name), "model", f"{source}: model.name"),
        kwargs=_kwargs(value.get("kwargs"), f"{source}: model.kwargs"),
    )


def _data(value: object, source: str) -> DataSpec:
    if not isinstance(value, Mapping):  # `data: gaussian`
        return DataSpec(_registry_name(value, "data", f"{source}: data"))
    _check_keys(value, _DATA_KEYS, f"{source}: data")
    batch_size = value.get("batch_size", DataSpec.batch_size)
    return DataSpec(
        name=_registry_name(value.get("name", DataSpec.name), "data", f"{source}: data.name"),
        batch_size=_int(batch_size, 1, MAX_BATCH_SIZE, f"{source}: data.batch_size"),
        kwargs=_kwargs(value.get("kwargs"), f"{source}: data.kwargs"),
    )


def _distributed(value: object, source: str) -> DistributedSpec | None:
    where = f"{source}: distributed"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SfdiagError(
            f"{where}: must be a mapping like {{nproc: 2, strategy: ddp}}, got {_show(value)}"
        )
    _check_keys(value, _DISTRIBUTED_KEYS, where)
    return DistributedSpec(
        nproc=_int(value.get("nproc", DistributedSpec.nproc), 2, MAX_NPROC, f"{where}.nproc"),
        strategy=_choice(
            value.get("strategy", DistributedSpec.strategy), STRATEGIES, f"{where}.strategy"
        ),
    )


def _check_distributed(config: Config, source: str) -> None:
    """What a probe under sharding needs of the rest of the config."""
    spec = config.distributed
    if config.device == "cuda":
        raise SfdiagError(
            f"{source}: distributed: probes run their ranks on the CPU (gloo); "
            "use device: cpu (or auto)"
        )
    if config.data.batch_size % spec.nproc:
        raise SfdiagError(
            f"{source}: data.batch_size: {config.data.batch_size} does not split into "
            f"{spec.nproc} equal shares (distributed.nproc); use a multiple of {spec.nproc}"
        )
    closures = [o.name for o in config.optimizers if o.closure or o.create_graph]
    if closures:
        raise SfdiagError(
            f"{source}: distributed: optimizer {shown(closures[0])} needs a closure or "
            "create_graph, which a distributed probe does not run; probe it in one process"
        )


def _optimizers(value: object, source: str) -> tuple[OptimizerSpec, ...]:
    where = f"{source}: optimizers"
    if isinstance(value, str):
        raise SfdiagError(
            f"{where}: must be a list, got {_show(value)}; write `optimizers: [{_path_key(value)}]`"
        )
    if not isinstance(value, (list, tuple)) or not value:
        raise SfdiagError(f"{where}: must be a list of at least one optimizer, got {_show(value)}")
    specs: list[OptimizerSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(value):
        spec = _optimizer(entry, f"{where}[{i}]")
        if spec.name in seen:
            raise SfdiagError(
                f"{where}[{i}]: duplicate label {shown(spec.name)} "
                f"(also optimizers[{seen[spec.name]}]); labels must be unique: add `name:` "
                "with a label of its own"
            )
        seen[spec.name] = i
        specs.append(spec)
    return tuple(specs)


def _optimizer(entry: object, where: str) -> OptimizerSpec:
    if isinstance(entry, str):  # `- adamw`
        name = _registry_name(entry, "optimizer", where)
        return OptimizerSpec(name, name)
    if not isinstance(entry, Mapping):
        raise SfdiagError(
            f"{where}: must be a registry name or a mapping with `name:` (and `class:`, "
            f"`kwargs:`), got {_show(entry)}"
        )
    _check_keys(entry, _OPTIMIZER_KEYS, where)
    if "name" not in entry:
        raise SfdiagError(f"{where}: missing required key 'name' (a unique label)")
    name = _label(entry["name"], "a non-empty label", f"{where}.name")
    if "class" in entry:
        cls = _registry_name(entry["class"], "optimizer", f"{where}.class")
    elif name in registry.OPTIMIZERS or registry.is_import_path(name):
        cls = _registry_name(name, "optimizer", f"{where}.name")
    else:
        hint = registry.did_you_mean(name, tuple(registry.OPTIMIZERS))
        raise SfdiagError(
            f"{where}.name: {shown(name)} is not a registry optimizer{hint}, so `class:` is "
            "required: add `class:` with a registry name or an import path "
            "'package.module:Class'"
        )
    return OptimizerSpec(
        name=name,
        cls=cls,
        kwargs=_kwargs(entry.get("kwargs"), f"{where}.kwargs"),
        closure=_bool(entry.get("closure", False), f"{where}.closure"),
        create_graph=_bool(entry.get("create_graph", False), f"{where}.create_graph"),
    )


def _override_optimizers(names: object) -> tuple[OptimizerSpec, ...]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise SfdiagError(f"--optimizers: expected a list of names, got {_show(names)}")
    if not names:
        raise SfdiagError("--optimizers: no optimizers given; e.g. --optimizers adamw,sf-adamw")
    specs: list[OptimizerSpec] = []
    for name in names:
        name = _registry_name(name, "optimizer", "--optimizers")
        if any(spec.name == name for spec in specs):
            raise SfdiagError(f"--optimizers: {shown(name)} is listed twice")
        specs.append(OptimizerSpec(name, name))
    return tuple(specs)
