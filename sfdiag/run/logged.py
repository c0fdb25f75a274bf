"""What a logged value of ``sfdiag run``'s metric audit waits with until it is judged
(``sfdiag.run.metrics``): the ``Tag`` of its name (what the name is judged as, worked out
once a name) and the ``Moment`` its logging call saw of the watched optimizers (shared by
the values logged in a row while nothing they are judged by moved)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sfdiag.run import metric_names

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.run.judge import AverageFit, MetricTally
    from sfdiag.run.norms import StepNorms
    from sfdiag.run.watch import Watched


class Tag:
    """A logged name as the audit reads it, worked out once per (logger, name): what it is
    judged as, the part of the model a gradient norm's name may name (None: the whole
    model), the param group a learning rate's name names."""

    __slots__ = ("key", "logger", "name", "quantity", "hint", "group", "tally", "fit")

    def __init__(self, logger: str, name: str, quantity: str) -> None:
        self.key = (logger, name)
        self.logger = logger
        self.name = name
        self.quantity = quantity
        norm = quantity == "grad_norm"
        self.hint = metric_names.scope_hint(name) if norm else None
        self.group = 0 if norm else metric_names.rate_group(name)
        # the metric's tally and average fit, once made (``MetricAudit`` keeps them by key)
        self.tally: MetricTally | None = None
        self.fit: AverageFit | None = None


class Moment:
    """What the script's logging calls saw of the watched optimizers, shared by the values
    they logged (``values``: their tags and numbers, with whether the at-log norms had been
    read in their call before each: a gradient norm judged over the whole model uses them).
    The next call that sees the same (nothing it reads moved) adds its values here, to be
    judged together. Per watched optimizer, by position, as in ``watch.watched``."""

    __slots__ = (
        "label",
        "module",
        "fresh",
        "after",
        "stepping",
        "steps",
        "at_log",
        "posts_read",
        "coming",
        "advanced",
        "skips",
        "values",
        "at_log_read",
        "groups_read",
    )

    def __init__(
        self, label: int | None, module: Callable[[], Any] | None, fresh: list[bool]
    ) -> None:
        self.label = label  # the step number the logger was given, if any
        self.module = module  # the module that logged them (Lightning's self)
        # grads written since its last step (a backward ran: the coming step comes first)
        self.fresh = fresh
        self.after: list[int] = []  # its last finished step
        self.stepping: list[bool] = []  # logged during its step()
        # the norms of the steps they may belong to (the last finished, then the next),
        # held here so they outlive the watch's few recent steps
        self.steps: dict[int, list[StepNorms]] = {}
        # gradient norms, per optimizer (by id) whose grads were written since its last
        # step: (their norm then, backward passes of the step so far, still loss-scaled)
        self.at_log: dict[int, tuple[Any, int | None, bool]] | None = None
        self.posts_read = False  # the post-step norms of the steps pinned here are read
        # learning rates: each group's rates for the next step as they stood (the run may
        # end before that step, see ``Watched.coming_rates``); per param group, what moved
        # the rate on after the last finished step ("scheduler", "write" or None); the
        # attempts the loss scaler skipped
        self.coming: tuple[tuple[tuple[float, float] | None, ...], ...] | None = None
        self.advanced: dict[int, tuple[str | None, ...]] = {}
        self.skips: tuple[int, ...] = ()
        self.values: list[tuple[Tag, Any, bool]] = []
        # the logging call under way: whether it read the at-log norms, the groups whose
        # rates it read (what it reads must equal what the moment holds)
        self.at_log_read = False
        self.groups_read: set[int] = set()

    def pin(self, watched: list[Watched]) -> None:
        """Note each optimizer's last finished step, whether it is stepping, and the steps
        a value logged now may belong to."""
        for position, entry in enumerate(watched):
            finished = entry.last_finished
            self.after.append(finished)
            self.stepping.append(entry.stepping)
            pinned = pinned_steps(entry)
            if pinned:
                self.steps[position] = pinned

    def saw(
        self, label: int | None, module: Any, fresh: list[bool], watched: list[Watched]
    ) -> bool:
        """Whether a logging call now sees what this moment saw (its reads of the at-log
        norms and rates are compared as it makes them)."""
        if label != self.label or fresh != self.fresh or referent(self.module) is not module:
            return False
        for position, entry in enumerate(watched):
            if self.after[position] != entry.last_finished or (
                self.stepping[position] != entry.stepping
            ):
                return False
            if not _pins(self.steps.get(position, ()), entry):
                return False
        return True

    def split(self) -> Moment:
        """A moment for the rest of the logging call under way: what it saw, and what it
        read so far (the values it logged so far stay here)."""
        other = Moment(self.label, self.module, self.fresh)
        other.after, other.stepping = self.after, self.stepping
        other.steps = {position: list(pinned) for position, pinned in self.steps.items()}
        other.posts_read = self.posts_read
        if self.at_log_read:
            other.at_log, other.at_log_read = self.at_log, True
        if self.groups_read:
            other.coming, other.skips = self.coming, self.skips
            other.advanced = {group: self.advanced[group] for group in self.groups_read}
            other.groups_read = set(self.groups_read)
        return other


def same_reads(
    held: dict[int, tuple[Any, int | None, bool]], read: dict[int, tuple[Any, int | None, bool]]
) -> bool:
    """Whether two at-log readings are the same: each optimizer's the same read of its grads
    (the norm is the same object: a read is kept while its grads hold), at the same count
    of backward passes, as loss-scaled."""
    if held.keys() != read.keys():
        return False
    for key, (total, micro, scaled) in held.items():
        other_total, other_micro, other_scaled = read[key]
        if other_total is not total or other_micro != micro or other_scaled != scaled:
            return False
    return True


def pinned_steps(entry: Watched) -> list[StepNorms]:
    """The steps of ``entry`` a value logged now may belong to, as far as they are known:
    the last finished one, and an attempt the loss scaler skipped since."""
    last = entry.recent[-1] if entry.recent else None
    pinned = [last] if last is not None and last.step == entry.last_finished else []
    if entry.skipped_attempt is not None:
        pinned.append(entry.skipped_attempt)
    return pinned


def _pins(held: list[StepNorms] | tuple[()], entry: Watched) -> bool:
    """Whether ``held`` are the steps ``pinned_steps(entry)`` gives now (the same objects),
    without building its list: this runs at every logging call."""
    last = entry.recent[-1] if entry.recent else None
    skipped = entry.skipped_attempt
    count = (last is not None and last.step == entry.last_finished) + (skipped is not None)
    if len(held) != count:
        return False
    if skipped is not None and held[-1] is not skipped:
        return False
    return count == (skipped is not None) or held[0] is last


def referent(ref: Callable[[], Any] | None) -> Any:
    return ref() if ref is not None else None
