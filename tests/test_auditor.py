"""sfdiag.step_audit.auditor: which parameters the snapshot before ``step()`` samples.

The kind of a mutation is named from the grad's sampled elements and the parameter's at the
same places (weight decay folded in is ``grad + wd * param``), read before ``step()``
moves the parameter. A clean optimizer never needs them, and on a large model sampling cold
parameters costs 1.5–2 ms a step at 100M: only the params whose grads the last audited step mutated
are sampled (all of them at the first).
"""

from __future__ import annotations

import weakref

import mutators
import pytest
import torch

from sfdiag.step_audit.auditor import StepAuditor


class FoldFromStep(mutators.FoldWeightDecay):
    """Clean until its ``start``-th step, weight decay folded into the grads from then on."""

    def __init__(self, params, start: int):
        super().__init__(params, lr=0.01, wd=0.1)
        self.start, self.count = start, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        if self.count >= self.start:
            return super().step(closure)
        return torch.optim.SGD.step(self, closure)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def audited_steps(optimizer, model, steps: int, **kw):
    """``steps`` audited steps through the auditor's hooks, called by hand so that the
    snapshot before each ``step()`` can be looked at: (whether it sampled each param, the
    step's verdicts, its fingerprints) per step."""
    auditor = StepAuditor(**kw)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    seen = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        auditor.pre_step(optimizer)
        _, before, _ = auditor._pending[id(optimizer)]
        sampled = [fp.param_sample is not None for fp in before]
        optimizer.step()
        auditor.post_step(optimizer)
        records = auditor.observations[-1].params
        seen.append((sampled, [r.verdict for r in records], [r.fingerprint for r in records]))
    return seen


@pytest.mark.parametrize("forensics", [False, True])
def test_a_clean_optimizer_samples_its_params_at_the_first_step_only(forensics):
    model = _model()
    seen = audited_steps(torch.optim.AdamW(model.parameters()), model, 3, forensics=forensics)
    wanted = [True, True, True] if forensics else [True, False, False]
    assert [all(s) for s, _, _ in seen] == wanted
    assert [any(s) for s, _, _ in seen] == wanted


def test_a_mutating_optimizer_samples_them_every_step_and_names_its_kind():
    model = _model()
    seen = audited_steps(mutators.FoldWeightDecay(model.parameters(), wd=0.1), model, 3)
    for sampled, verdicts, kinds in seen:
        assert all(sampled) and verdicts == ["mutated"] * 4 and kinds == ["weight-decay"] * 4


def test_an_optimizer_that_starts_mutating_is_named_from_its_second_mutated_step():
    """Its first mutated step finds no param samples (the step before was clean): the kind
    of that one step goes without them; from the next one on it is named as always."""
    model = _model()
    seen = audited_steps(FoldFromStep(model.parameters(), start=3), model, 5)
    assert [all(s) for s, _, _ in seen] == [True, False, False, True, True]
    assert [any(s) for s, _, _ in seen] == [True, False, False, True, True]
    assert [v for _, v, _ in seen] == [["clean"] * 4] * 2 + [["mutated"] * 4] * 3
    assert [k for _, _, k in seen][3:] == [["weight-decay"] * 4] * 2


def test_without_fingerprint_kinds_no_param_is_sampled():
    model = _model()
    seen = audited_steps(mutators.ScaleGrads(model.parameters()), model, 2, fingerprint_kinds=False)
    assert [any(s) for s, _, _ in seen] == [False, False]
    assert [v for _, v, _ in seen] == [["mutated"] * 4] * 2


def test_a_new_optimizer_at_a_dead_ones_address_starts_afresh():
    """The history is kept by ``id(optimizer)``, with a weak reference that says whose it
    is: a new optimizer Python put at a collected one's address samples every param."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    auditor = StepAuditor()
    params = auditor.params_of(optimizer)

    class Gone:
        pass

    gone = Gone()
    auditor._mutated[id(optimizer)] = (weakref.ref(optimizer), set())
    assert auditor._params_to_sample(optimizer, params) == set()
    auditor._mutated[id(optimizer)] = (weakref.ref(gone), set())
    del gone  # its reference is dead now, as a collected optimizer's would be
    assert auditor._params_to_sample(optimizer, params) is True


def _many_small_layers() -> torch.nn.Module:
    """24 ``Linear(4, 4)`` with Tanh between: two groups of 24 same-shaped small grads."""
    torch.manual_seed(0)
    layers = []
    for _ in range(24):
        layers += [torch.nn.Linear(4, 4), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


GROUP_OPTIMIZERS = {
    "sf-adamw": lambda ps: __import__("sfdiag.optim", fromlist=["x"]).AdamWScheduleFree(
        ps, lr=0.01, warmup_steps=0
    ),
    "fold-wd": lambda ps: mutators.FoldWeightDecay(ps, lr=0.01, wd=0.1),
    "adam-normalize": lambda ps: mutators.AdamNormalize(ps, lr=0.01),
    "states-not-alike": lambda ps: mutators.OddStates(ps, lr=0.01),
    "scale": lambda ps: mutators.ScaleGrads(ps, lr=0.01),
    "replace": lambda ps: mutators.ReplaceGrads(ps, lr=0.01),
    "clear": lambda ps: mutators.ClearGrads(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
}


@pytest.mark.parametrize("state_with_grads", [False, True], ids=["cpu", "accelerator"])
@pytest.mark.parametrize("name", list(GROUP_OPTIMIZERS))
def test_a_group_read_as_rows_says_what_each_grad_read_alone_says(
    name, state_with_grads, monkeypatch
):
    """Small grads of one shape are read, compared and fitted as the rows of their group's
    arrays; read one at a time (no groups: every grad its own fingerprint) the audit finds
    the same verdict and kind of mutation for every grad at every step, and the same norms.
    ``accelerator``: the optimizer's state sampled with the grads, as rows, as off the CPU."""
    from sfdiag.step_audit import snapshot

    monkeypatch.setattr(
        StepAuditor, "_state_with_grads", staticmethod(lambda params: state_with_grads)
    )
    runs = []
    for small in (snapshot.SMALL_TENSOR, 0):  # groups; none
        monkeypatch.setattr(snapshot, "SMALL_TENSOR", small)
        model = _many_small_layers()
        optimizer = GROUP_OPTIMIZERS[name](list(model.parameters()))
        if hasattr(optimizer, "train"):
            optimizer.train()
        auditor = StepAuditor()
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        seen = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            auditor.pre_step(optimizer)
            optimizer.step()
            auditor.post_step(optimizer)
            observed = auditor.observations[-1]
            seen.append(
                (
                    [(r.verdict, r.fingerprint, r.pre_norm, r.post_norm) for r in observed.params],
                    observed.pre_norm,
                    observed.post_norm,
                    observed.params_mutated,
                )
            )
        runs.append(seen)
    grouped, alone = runs
    assert grouped == alone
    verdicts = {v for records, *_ in grouped for v, *_ in records}
    expected = {"adamw": {"clean"}, "replace": {"replaced"}, "clear": {"cleared"}}
    assert verdicts == expected.get(name, {"mutated"})
    if expected.get(name) is None:  # a kind named for every mutated grad
        assert all(kind for records, *_ in grouped for _, kind, *_ in records)


@pytest.mark.parametrize("rows", [1, 5, 23])
@pytest.mark.parametrize("name", ["sf-adamw", "fold-wd", "states-not-alike"])
def test_a_group_compared_in_chunks_says_what_it_says_whole(name, rows, monkeypatch):
    """A group's changed grads are compared in arrays of at most ``BATCH_ROWS`` rows (a
    step hook's memory stays bounded): cut into chunks of any size, a short one last, the
    verdicts, changes and kinds of every grad are those of the group compared whole."""
    from sfdiag.step_audit import changes

    runs = []
    for batch in (changes.BATCH_ROWS, rows):
        monkeypatch.setattr(changes, "BATCH_ROWS", batch)
        model = _many_small_layers()
        optimizer = GROUP_OPTIMIZERS[name](list(model.parameters()))
        if hasattr(optimizer, "train"):
            optimizer.train()
        auditor = StepAuditor().attach(optimizer)
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()
        runs.append(
            [
                (r.verdict, r.max_rel_change, r.fingerprint)
                for o in auditor.observations
                for r in o.params
            ]
        )
    whole, chunked = runs
    assert chunked == whole
    assert {verdict for verdict, *_ in whole} == {"mutated"}


def test_each_param_groups_eps_fits_its_own_grads(monkeypatch):
    """The Adam fit reads each param group's ``eps`` for its grads (one number for the step
    where every group has the same, else one a param): two groups of one shape with eps
    1e-8 and 1e-3, whose grads span 1e-3 to 1e2 (eps moves the small ones' denominators),
    are both named adam-normalized; fitted with the first group's eps for all, the
    second's are not (the test can fail)."""
    from sfdiag.step_audit import changes

    def kinds(eps_of):
        monkeypatch.setattr(changes, "_eps_of", eps_of)
        torch.manual_seed(0)
        layers = [torch.nn.Linear(16, 16) for _ in range(24)]
        model = torch.nn.Sequential(*layers)
        groups = [
            {"params": [p for m in layers[:12] for p in m.parameters()], "eps": 1e-8},
            {"params": [p for m in layers[12:] for p in m.parameters()], "eps": 1e-3},
        ]
        optimizer = mutators.AdamNormalize(groups, lr=0.01)
        auditor = StepAuditor().attach(optimizer)
        noise = torch.Generator().manual_seed(3)
        for p in model.parameters():
            magnitude = 10 ** (torch.rand(p.shape, generator=noise) * 5 - 3)
            p.grad = torch.randn(p.shape, generator=noise) * magnitude
        optimizer.step()
        return [r.fingerprint for r in auditor.observations[-1].params]

    both = kinds(changes._eps_of)
    assert both == ["adam-normalized"] * len(both)
    first_for_all = kinds(lambda optimizer: 1e-8)
    assert first_for_all[: len(both) // 2] == both[: len(both) // 2]
    assert "adam-normalized" not in first_for_all[len(both) // 2 :]


def test_a_groups_fits_never_stack_a_state_once_every_row_is_named(monkeypatch):
    """sf-adamw's state is ``z`` (signed: no second moment), then ``exp_avg_sq``; a group's
    fits read a state when they come to it, a square's first: every row named by
    ``exp_avg_sq`` (grads well above its eps), ``z`` is never stacked, and the kinds are
    those found with every state read in the optimizer's order."""
    from sfdiag.optim import AdamWScheduleFree
    from sfdiag.step_audit import changes

    read: list[str] = []
    real = changes._StateRows.__getitem__

    def getitem(self, name):
        read.append(name)
        return real(self, name)

    def every_state(held, shape):
        return {name: changes._state_rows(name, tensors, shape) for name, tensors in held.items()}

    kinds = []
    for lazy in (True, False):
        monkeypatch.setattr(changes._StateRows, "__getitem__", getitem)
        if not lazy:
            monkeypatch.setattr(changes, "_StateRows", every_state)
        torch.manual_seed(0)
        params = [p for _ in range(20) for p in torch.nn.Linear(8, 8).parameters()]
        optimizer = AdamWScheduleFree(params, lr=0.01, warmup_steps=0)
        optimizer.train()
        auditor = StepAuditor()
        noise = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=noise) * 1e-3
            auditor.pre_step(optimizer)
            optimizer.step()
            auditor.post_step(optimizer)
        kinds.append([r.fingerprint for r in auditor.observations[-1].params])
    assert list(optimizer.state[params[0]]) == ["z", "exp_avg_sq"]
    assert read and set(read) == {"exp_avg_sq"}
    assert kinds[0] == kinds[1] == ["adam-normalized"] * len(params)


@pytest.mark.parametrize("optimizer", ["adamw", "sf-adamw"])
def test_an_audited_step_keeps_no_tracked_object_per_tensor(optimizer):
    """What the snapshot before ``step()`` holds through the step, and what the step's
    observation keeps, are no object per tensor that the garbage collector tracks (a weak
    reference a grad, a Size a parameter): the step's own collections carried such objects
    by the thousand into the oldest generation, and full collections of the whole process
    came every few dozen audited steps. The 60 tensors more of 40 layers than of 10 add
    none: at most a stray object or two (the fewest over five steps; the test runner's own
    thread may make one meanwhile), where one a tensor would be sixty."""
    import gc

    from sfdiag.optim import AdamWScheduleFree

    held = {}
    for count in (10, 40):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(count)])
        params = list(model.parameters())
        opt = (
            torch.optim.AdamW(params, lr=1e-3)
            if optimizer == "adamw"
            else AdamWScheduleFree(params, lr=1e-3)
        )
        if optimizer == "sf-adamw":
            opt.train()
        auditor = StepAuditor().attach(opt)
        during: list[int] = []
        opt.register_step_pre_hook(lambda *_, _during=during: _during.append(len(gc.get_objects())))
        counted = []
        for step in range(7):  # the first two not counted: state built, every param known
            for p in params:
                p.grad = torch.randn_like(p)
            gc.collect()
            before = len(gc.get_objects())
            opt.step()
            gc.collect()
            if step >= 2:
                counted.append((during[-1] - before, len(gc.get_objects()) - before))
        assert auditor.observations[-1].params[0].verdict == (
            "clean" if optimizer == "adamw" else "mutated"
        )
        held[count] = tuple(map(min, zip(*counted, strict=True)))
    assert all(abs(a - b) <= 2 for a, b in zip(held[10], held[40], strict=True)), held
