"""The grads one step changed, compared as the rows of arrays: how much each changed, and
the kind of each in-place mutation (``verdict.fingerprint_rows``), a few numpy calls for
many grads instead of a fit each."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sfdiag.step_audit import snapshot, verdict
from sfdiag.step_audit.rows import GroupRows, Snapshot


def _rows(tensors: list[torch.Tensor]) -> Any:
    """``tensors`` (of one length) as the rows of one float64 numpy array of its own: one
    stack, one conversion (one tensor: the conversion alone, no stack's copy beside it)."""
    rows = _stacked_rows(tensors)
    return rows.to("cpu", torch.float64, copy=len(tensors) == 1).numpy()


def _stacked_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` as the rows of one tensor: one tensor is a view of itself (its caller
    copies), more are stacked."""
    if len(tensors) == 1:
        return tensors[0].reshape(1, -1)
    return torch.stack(tensors).reshape(len(tensors), -1)  # samples are flat: no view each


#: the grads a step changed are compared in arrays of this many rows at most (bounded
#: memory in a step hook, whatever the model: 1 MiB a float64 array of full samples, a few
#: of them at once; fewer rows cost a mutating step on 2,000 tiny tensors ~10 % more host
#: time, in the Python and ctypes calls of each array)...
BATCH_ROWS = 512
#: ... where there are this many of one sample length; fewer, one at a time (a model of a
#: few large tensors keeps the memory of one grad's fits, under 1 % of its parameters)
BATCH_MIN = 16


def _chunks(groups: Any) -> list[list[int]]:
    """``groups`` (lists of grad indices) cut into the rows of one array each (see
    ``BATCH_ROWS``, ``BATCH_MIN``)."""
    out = []
    for indices in groups:
        size = BATCH_ROWS if len(indices) >= BATCH_MIN else 1
        out += [indices[start : start + size] for start in range(0, len(indices), size)]
    return out


class _NotAlike(Exception):
    """A group's state tensors of one name are not all of its params' shape (found where
    they are stacked): its fits give way to each param's (``ChangedGrads._kinds``)."""


def _state_rows(name: str, tensors: list[torch.Tensor], shape: torch.Size | None = None) -> Any:
    """``_rows`` of the samples of ``tensors`` (state ``name``): the elements
    ``snapshot.sample_positions`` names. Tensors no larger than a sample are stacked whole
    (no view a tensor); larger ones by their samples' views, so that nothing more than the
    samples is ever copied; None where no row can be a second moment (``_state_array``).
    ``shape``: the params', where the tensors' shapes are not yet known to be it
    (``states_alike``): ``_NotAlike`` where one is not."""
    if tensors[0].numel() <= snapshot.SAMPLE_SIZE:
        rows = _stacked_rows(tensors) if shape is None else snapshot.stacked_rows(tensors, shape)
    elif shape is None or all([t.shape == shape for t in tensors]):
        rows = _stacked_rows([snapshot.sample_view(t) for t in tensors])
    else:
        rows = None
    if rows is None:
        raise _NotAlike
    return _state_array(name, rows, copy=len(tensors) == 1)


def _row_index(positions: list[int]) -> slice | torch.Tensor:
    """Rows ``positions`` (ascending) of a group's arrays: a slice where they follow one
    another (a view, no gather), else an index tensor."""
    first, count = positions[0], len(positions)
    if positions[-1] - first == count - 1:
        return slice(first, first + count)
    return torch.tensor(positions)


def _subset(rows: slice | torch.Tensor, ks: list[int], count: int) -> slice | torch.Tensor:
    """Rows ``ks`` (ascending) of the ``count`` that ``rows`` index: ``rows`` where they are
    all of them."""
    if len(ks) == count:
        return rows
    if isinstance(rows, slice):
        rows = torch.arange(rows.start, rows.stop)
    return rows[ks]


def _rows_of(rows: Any, ks: list[int]) -> Any:
    """Rows ``ks`` (ascending) of a numpy array: the array itself where they are all of its
    rows (no copy in a step hook)."""
    return rows if len(ks) == len(rows) else rows[ks]


def _numpy(t: torch.Tensor | None):
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).numpy()


def _dtype_eps(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


#: the Adam fit's eps where an optimizer has none that reads as one number
DEFAULT_EPS = 1e-8


def _as_eps(value: Any) -> float:
    """An optimizer's ``eps`` as one float: the first of a tuple (Adafactor's
    ``(1e-30, 1e-3)``), DEFAULT_EPS for what is no number (None, ``(None, 1e-3)``, "auto")."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    try:
        eps = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of many elements
        return DEFAULT_EPS
    return eps if math.isfinite(eps) and eps >= 0 else DEFAULT_EPS


def _group_eps(optimizer: Any, param: torch.Tensor) -> float:
    """The eps of ``param``'s group; the fit needs only its order of magnitude, so odd
    hyperparameters (and odd groups) fall back to DEFAULT_EPS instead of failing the audit."""
    return _eps_by_param(optimizer).get(id(param), DEFAULT_EPS)


def _eps_by_param(optimizer: Any) -> dict[int, float]:
    """``_group_eps`` of every parameter, by id, in one pass over the groups."""
    out: dict[int, float] = {}
    for group in getattr(optimizer, "param_groups", ()):
        if isinstance(group, Mapping):
            eps = _as_eps(group.get("eps", DEFAULT_EPS))
            for p in group.get("params", ()):
                out.setdefault(id(p), eps)
    return out


def _eps_of(optimizer: Any) -> float | dict[int, float]:
    """``_eps_by_param``, or the one eps all groups have (as a rule: one number for the
    step, not a dict entry a parameter)."""
    groups = [g for g in getattr(optimizer, "param_groups", ()) if isinstance(g, Mapping)]
    values = {_as_eps(group.get("eps", DEFAULT_EPS)) for group in groups}
    return values.pop() if len(values) == 1 else _eps_by_param(optimizer)


def shared_groups(before: Snapshot, after: Snapshot) -> list[tuple[tuple[int, ...], Any]]:
    """The groups read before and after ``step()`` alike (the same grads, in order): their
    indices and their rows after."""
    return [(key, group) for key, group in after.groups.items() if key in before.groups]


@dataclass
class ChangedGrads:
    """The grads one step changed (``changed``: index -> verdict), compared as the rows of
    arrays (see ``StepAuditor._compare_all``): a group's grads (``rows.GroupRows``) straight
    from its rows, before and after, the others from their fingerprints."""

    optimizer: Any
    params: list[torch.Tensor]
    before: Snapshot
    after: Snapshot
    changed: dict[int, str]
    fingerprint_kinds: bool
    eps: float | dict[int, float] = field(default_factory=dict)  # (``_eps_of``)

    def compare(self) -> tuple[dict[int, float | None], dict[int, str]]:
        """The max relative change of each changed grad's sample (None where there is none
        after, or of another length), and the kind of each mutated grad's change."""
        changes: dict[int, float | None] = dict.fromkeys(self.changed)
        # a group read both times: its rows then and now, and its moved grads' positions
        # (a grad whose fingerprint was built since is no longer a row of its group)
        by_group: list[tuple[GroupRows, GroupRows, list[int]]] = []
        in_groups: set[int] = set()
        shared = shared_groups(self.before, self.after)
        # (no group read both times: the empty set above serves as none built, no second)
        built = self.before.built() | self.after.built() if shared else in_groups
        for key, now in shared:
            then = self.before.groups[key]
            # (a grad of a group read after step() is present: not cleared)
            if not built and all(map(self.changed.__contains__, then.indices)):
                positions = list(range(len(then.indices)))  # a mutating step, as a rule
            else:
                positions = [
                    k
                    for k, i in enumerate(then.indices)
                    if self.changed.get(i, "cleared") != "cleared" and i not in built
                ]
            if positions:
                by_group.append((then, now, positions))
                in_groups.update([then.indices[k] for k in positions])
        by_length: dict[int, list[int]] = {}
        for i in sorted(self.changed.keys() - in_groups):  # (a group's: nearly all, as a rule)
            if self.changed[i] == "cleared":
                continue
            a, b = self.before.sample(i), self.after.sample(i)
            if a is not None and b is not None and a.shape == b.shape:
                by_length.setdefault(a.numel(), []).append(i)
        kinds: dict[int, str] = {}
        if self.fingerprint_kinds and "mutated" in self.changed.values():
            self.eps = _eps_of(self.optimizer)
        for before, after, positions in by_group:
            for chunk in _chunks([positions]):
                rows = _row_index(chunk)
                pre = before.samples[rows].to(torch.float64, copy=True).numpy()
                post = after.samples[rows].to(torch.float64, copy=True).numpy()
                indices = [before.indices[k] for k in chunk]
                self._compare_rows(indices, pre, post, (before, after, rows), changes, kinds)
        for chunk in _chunks(by_length.values()):
            pre = _rows([self.before.sample(i) for i in chunk])
            post = _rows([self.after.sample(i) for i in chunk])
            self._compare_rows(chunk, pre, post, None, changes, kinds)
        return changes, kinds

    def _compare_rows(
        self,
        indices: list[int],
        pre: Any,
        post: Any,
        group: tuple[GroupRows, GroupRows, slice | torch.Tensor] | None,
        changes: dict[int, float | None],
        kinds: dict[int, str],
    ) -> None:
        """``compare`` of the grads ``indices`` (samples of one length: ``pre``, ``post``,
        float64 rows; ``group``: where they are rows of one group read before and after
        ``step()``, its rows then and now and their positions in it)."""
        if len(indices) == 1:  # in place, in two scratch arrays
            changes[indices[0]] = verdict.max_rel_change(pre[0], post[0])
        else:
            changes.update(zip(indices, verdict.max_rel_change_rows(pre, post), strict=True))
        verdicts = map(self.changed.__getitem__, indices)
        mutated = [k for k, verdict_ in enumerate(verdicts) if verdict_ == "mutated"]
        if not (mutated and self.fingerprint_kinds):
            return
        found = self._group_kinds(indices, mutated, pre, post, group) if group else None
        kinds.update(found if found is not None else self._kinds(indices, mutated, pre, post))

    def _group_kinds(
        self,
        indices: list[int],
        mutated: list[int],
        pre: Any,
        post: Any,
        group: tuple[GroupRows, GroupRows, slice | torch.Tensor],
    ) -> dict[int, str] | None:
        """``_kinds`` of a group's grads, from its arrays: their params' samples as rows of
        the snapshot before (where it read them all or none), their states' as rows of the
        snapshot after (an accelerator's) or read in one stack per name (``states_alike``).
        One dtype, one fit of all rows. None where the rows do not say it alike for all."""
        import numpy as np

        before, after, positions = group
        ks = mutated
        chosen = [indices[k] for k in ks]
        sampled = before.params_sampled.issuperset(chosen)
        if not sampled and not before.params_sampled.isdisjoint(chosen):
            return None  # some sampled, some not: each as it is
        if sampled and before.param_samples is None:
            return None
        taken = _subset(positions, ks, len(indices))
        view = isinstance(taken, slice)  # (of the snapshot's rows: the fits get a copy)
        y = None
        if sampled:
            y = before.param_samples[taken].to(torch.float64, copy=True).numpy()
        if after.states is not None:  # sampled with the grads (an accelerator's)
            states = {
                name: _state_array(name, rows[taken], copy=view)
                for name, rows in after.states.items()
            }
        else:  # the CPU's: the state tensors themselves, in one stack per name
            params = [self.params[i] for i in chosen]
            held = snapshot.states_alike(getattr(self.optimizer, "state", None), params)
            if held is None:
                return None
            states = _StateRows(held, params[0].shape)
        dtype_eps = np.full(len(chosen), _dtype_eps(before.samples))
        try:
            return self._fit(chosen, _rows_of(pre, ks), _rows_of(post, ks), y, states, dtype_eps)
        except _NotAlike:
            return None

    def _kinds(self, indices: list[int], mutated: list[int], pre: Any, post: Any) -> dict[int, str]:
        """The kind of each mutated grad's change (rows ``mutated`` of ``pre``/``post``),
        fitted over the rows that share a param sample or none, and the optimizer's state
        names and shapes: one ``verdict.fingerprint_rows`` call each (one grad alone: its
        own fits)."""
        import numpy as np

        groups: dict[tuple[Any, ...], list[tuple[int, dict[str, Any]]]] = {}
        state = getattr(self.optimizer, "state", None)
        for k in mutated:
            i = indices[k]
            # on an accelerator the snapshot sampled the state; on the CPU the state tensors
            # themselves, sampled in one stack per name and shape (``_state_rows``)
            sampled = self.after.states(i)
            if sampled is None:
                sampled = snapshot.state_tensors(self.optimizer, self.params[i], state)
            shapes = tuple((name, t.shape) for name, t in sampled.items())
            has_y = self.before.param_sample(i) is not None
            groups.setdefault((has_y, shapes), []).append((k, sampled))
        out: dict[int, str] = {}
        for (has_y, shapes), rows in groups.items():
            ks = [k for k, _ in rows]
            chosen = [indices[k] for k in ks]
            y = _rows([self.before.param_sample(i) for i in chosen]) if has_y else None
            states = {name: _state_rows(name, [s[name] for _, s in rows]) for name, _ in shapes}
            dtype_eps = np.array([_dtype_eps(self.before.sample(i)) for i in chosen])
            out.update(
                self._fit(chosen, _rows_of(pre, ks), _rows_of(post, ks), y, states, dtype_eps)
            )
        return out

    def _fit(
        self,
        chosen: list[int],
        pre: Any,
        post: Any,
        y: Any,
        states: dict[str, Any],
        dtype_eps: Any,
    ) -> dict[int, str]:
        """The kind of the mutation of each grad ``chosen`` (rows of ``pre``, ``post``, ``y``
        and ``states``: None where a state can be no second moment), fitted over all rows
        at once; one grad alone by its own fits, in their scratch arrays."""
        import numpy as np

        if isinstance(self.eps, float):
            eps = np.full(len(chosen), self.eps)
        else:
            eps = np.array([self.eps.get(id(self.params[i]), DEFAULT_EPS) for i in chosen])
        if len(chosen) > 1:
            found = verdict.fingerprint_rows(pre, post, y, states, eps, dtype_eps)
        else:
            found = [
                verdict.fingerprint(
                    pre[0],
                    post[0],
                    None if y is None else y[0],
                    {name: rows[0] for name, rows in states.items() if rows is not None},
                    float(eps[0]),
                    dtype_eps=float(dtype_eps[0]),
                    states_are_scratch=True,
                )
            ]
        return dict(zip(chosen, found, strict=True))


class _StateRows(Mapping):
    """A group's state rows by name (``_state_rows`` of ``held``'s tensors), each read when
    the fits first ask for it, a name that says a square (``exp_avg_sq``) first: the fits
    stop once every row is named, so that a first moment or sf-adamw's ``z`` is then never
    stacked. Which state names a row changes no kind: any that fits names it
    adam-normalized. A name whose tensors are not all of the params' ``shape`` raises
    ``_NotAlike`` when it is read (each param's fits then: ``ChangedGrads._kinds``)."""

    def __init__(self, held: dict[str, list[torch.Tensor]], shape: torch.Size) -> None:
        self._held = held
        self._shape = shape
        self._names = sorted(held, key=lambda name: not _says_square(name))
        self._read: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._read:
            self._read[name] = _state_rows(name, self._held[name], self._shape)
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _says_square(name: str) -> bool:
    """Whether a state's name says a square (``exp_avg_sq``): a second moment, as a rule."""
    return "sq" in name.lower()


def _state_array(name: str, rows: torch.Tensor, copy: bool = False) -> Any:
    """State ``name``'s samples (rows) as float64 numpy on the host, or None where every row
    has a negative element: no second moment, the fits' one use of state (not worth a
    copy). A name that says a square is copied unchecked: as a rule it has no negative
    element, a row that has one the fits pass over, and the check would cost a chunk of
    rows what the copy does. ``copy``: ``rows`` are a view of the state, which the fits (in
    place) must not touch."""
    if not _says_square(name) and bool(rows.amin(dim=1).lt(0).all()):
        return None  # (a NaN row is copied: the fits judge it)
    return rows.to("cpu", torch.float64, copy=copy).numpy()
