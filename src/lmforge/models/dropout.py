"""Dropout for every lmforge family, with a faster keep-mask on CPU.

This file is copied next to saved weights: it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, with the keep-mask drawn by ``torch.rand`` on CPU: the same distribution (a
    different random stream) at 1.5-2x the speed of torch's ``bernoulli_`` there, which took 10% of a
    BERT training step. Other devices use ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training=True)
    keep = torch.rand(x.shape, device=x.device) >= p
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``apply_dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)
