"""Parameter norms: the total sum of squared weights (Nanda et al. 2023, Fig. 7) and per tensor."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.model import is_buffer_key

__all__ = ["stacked_weight_norms_sq", "weight_norms_sq", "weight_norm_sq"]


def stacked_weight_norms_sq(params: Mapping[str, Tensor]) -> dict[str, Float[Tensor, " ckpt"]]:
    """Sum of squares of each parameter for stacked checkpoints (leading ``ckpt`` axis).

    Buffers such as the attention mask are skipped; sums are float64.
    """
    return {
        name: value.to(torch.float64).pow(2).flatten(1).sum(1)
        for name, value in params.items()
        if not is_buffer_key(name)
    }


def weight_norms_sq(state_dict: Mapping[str, Tensor]) -> dict[str, float]:
    """Sum of squares of each parameter of one state dict (buffers skipped)."""
    stacked = stacked_weight_norms_sq({k: v[None] for k, v in state_dict.items()})
    return {name: float(value[0]) for name, value in stacked.items()}


def weight_norm_sq(state_dict: Mapping[str, Tensor]) -> float:
    """Total sum of squared weights over every parameter."""
    return sum(weight_norms_sq(state_dict).values())
