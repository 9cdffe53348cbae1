"""Sparsity: the Gini coefficient (Hurley & Rickard 2009), as used by Nanda et al. (2023) §5.1."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["gini"]


def gini(x: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Gini coefficient of nonnegative vectors along the last axis.

    G(c) = Σ_i (2i - N - 1) c_(i) / (N Σ_i c_i) with c sorted ascending (i = 1..N): 0 for a
    constant vector, 1 - 1/N for a one-hot one. An all-zero vector gets 0.
    """
    if torch.any(x < 0):
        raise ValueError("gini needs nonnegative values (norms)")
    n = x.shape[-1]
    c, _ = torch.sort(x.to(torch.float64), dim=-1)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    total = c.sum(-1)
    num = ((2 * i - n - 1) * c).sum(-1)
    return torch.where(total > 0, num / (n * total.clamp_min(1e-300)), torch.zeros_like(total))
