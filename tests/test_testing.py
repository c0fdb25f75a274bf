"""sfdiag.testing: the helpers users call from their own test suites."""

from __future__ import annotations

import math

import hostile_models
import mutators
import pytest
import torch

from sfdiag.optim import AdamWScheduleFree, AdamWScheduleFreeReference
from sfdiag.testing import assert_step_preserves_grads, check_step


@pytest.mark.parametrize(
    "factory",
    [
        torch.optim.AdamW,
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        mutators.Clean,
        AdamWScheduleFreeReference,
    ],
    ids=["adamw", "sgd", "clean-mutator", "sf-ref"],
)
def test_clean_optimizers_pass(factory):
    result = assert_step_preserves_grads(factory)
    assert result.verdict == "clean" and len(result.steps) == 3
    assert result.params_with_grad == 4


@pytest.mark.parametrize(
    ("factory", "verdict", "fingerprint"),
    [
        (mutators.AdamNormalize, "mutated", "adam-normalized"),
        (AdamWScheduleFree, "mutated", "adam-normalized"),  # starts in eval mode: put in train
        (mutators.ScaleGrads, "mutated", "scaled"),
        (mutators.ScaleGradsViaData, "mutated", "scaled"),
        (mutators.FoldWeightDecay, "mutated", "weight-decay"),
        (mutators.SignGrads, "mutated", "sign"),
        (mutators.ZeroGrads, "mutated", "zeroed"),
        (mutators.ReplaceGrads, "replaced", None),
        (mutators.ClearGrads, "cleared", None),
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v),
)
def test_mutators_fail_with_a_clear_message(factory, verdict, fingerprint):
    with pytest.raises(AssertionError) as caught:
        assert_step_preserves_grads(factory)
    message = str(caught.value)
    assert f"verdict {verdict}" in message
    if fingerprint:
        assert f"fingerprint {fingerprint}" in message
    assert factory.__name__ in message
    assert "0.weight (16, 8)" in message  # which params, with their pre -> post norms
    assert "global grad norm before step()" in message and " -> " in message


def test_check_step_returns_the_result_without_asserting():
    result = check_step(mutators.AdamNormalize, steps=2)
    assert result.flagged and result.fingerprint == "adam-normalized"
    assert result.cls == "mutators:AdamNormalize"
    assert [s.step for s in result.steps] == [0, 1]
    assert all(s.loss is not None and s.params_mutated == 4 for s in result.steps)
    assert {p.name for p in result.params} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_custom_model_inputs_and_loss():
    def model_factory():
        return torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.Flatten())

    x = torch.randn(4, 2, 10)
    target = torch.randn(4, 24)
    result = check_step(
        mutators.SignGrads,
        model_factory,
        steps=2,
        inputs=x,
        loss_fn=lambda out: torch.nn.functional.mse_loss(out, target),
    )
    assert result.fingerprint == "sign"
    assert {p.name for p in result.params} == {"0.weight", "0.bias"}


def test_tuple_inputs_are_positional_arguments():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 2)
            self.b = torch.nn.Linear(5, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    result = check_step(torch.optim.Adam, Two, inputs=(torch.randn(4, 3), torch.randn(4, 5)))
    assert result.verdict == "clean" and result.params_with_grad == 4


def test_a_model_without_a_linear_needs_inputs():
    with pytest.raises(ValueError, match="inputs="):
        check_step(torch.optim.SGD, lambda: torch.nn.Conv1d(1, 1, 1))


def test_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    first = check_step(mutators.ScaleGrads, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = check_step(mutators.ScaleGrads, seed=3)
    assert first.steps == again.steps
    assert check_step(mutators.ScaleGrads, seed=4).steps != first.steps


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps"):
        check_step(torch.optim.SGD, steps=0)


def test_a_closure_optimizer_is_checked_with_a_closure():
    # LBFGS.step(closure) requires one: the check passes one that recomputes the grads
    result = assert_step_preserves_grads(lambda ps: torch.optim.LBFGS(ps, max_iter=3))
    assert result.verdict == "clean" and len(result.steps) == 3


def test_a_closure_can_be_asked_for_and_mutations_still_show():
    result = check_step(mutators.ScaleGrads, closure=True)  # SGD's step calls it
    assert (result.verdict, result.fingerprint) == ("mutated", "scaled")


@pytest.mark.parametrize(
    "factory",
    [mutators.DuckTyped, mutators.StepOnly, mutators.NoSuperInit],
    ids=lambda f: f.__name__,
)
def test_an_optimizer_without_torch_step_hooks_is_checked_around_step(factory):
    # not a torch optimizer (StepOnly has no zero_grad either), or one that skipped
    # Optimizer.__init__: snapshots taken around step()
    result = assert_step_preserves_grads(factory)
    assert result.verdict == "clean" and result.params_with_grad == 4


def test_a_mutation_without_torch_step_hooks_fails_the_check():
    with pytest.raises(AssertionError, match="verdict mutated, fingerprint scaled"):
        assert_step_preserves_grads(lambda ps: mutators.StepOnly(ps, scale=0.5))


@pytest.mark.parametrize(
    ("model_factory", "layer"),
    [
        (hostile_models.lazy_last_model, "2 (LazyLinear)"),
        (lambda: torch.nn.Sequential(torch.nn.LazyLinear(4)), "0 (LazyLinear)"),
        (
            lambda: torch.nn.Sequential(
                torch.nn.LazyConv2d(2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4)
            ),
            "0 (LazyConv2d)",
        ),
    ],
    ids=["lazy-last", "lazy-linear-first", "lazy-conv-first"],
)
def test_a_model_with_a_lazy_layer_first_needs_inputs(model_factory, layer):
    with pytest.raises(ValueError, match="pass inputs=") as caught:
        check_step(torch.optim.SGD, model_factory)
    assert f"its layer {layer} is lazy" in str(caught.value)


def test_a_lazy_model_given_inputs_is_checked():
    result = assert_step_preserves_grads(
        torch.optim.AdamW, hostile_models.lazy_last_model, inputs=torch.randn(4, 1, 28, 28)
    )
    assert result.verdict == "clean" and result.params_with_grad == 4


def test_nan_only_grads_fail_the_check_as_undetermined():
    def nan_loss(output):
        return output.pow(2).mean() * math.nan

    result = check_step(mutators.ScaleGrads, loss_fn=nan_loss)
    assert (result.verdict, result.undetermined) == ("clean", True)
    with pytest.raises(AssertionError, match="could not tell whether step\\(\\) leaves p.grad"):
        assert_step_preserves_grads(torch.optim.SGD, loss_fn=nan_loss)
