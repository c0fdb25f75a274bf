"""sfdiag.step_audit.kernel_cache: the C kernels are compiled once per machine and kept in
sfdiag's cache; a later process loads them (no compiler runs) and reads the same bits."""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

from sfdiag.step_audit import fused, kernel_cache

CHECKS_FILE = f"{fused.CHECKS_MODULE}{importlib.machinery.EXTENSION_SUFFIXES[0]}"

#: what a fresh process reads with the kernels: the fused read's norm and checksum of a large
#: grad, the checks' sums of small ones, and where its modules were loaded from
READ = """
import json, torch
from sfdiag.step_audit import fused, snapshot
g = torch.Generator().manual_seed(3)
p = torch.nn.Parameter(torch.randn(641, 1023, generator=g))
p.grad = torch.randn(641, 1023, generator=g)
fp = snapshot.take([p])[0]
small = [torch.randn(n, generator=g) for n in (3, 100, 4097)]
print(json.dumps({
    "layout": fp.layout, "norm": snapshot.float_bits(fp.norm), "checksum": repr(fp.checksum),
    "squares": [float(x) for x in fused.plain_squares_host(small)],
    "checks": getattr(fused._KERNEL.checks, "__file__", None), "broken": fused.broken(),
}))
"""


def _read(cache: Path) -> dict:
    env = cli_env(SFDIAG_CACHE_DIR=str(cache), SFDIAG_FUSED="1", SFDIAG_TORCH_READS="off")
    done = subprocess.run(
        [sys.executable, "-c", READ], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def compiled():
    if fused._library() is None:
        pytest.skip(f"no C compiler here: {fused.broken()}")


def test_the_next_process_loads_the_kept_build_and_reads_the_same_bits(tmp_path, compiled):
    first = _read(tmp_path)  # compiles, and keeps the build
    (kept,) = tmp_path.glob("kernels-*")
    assert not list(tmp_path.glob("*.partial"))
    second = _read(tmp_path)  # loads it
    assert first.pop("broken") is second.pop("broken") is None
    first.pop("checks")  # (from a temporary folder)
    loaded = second.pop("checks")
    if loaded is not None:  # (where Python's headers are)
        assert Path(loaded).parent == kept
        assert {p.name for p in kept.iterdir()} == {fused.LIBRARY, CHECKS_FILE}
    assert first == second and first["layout"] == "fused"


def test_a_kept_build_loads_without_a_compiler(tmp_path, monkeypatch, compiled):
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path))
    fused._compile()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(fused, "_compile_library", no_compiler)
    monkeypatch.setattr(fused, "_start_checks", no_compiler)
    lib, checks = fused._compile()
    assert lib.sfdiag_squares_f32 is not None
    if checks is not None:
        assert Path(checks.__file__).parent.parent == tmp_path


def test_a_kept_build_that_does_not_load_is_built_again(tmp_path, monkeypatch, compiled):
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path))
    fused._compile()
    (kept,) = tmp_path.glob("kernels-*")
    (kept / fused.LIBRARY).write_bytes(b"not a library")
    lib, _ = fused._compile()  # dropped, compiled, kept again
    assert lib.sfdiag_squares_f32 is not None
    assert ctypes.CDLL(str(kept / fused.LIBRARY)).sfdiag_squares_f32 is not None


def test_a_cache_that_cannot_be_written_leaves_the_build_as_without_one(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(blocked))
    if fused._library() is None:
        pytest.skip(f"no C compiler here: {fused.broken()}")
    lib, _ = fused._compile()
    assert lib.sfdiag_squares_f32 is not None
    assert blocked.read_text() == "not a folder"


def test_keep_leaves_a_build_another_process_kept_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path / "cache"))
    where = kernel_cache.folder([b"source"], ["cc"])
    (tmp_path / "mine.so").write_bytes(b"mine")
    (tmp_path / "theirs.so").write_bytes(b"theirs")
    kernel_cache.keep({"lib.so": tmp_path / "theirs.so"}, where)
    kernel_cache.keep({"lib.so": tmp_path / "mine.so"}, where)
    assert (where / "lib.so").read_bytes() == b"theirs"
    assert [p.name for p in where.parent.iterdir()] == [where.name]  # no partial copy left
    assert kernel_cache.kept(where, ["lib.so", "other.so"]) == {"lib.so": where / "lib.so"}
    assert kernel_cache.kept(where.with_name("kernels-none"), ["lib.so"]) is None


@pytest.mark.parametrize(
    ("parts", "compiler"),
    [
        ([b"source, edited"], ["cc"]),
        ([b"source"], ["cc", "-O1"]),
        ([b"source"], ["/nonexistent/cc"]),
        ([b"sour", b"ce"], ["cc"]),
    ],
)
def test_whatever_shapes_the_build_names_a_folder_of_its_own(parts, compiler, monkeypatch):
    assert kernel_cache.folder(parts, compiler) != kernel_cache.folder([b"source"], ["cc"])
    assert kernel_cache.folder([b"source"], ["cc"]) == kernel_cache.folder([b"source"], ["cc"])


def test_another_cpu_names_a_folder_of_its_own(monkeypatch):
    here = kernel_cache.folder([b"source"], ["cc"])
    monkeypatch.setattr(kernel_cache, "_cpu", lambda: "another CPU's flags")
    assert kernel_cache.folder([b"source"], ["cc"]) != here


def test_a_build_in_a_folder_others_may_write_is_neither_kept_nor_loaded(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(shared))
    where = kernel_cache.folder([b"source"], ["cc"])
    (tmp_path / "lib.so").write_bytes(b"built")
    kernel_cache.keep({"lib.so": tmp_path / "lib.so"}, where)
    assert not where.exists()
    where.mkdir()
    (where / "lib.so").write_bytes(b"planted")
    assert kernel_cache.kept(where, ["lib.so"]) is None


def test_an_upgraded_compiler_behind_a_wrapper_names_a_folder_of_its_own(tmp_path, monkeypatch):
    for name in ("wrapper", "realcc"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    before = kernel_cache.folder([b"source"], ["wrapper", "realcc", "-O2"])
    (tmp_path / "realcc").write_text("#!/bin/sh\n# a newer one\n")
    assert kernel_cache.folder([b"source"], ["wrapper", "realcc", "-O2"]) != before
