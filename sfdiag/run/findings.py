"""Schedule-free mode mistakes and a schedule's missteps, tallied per optimizer and kind
into findings (``eval-in-train-mode``, ``double-warmup``, ``scheduler-on-skipped-step``...),
each with its advice. Pure: ``sfdiag.run.modes`` and the watch record, this tallies."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from sfdiag.results import (
    FINDING_KINDS,
    FINDING_STEPS,
    Finding,
)


@dataclass
class ModeTally:
    """What happened of one kind to one optimizer: how often, first when, the worst gap."""

    count: int = 0
    first_step: int = -1
    gap: float | None = None
    detail: str | None = None  # what it did, in words (double-warmup: the product's effect)
    steps: list[int] = field(default_factory=list)  # where, the first FINDING_STEPS of them

    def add(self, step: int, gap: float | None = None) -> None:
        if self.count == 0:
            self.first_step = step
        self.count += 1
        if len(self.steps) < FINDING_STEPS and (not self.steps or self.steps[-1] != step):
            self.steps.append(step)
        if gap is not None and (self.gap is None or gap > self.gap):
            self.gap = gap


def _percent(gap: float | None) -> str:
    return "" if gap is None or not math.isfinite(gap) else f" (||x - y|| / ||x|| = {gap:.3g})"


def mode_advice(kind: str, tally: ModeTally) -> str:
    """What went wrong and the one line that fixes it."""
    if kind == "eval-in-train-mode":
        return (
            "the model was evaluated with the optimizer in train mode: at y, where gradients "
            f"are taken, not at x, the weights to evaluate{_percent(tally.gap)}; call "
            "optimizer.eval() before evaluating and optimizer.train() after"
        )
    if kind == "checkpoint-in-train-mode":
        return (
            "a checkpoint was saved with the optimizer in train mode: it holds y, not x; call "
            "optimizer.eval() before saving (and optimizer.train() after)"
        )
    if kind == "batchnorm-stats":
        return (
            "BatchNorm running statistics were used as gathered at y in training, never "
            "recomputed at x; before evaluating: optimizer.eval(); model.train(); "
            "with torch.no_grad(): run ~50 training batches through the model; model.eval()"
        )
    if kind == "step-in-eval-mode":
        return (
            "step() ran with the optimizer in eval mode (the parameters at x): it trained from "
            "the wrong point; call optimizer.train() before training steps"
        )
    if kind == "scheduler-on-skipped-step":
        return (
            "the learning rate moved on (a scheduler stepped, or the script set it) after steps "
            "the loss scaler skipped (inf/NaN gradients: step() did not run): the schedule runs "
            "ahead of the steps taken; step the scheduler only when the optimizer stepped "
            "(compare scaler.get_scale() before and after scaler.update(): it drops on a skip)"
        )
    if kind == "double-warmup":
        return (
            "the optimizer's own warmup and a scheduler's rising rate act in the same steps"
            f"{': ' + tally.detail if tally.detail else ''}: warmup applied twice; keep one "
            "(warmup_steps=0 on the optimizer, or a scheduler without warmup)"
        )
    return kind


def double_warmup(rows: Iterable[tuple[int, float, float, float, bool]], peak: float) -> ModeTally:
    """Steps at which the optimizer's own warmup was on while the scheduler's rate (group
    ``lr``) was still rising, from ``(step, base, the step before's base, applied, own
    warmup on)``; ``peak``: the highest base rate of the run."""
    tally = ModeTally()
    for step, base, previous, applied, own in rows:
        if own and base > previous:
            if tally.count == 0 and peak > 0:
                tally.detail = (
                    f"at step {step} the applied rate is {applied / peak:.2g}x the base "
                    f"({applied:.3g} of {peak:.3g})"
                )
            tally.add(step)
    return tally


#: what a finding counts, in words
FINDING_UNITS = {
    "eval-in-train-mode": ("evaluation", "evaluations"),
    "checkpoint-in-train-mode": ("save", "saves"),
    "batchnorm-stats": ("evaluation", "evaluations"),
    "step-in-eval-mode": ("step", "steps"),
    "double-warmup": ("step", "steps"),
    "scheduler-on-skipped-step": ("skipped step", "skipped steps"),
}


def mode_findings(tallies: dict[tuple[str, str], ModeTally]) -> tuple[Finding, ...]:
    """(optimizer, kind) -> tally, as findings in the order of ``FINDING_KINDS``."""
    order = {kind: i for i, kind in enumerate(FINDING_KINDS)}
    found = [
        Finding(
            kind=kind,
            optimizer=optimizer,
            first_step=tally.first_step,
            count=tally.count,
            advice=mode_advice(kind, tally),
            gap=tally.gap if kind == "eval-in-train-mode" else None,
            steps=tuple(tally.steps),
        )
        for (optimizer, kind), tally in tallies.items()
        if tally.count
    ]
    return tuple(sorted(found, key=lambda f: (order.get(f.kind, len(order)), f.optimizer)))
