"""Which logged names are gradient metrics or learning rates, and what part of the model a
name covers: a name whose last ``/``-part reads as a gradient norm (``grad_norm``,
``gradient_norm``, ``grad_2.0_norm_total``, ``gnorm``, ``train/grad_norm``, ``GradNorm``...),
or whose part before the last does and whose last part names a parameter or module
(``grad_2.0_norm/net.0.weight``, Lightning's ``grad_norm`` dict), plus what ``--metric``
globs add. Losses, counters and timings are never judged (unless an exact ``--metric``
name asks). Pure functions of the name: ``sfdiag.run.judge`` judges the values."""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass

# ---- which names ---------------------------------------------------------------------------
_GRAD = frozenset({"grad", "grads", "gradient", "gradients"})
_NORM = frozenset({"norm", "norms"})
_TWO = frozenset({"2", "2.0", "l2"})
_ONE_WORD = frozenset({"gnorm", "gradnorm", "gradnorms", "gradientnorm"})
#: words that say a gradient-norm metric is an average over steps (a note when it is one)
AVERAGING = frozenset(
    {"ema", "avg", "average", "mean", "smooth", "smoothed", "running", "moving", "epoch"}
)
# words that may stand around the core without changing what is measured
_FILLER = frozenset(
    {
        "train",
        "training",
        "total",
        "global",
        "model",
        "full",
        "overall",
        "all",
        "raw",
        "unclipped",
        "clipped",
        "clip",
        "preclip",
        "postclip",
        "pre",
        "post",
        "before",
        "after",
        "step",
        "l2",
        "2",
        "2.0",
        # what the norm is of, or where it was read: judged like any other (these are the
        # norms most often wrong: a rank's shard, a still-scaled or partial gradient)
        "local",
        "shard",
        "sharded",
        "rank",
        "scaled",
        "unscaled",
        "micro",
        "microbatch",
        "batch",
        "accum",
        "accumulated",
        "accumulation",
        "current",
        "last",
        *AVERAGING,
    }
)
# never judged when only a glob picks them: what they measure is not a gradient norm
_NEVER = frozenset(
    {
        "loss",
        "lr",
        "learning",
        "rate",
        "acc",
        "accuracy",
        "epoch",
        "epochs",
        "samples",
        "time",
        "runtime",
        "throughput",
        "flos",
        "tokens",
        "perplexity",
        "ppl",
    }
)


def _words(part: str) -> list[str]:
    """``GradNorm`` -> grad, norm; ``grad_2.0_norm_total`` -> grad, 2.0, norm, total."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", part).lower()
    return [w for w in re.split(r"[^a-z0-9.]+|(?<![0-9])\.|\.(?![0-9])", spaced) if w]


def is_grad_norm_word(part: str) -> bool:
    """Whether one ``/``-part of a metric name reads as an L2 gradient norm."""
    words = _words(part)
    cores = []
    for i, w in enumerate(words):
        if w in _ONE_WORD:
            cores.append((i, i))
        elif w in _GRAD:
            j = i + 1
            if j < len(words) and words[j] in _TWO:
                j += 1
            if j < len(words) and words[j] in _NORM:
                cores.append((i, j))
    if len(cores) != 1:
        return False
    start, end = cores[0]
    return all(w in _FILLER or _RANK_WORD.match(w) for w in words[:start] + words[end + 1 :])


_RANK_WORD = re.compile(r"^(?:rank|gpu|device|worker)?\d+$")  # rank0, gpu1, a rank's number


_LR_FILLER = frozenset(
    {"train", "training", "current", "last", "scheduled", "effective", "applied", "step", "opt"}
)
_GROUP = re.compile(r"^(?:pg|group_?|param_group_?|g)?(\d+)$")
#: what Lightning's LearningRateMonitor logs beside a rate, under the rate's name
_NOT_A_RATE = ("momentum", "weight_decay", "weight-decay", "beta")


def _without_group(words: list[str]) -> tuple[list[str], int | None]:
    """``[lr, group, 1]`` / ``[lr, group1]`` -> ``([lr], 1)``."""
    if len(words) >= 2 and words[-2] in ("group", "pg") and words[-1].isdigit():
        return words[:-2], int(words[-1])
    if len(words) >= 2 and _GROUP.match(words[-1]) and not words[-1].isdigit():
        return words[:-1], int(_GROUP.match(words[-1]).group(1))
    return words, None


def is_learning_rate_word(part: str) -> bool:
    """Whether one ``/``-part of a metric name reads as a learning rate: ``lr``,
    ``learning_rate``, ``LearningRate``, ``train_lr``, ``lr_group_1``, Lightning's
    ``lr-AdamW`` (not its ``lr-AdamW-momentum``)."""
    if part.lower().endswith(_NOT_A_RATE):
        return False
    if re.match(r"^lr-[A-Za-z]", part):  # Lightning's LearningRateMonitor: lr-<Optimizer>
        return True
    words, _ = _without_group(_words(part))
    core = [w for w in words if w not in _LR_FILLER]
    return core in (["lr"], ["learning", "rate"], ["learningrate"])


@functools.lru_cache(maxsize=4096)  # per logged name: the same few, every step
def rate_group(name: str) -> int:
    """The param group a learning-rate metric names (``lr-AdamW/pg2`` -> 1, Lightning counts
    from 1; ``lr/group1``, ``lr_group_1`` -> 1); group 0 where it names none."""
    parts = name.split("/")
    last = parts[-1]
    if len(parts) >= 2 and is_learning_rate_word(parts[-2]):
        match = _GROUP.match(last.lower())
        if match:
            number = int(match.group(1))
            return max(0, number - 1) if last.lower().startswith("pg") else number
    _, group = _without_group(_words(last))
    return group or 0


@dataclass(frozen=True)
class MetricSelector:
    """Which logged names are judged, as what quantity, and against what part of the model.

    ``globs`` are the ``--metric`` arguments (``fnmatch`` patterns, case-sensitive); a
    name with no wildcard is taken even if it reads as a loss. A glob's name is judged as
    a learning rate where it reads as one, else as a gradient norm.
    """

    globs: tuple[str, ...] = ()

    def quantity(self, name: str) -> str | None:
        """ "grad_norm", "learning_rate", or None for a name that is not judged."""
        parts = name.split("/")
        if is_grad_norm_word(parts[-1]):
            return "grad_norm"
        if len(parts) >= 2 and is_grad_norm_word(parts[-2]):
            return "grad_norm"
        if is_learning_rate_word(parts[-1]):
            return "learning_rate"
        if len(parts) >= 2 and is_learning_rate_word(parts[-2]) and _GROUP.match(parts[-1].lower()):
            return "learning_rate"
        for glob in self.globs:
            if glob == name or fnmatch.fnmatchcase(name, glob):
                words = set(_words(parts[-1]))
                if glob != name and words & _NEVER - {"lr", "learning", "rate"}:
                    continue  # a glob never picks a loss, a count or a time
                return "learning_rate" if words & {"lr", "learning"} else "grad_norm"
        return None

    def selects(self, name: str) -> bool:
        return self.quantity(name) is not None


@functools.lru_cache(maxsize=4096)  # per logged name: the same few, every step
def scope_hint(name: str) -> str | None:
    """The last part of a name that may name a parameter or module (None: the whole model).

    ``grad_2.0_norm/net.0.weight`` -> ``net.0.weight``; ``train/grad_norm`` -> None.
    Whether it does name one is up to the caller, who knows the model.
    """
    parts = name.split("/")
    if len(parts) < 2 or is_grad_norm_word(parts[-1]) or is_learning_rate_word(parts[-2]):
        return None
    return parts[-1]


# ---- one value -------------------------------------------------------------------------------
