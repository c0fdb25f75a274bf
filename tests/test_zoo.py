"""Real optimizers by import path, as a user names them: each classified as it behaves.

torch.optim's optimizers never write to p.grad (their weight decay is out of place);
the public schedulefree release mutates like sfdiag's own forms; torch_optimizer's
AdaBelief folds weight decay into p.grad in place.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sfdiag.probe.api import run_probe
from sfdiag.probe.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _verdicts(name: str) -> dict[str, tuple[str, str | None]]:
    report = run_probe(load_config(CONFIGS / name))
    return {r.optimizer: (r.verdict, r.fingerprint) for r in report.results}


def test_torch_optim_never_mutates_grads():
    found = _verdicts("torch-optim.yaml")
    errors = {name for name, (verdict, _) in found.items() if verdict == "error"}
    assert errors == {"sparse-adam"}  # needs sparse grads: an error row, not a crash
    assert {verdict for name, (verdict, _) in found.items() if name not in errors} == {"clean"}
    assert len(found) == 18


EXPECTED_THIRD_PARTY = {
    "schedulefree-adamw": ("mutated", "adam-normalized"),
    "schedulefree-adamw-loop": ("mutated", "adam-normalized"),
    "schedulefree-adamw-ref": ("clean", None),
    "schedulefree-sgd-wd": ("mutated", "weight-decay"),
    "schedulefree-radam": ("mutated", "adam-normalized"),
    "lion": ("clean", None),
    "lamb": ("clean", None),
    "adabelief": ("mutated", "weight-decay"),
    "ranger": ("clean", None),
    "adahessian": ("clean", None),
    "sgdw": ("clean", None),
}


def test_third_party_optimizers_are_classified():
    for module in ("schedulefree", "lion_pytorch", "torch_optimizer"):
        pytest.importorskip(module)
    assert _verdicts("third-party.yaml") == EXPECTED_THIRD_PARTY
