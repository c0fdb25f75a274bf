"""torch's C++ reads (``tensor_facts.cpp``, ``torch_reads.py``): built once for this module
(~12 s), then every answer compared with the one torch's Python attributes give, and the
build's own path (in the background, the lock, a failure, the handover) with a stand-in
compiler that copies the library built here."""

from __future__ import annotations

import array
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from conftest import TESTS_CACHE

from sfdiag.step_audit import fused, torch_reads


def _buildable() -> str | None:
    """Why torch's C++ reads cannot be built here, or None."""
    include = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "autograd"
    python_include = sysconfig.get_paths().get("include") or ""
    if fused._library() is None or fused._KERNEL.checks is None:
        return "no checks' module here"
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        return "no C++ compiler"
    if not (include / "python_variable.h").is_file():
        return "a torch without its headers"
    if not os.path.isfile(os.path.join(python_include, "Python.h")):
        return "no Python headers"
    return None


@pytest.fixture(scope="module")
def library() -> Path:
    """The library, from the tests' cache (``now``: built by the session's start, waited for,
    or built here)."""
    why = _buildable()
    if why is not None:
        pytest.skip(why)
    cache = TESTS_CACHE
    checks = fused._KERNEL.checks
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFDIAG_CACHE_DIR", str(cache))
        patch.setenv("SFDIAG_TORCH_READS", "now")
        assert torch_reads.attach(checks) == "on"
        command, _ = torch_reads._command()
        path = torch_reads.library_path(command)
    checks.use_fast(None, None, None, None)
    assert path.is_file() and not path.with_suffix(".lock").exists()
    return path


@pytest.fixture(params=["torch", "attributes"])
def reads(request, library):
    """The checks' module reading through torch's C++ API, or its Python attributes."""
    checks = fused._KERNEL.checks
    if request.param == "torch":
        assert torch_reads._use(checks, library)
    yield request.param
    checks.use_fast(None, None, None, None)


def _both(library: Path, function):
    """``function()`` with the C++ reads on, then off."""
    checks = fused._KERNEL.checks
    assert torch_reads._use(checks, library)
    try:
        fast = function()
    finally:
        checks.use_fast(None, None, None, None)
    return fast, function()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 2, 64, 65, 2000])
def test_torch_reads_give_the_attributes_sums(dtype, count, library):
    """The same tensors, the same sums to the bit, on the module's stack (64) or off it."""
    gen = torch.Generator().manual_seed(count)
    sizes = torch.randint(1, 600, (count,), generator=gen).tolist()
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    fast, slow = _both(library, lambda: fused.plain_squares_host(grads))
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert fast.tobytes() == slow.tobytes()


ODD_ONES = {
    "not contiguous": lambda: torch.randn(8, 8).t(),
    "another dtype": lambda: torch.randn(8, dtype=torch.float64),
    "a second dtype": lambda: torch.randn(8, dtype=torch.float16),
    "too large": lambda: torch.randn(fused.SQUARES_MAX_ELEMENTS + 1),
    "a subclass": lambda: torch.nn.Parameter(torch.randn(8)),
    "sparse": lambda: torch.randn(4, 4).to_sparse(),
    "a strided view": lambda: torch.randn(4, 4)[:, :2],
    "an offset view": lambda: torch.randn(40)[8:24],
    "empty": lambda: torch.randn(0),
    "on the meta device": lambda: torch.empty(8, device="meta"),
    "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
}


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("odd_one", list(ODD_ONES), ids=list(ODD_ONES))
def test_torch_reads_refuse_and_read_what_the_attributes_do(odd_one, plain, library):
    """One unusual tensor among plain ones: both paths read all or refuse all (or raise
    alike), and where they read, the same bits."""
    grads = [torch.randn(16), torch.randn(3, 5), ODD_ONES[odd_one]()]

    def read():
        try:
            return fused.plain_squares_host(grads, plain=plain)
        except Exception as exc:  # (torch's own error, from either path)
            return type(exc)

    fast, slow = _both(library, read)
    if isinstance(fast, array.array) and isinstance(slow, array.array):
        assert fast.tobytes() == slow.tobytes()
    else:
        assert fast == slow


@pytest.mark.parametrize("count", [2, 200])
@pytest.mark.parametrize("odd_one", [None, *ODD_ONES], ids=["none", *ODD_ONES])
def test_all_strided_answers_as_type_and_layout_do(odd_one, count, library, monkeypatch):
    """``all_strided`` (a snapshot's test that its grads are their own views, and with
    ``contiguous`` a group's rows' that they are them): through torch's C++ API, the
    attributes, and Python without the checks' module, the answer of the type, layout and
    contiguity over every tensor, on the module's stack or off it."""
    tensors = [torch.randn(3) for _ in range(count)]
    if odd_one is not None:
        tensors.insert(count // 2, ODD_ONES[odd_one]())
    for contiguous in (False, True):
        expected = all(
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and (not contiguous or t.is_contiguous())
            for t in tensors
        )
        fast, slow = _both(library, lambda c=contiguous: fused.all_strided(tensors, c))
        with monkeypatch.context() as patch:
            patch.setattr(fused, "_checks", lambda: None)
            assert fast is slow is fused.all_strided(tensors, contiguous) is expected


def test_torch_reads_give_each_params_grad_and_version(library):
    """``grads_of``: the same grad objects, versions and plainness; subclassed params and
    grads, a missing grad and a non-leaf read as their attributes say."""
    from test_watch import Marked, five_params

    params = five_params()
    marked = torch.nn.Parameter(torch.zeros(4))
    marked.grad = torch.ones(4).as_subclass(Marked)
    plain_tensor = torch.zeros(3, requires_grad=True)
    plain_tensor.grad = torch.full((3,), 2.0)
    non_leaf = torch.zeros(2, requires_grad=True) * 2
    cases = {
        "with a None": params,
        "all plain": params[:4],
        "a subclassed grad": [params[0], marked],
        "a subclassed param": [torch.zeros(2).as_subclass(Marked), params[1]],
        "a plain tensor": [plain_tensor, params[3]],
        "many": params[:4] * 500,
    }
    for name, group in cases.items():
        (grads, versions, plain), (grads2, versions2, plain2) = _both(
            library, lambda g=group: fused.grads_of(g)
        )
        assert all(a is b for a, b in zip(grads, grads2, strict=True)), name
        assert (versions, plain) == (versions2, plain2), name
    (found, versions, plain), _ = _both(library, lambda: fused.grads_of(params))
    assert versions == [0, 0, 2, 0, 0] and not plain and found[4] is None
    with pytest.warns(UserWarning, match="not a leaf"):
        (found, _, _), _ = _both(library, lambda: fused.grads_of([non_leaf]))
    assert found == [None]


def test_torch_reads_tell_intact_grads_as_the_attributes_do(library):
    """``fused.intact`` (the post-step read's test): the same answer from both paths."""
    from test_watch import _intact_cases

    for name, (_, refs, versions, moved) in _intact_cases().items():
        fast, slow = _both(library, lambda r=refs, v=versions, m=moved: fused.intact(r, v, m))
        assert (fast is None) == (slow is None), name
        if fast is not None:
            assert all(a is b for a, b in zip(fast, slow, strict=True)), name


def test_torch_reads_keep_no_reference_to_what_they_read(reads):
    """A thousand calls, refusals and errors among them: every count is what it was."""
    checks = fused._KERNEL.checks
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(70)]  # (off its stack)
    for p in params[:-1]:
        p.grad = torch.randn(16)
    grads = [p.grad for p in params[:-1]]
    odd = torch.randn(4, 4).t()
    watched = [*grads, *params, odd, torch.float32, torch.strided, None]
    before = [sys.getrefcount(x) for x in watched]
    for _ in range(1000):
        assert checks.squares(grads, array.array("d", bytes(8 * len(grads))), True)
        assert not checks.squares([*grads, odd], array.array("d", bytes(8 * 70)), True)
        found, versions, plain = checks.grads(params)
        assert not plain and found[:-1] == grads and versions == [0] * 70
        refs = checks.weakrefs(found)
        assert checks.intact(refs, versions, range(70)) == found
        assert checks.intact(refs, [1, *versions[1:]], range(70)) is None  # (not as left)
        with pytest.raises(ValueError):
            checks.squares(grads, array.array("d", bytes(8)), True)
    del found, versions, refs
    after = [sys.getrefcount(x) for x in watched]  # (not over a slice: it holds each one)
    assert after[:-1] == before[:-1]
    assert abs(after[-1] - before[-1]) < 100  # (None's count is everyone's; not a 1,000 off)


def _audited_loop(tmp_path: Path, name: str) -> dict:
    """An in-process audit (what ``sfdiag run`` runs in a script's process) of 40 seeded
    steps of a model of 300 parameter tensors logging a clipped norm and a rate a step: the
    report it saves."""
    from torch.utils.tensorboard import SummaryWriter

    import sfdiag
    from sfdiag.optim import AdamWScheduleFree

    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(150)])  # side by side
    opt = AdamWScheduleFree(model.parameters(), lr=1e-3)
    opt.train()
    writer = SummaryWriter(str(tmp_path / name))
    with sfdiag.audit(report=tmp_path / f"{name}.json", show=False):
        for step in range(40):
            x = torch.randn(4, 8)
            loss = sum(layer(x).square().mean() for layer in model)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            writer.add_scalar("train/grad_norm", norm.item(), step)
            opt.step()
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
    writer.close()
    report = json.loads((tmp_path / f"{name}.json").read_text())
    report.pop("timing", None)
    return report


def test_an_audit_reports_the_same_with_torch_reads(library, tmp_path):
    """The same seeded loop audited with torch's C++ reads and without: the same report."""
    fast, slow = _both(library, lambda: _audited_loop(tmp_path, f"run{len(os.listdir(tmp_path))}"))
    assert fast == slow
    metrics = {m["name"]: m["verdict"] for m in fast["metrics"]}
    assert metrics == {"train/grad_norm": "correct", "train/lr": "correct"}
    assert fast["results"][0]["fingerprint"] == "adam-normalized"


def _stand_in_compiler(tmp_path: Path, library: Path, exit_code: int = 0) -> str:
    """A 'compiler' that copies ``library`` to its ``-o`` (its last argument), or fails."""
    script = tmp_path / "cxx"
    copy = f'for last; do :; done; cp "{library}" "$last"'  # (sh: the last argument)
    body = copy if exit_code == 0 else "echo 'no such header' >&2"
    script.write_text(f"#!/bin/sh\nsleep 0.5\n{body}\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _wait_unlocked(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while path.with_suffix(".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_build_runs_in_the_background_and_hands_over(library, tmp_path, monkeypatch):
    """``auto`` with nothing in the cache: "building" at once, one build under a lock (a
    second process asking meanwhile starts none), the library moved into the cache whole,
    then handed to this process's checks; the next process finds it."""
    checks = fused._KERNEL.checks
    monkeypatch.setenv("CXX", _stand_in_compiler(tmp_path, library))
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SFDIAG_TORCH_READS", "auto")
    command, _ = torch_reads._command()
    path = torch_reads.library_path(command)
    try:
        assert torch_reads.attach(checks) == "building"
        assert path.with_suffix(".lock").exists() and not path.exists()
        assert torch_reads._start_build(command, path) is None  # locked: no second build
        _wait_unlocked(path)
        deadline = time.monotonic() + 10
        while torch_reads.status() != "on" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert torch_reads.status() == "on" and path.is_file()
        assert list(path.parent.iterdir()) == [path]  # no partial file, no lock left
        assert torch_reads.attach(checks) == "on"  # as the next process finds it
    finally:
        checks.use_fast(None, None, None, None)


@pytest.mark.parametrize(
    "failure", ["the compiler fails", "its output does not load"], ids=["fails", "no library"]
)
def test_a_failed_build_says_why_and_is_not_tried_again(failure, library, tmp_path, monkeypatch):
    """A build that fails, or whose output is no library: the status says so, the note in
    the cache says why, and the next process starts no build of its own; the attributes
    still read."""
    checks = fused._KERNEL.checks
    if failure == "the compiler fails":
        compiler, why = _stand_in_compiler(tmp_path, library, exit_code=1), "no such header"
    else:
        garbage = tmp_path / "not-a-library.so"
        garbage.write_text("not a shared object")
        compiler, why = _stand_in_compiler(tmp_path, garbage), "does not load"
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SFDIAG_TORCH_READS", "now")
    command, _ = torch_reads._command()
    path = torch_reads.library_path(command)
    status = torch_reads.attach(checks)
    failed = path.with_suffix(".failed")
    assert status == f"unavailable: the build failed (see {failed})"
    assert why in failed.read_text() and not path.with_suffix(".lock").exists()
    assert torch_reads.attach(checks) == status  # no second try
    squares = fused.plain_squares_host([torch.randn(5)])
    assert squares is not None and squares[0] > 0


def test_a_cache_others_may_write_is_neither_loaded_from_nor_built_into(
    library, tmp_path, monkeypatch
):
    checks = fused._KERNEL.checks
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(cache))
    monkeypatch.setenv("SFDIAG_TORCH_READS", "now")
    command, _ = torch_reads._command()
    path = torch_reads.library_path(command)
    shutil.copy(library, path)  # (a library that would load)
    status = torch_reads.attach(checks)
    assert status == "unavailable: the cache is not this user's alone to write"
    assert not torch_reads._use(checks, path)
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no lock, no build


def test_a_stale_lock_is_taken_over_and_off_builds_nothing(library, tmp_path, monkeypatch):
    checks = fused._KERNEL.checks
    monkeypatch.setenv("CXX", _stand_in_compiler(tmp_path, library))
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path / "cache"))
    command, _ = torch_reads._command()
    path = torch_reads.library_path(command)
    monkeypatch.setenv("SFDIAG_TORCH_READS", "off")
    assert torch_reads.attach(checks) == "off" and not path.parent.exists()
    path.parent.mkdir()
    lock = path.with_suffix(".lock")
    lock.touch()
    old = time.time() - torch_reads.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    monkeypatch.setenv("SFDIAG_TORCH_READS", "now")
    try:
        assert torch_reads.attach(checks) == "on"
    finally:
        checks.use_fast(None, None, None, None)


def test_the_build_process_imports_neither_torch_nor_sfdiag(tmp_path):
    """The background build runs ``torch_reads.py`` as a script (``-I``): stdlib only."""
    done = subprocess.run(
        [sys.executable, "-I", "-c",
         f"import runpy, sys; sys.argv = ['x']; "
         f"runpy.run_path({str(Path(torch_reads.__file__))!r}, run_name='not_main'); "
         f"print(sorted(m for m in sys.modules if m.startswith(('torch', 'sfdiag'))))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
