"""The in-repo schedule-free optimizers (update rules: docs/algorithms.md).

| class | registry name | ``p.grad`` after ``step()`` |
|---|---|---|
| ``AdamWScheduleFree`` | ``sf-adamw`` | ``g / denom + weight_decay * y`` (written in place) |
| ``AdamWScheduleFreeReference`` | ``sf-ref`` | untouched |
| ``SGDScheduleFree`` | ``sf-sgd`` | ``g + weight_decay * y`` in place; untouched when 0 |
| ``SGDScheduleFreeReference`` | ``sf-sgd-ref`` | untouched |
"""

from sfdiag.optim.adamw import AdamWScheduleFree, AdamWScheduleFreeReference
from sfdiag.optim.sgd import SGDScheduleFree, SGDScheduleFreeReference

__all__ = [
    "AdamWScheduleFree",
    "AdamWScheduleFreeReference",
    "SGDScheduleFree",
    "SGDScheduleFreeReference",
]
