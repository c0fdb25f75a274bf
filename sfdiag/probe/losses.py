"""Loss functions by registry name. Each is ``loss(output, target) -> scalar``."""

from __future__ import annotations

from torch.nn import functional as F

cross_entropy = F.cross_entropy
nll = F.nll_loss
mse = F.mse_loss

#: loss names whose targets are class indices (the data generator needs to know)
CLASS_TARGET_LOSSES = frozenset({"cross_entropy", "nll"})


def auto(model: object, output_shape: tuple[int, ...]) -> str:
    """The loss name ``loss: auto`` stands for, given the model and one batch's output shape."""
    declared = getattr(model, "sfdiag_loss", None)
    if isinstance(declared, str):
        return declared
    return "cross_entropy" if len(output_shape) == 2 and output_shape[1] >= 2 else "mse"
