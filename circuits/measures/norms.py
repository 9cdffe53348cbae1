"""Parameter norms: the total sum of squared weights (Nanda et al. 2023, Fig. 7) and per tensor."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["weight_norms_sq", "weight_norm_sq"]


def weight_norms_sq(state_dict: Mapping[str, Tensor]) -> dict[str, float]:
    """Sum of squares of each parameter (buffers such as the attention mask are skipped).

    Accepts a state dict or a stacked one with a leading checkpoint axis, in which case each
    value is a list over checkpoints (as floats).
    """
    out: dict[str, float] = {}
    for name, value in state_dict.items():
        if name.endswith((".mask", ".IGNORE")):
            continue
        out[name] = float(value.to(torch.float64).pow(2).sum())
    return out


def weight_norm_sq(state_dict: Mapping[str, Tensor]) -> float:
    """Total sum of squared weights over every parameter."""
    return sum(weight_norms_sq(state_dict).values())
