"""Losses on the full (a, b) grid: train/test, restricted and excluded (Nanda et al. 2023, §5.1).

Logits are the last-position logits of all p^2 inputs in canonical order, shape [p^2, p] (or
with a leading checkpoint axis). Every loss is a float64 cross-entropy.

* restricted loss: keep only the key-frequency directions cos/sin(w_k(a+b)) of each logit column
  plus its mean over the grid, score all pairs (the paper's Fig. 7; ``split`` to change).
* excluded loss: remove those directions (mean and everything else kept), score the training
  pairs (the paper's Fig. 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuits.fourier import sum_directions

__all__ = [
    "cross_entropy",
    "accuracy",
    "project_sum_directions",
    "restricted_logits",
    "excluded_logits",
    "restricted_loss",
    "excluded_loss",
    "key_logit_fraction",
]


def cross_entropy(
    logits: Float[Tensor, "*ckpt batch cls"], labels: Int[Tensor, " batch"]
) -> Float[Tensor, "*ckpt"]:
    """Mean float64 cross-entropy over the batch axis (any leading checkpoint axes)."""
    logp = F.log_softmax(logits.to(torch.float64), dim=-1)
    idx = labels.expand(*logp.shape[:-1]).unsqueeze(-1)
    return -logp.gather(-1, idx).squeeze(-1).mean(-1)


def accuracy(
    logits: Float[Tensor, "*ckpt batch cls"], labels: Int[Tensor, " batch"]
) -> Float[Tensor, "*ckpt"]:
    """Fraction of the batch whose argmax is the label."""
    return (logits.argmax(-1) == labels).to(torch.float64).mean(-1)


def project_sum_directions(
    logits: Float[Tensor, "*ckpt pp cls"], p: int, freqs: list[int]
) -> Float[Tensor, "*ckpt pp cls"]:
    """P_S(L): each logit column projected onto cos/sin(w_k(a+b)) for k in ``freqs``."""
    dirs = sum_directions(p, freqs, torch.float64).to(logits.device)
    x = logits.to(torch.float64)
    coeffs = torch.einsum("dq,...qc->...dc", dirs, x)
    return torch.einsum("dq,...dc->...qc", dirs, coeffs)


def restricted_logits(
    logits: Float[Tensor, "*ckpt pp cls"], p: int, freqs: list[int]
) -> Float[Tensor, "*ckpt pp cls"]:
    """P_S(L) plus the per-class mean of L over the grid (the constant 2D component)."""
    x = logits.to(torch.float64)
    return project_sum_directions(x, p, freqs) + x.mean(dim=-2, keepdim=True)


def excluded_logits(
    logits: Float[Tensor, "*ckpt pp cls"], p: int, freqs: list[int]
) -> Float[Tensor, "*ckpt pp cls"]:
    """L - P_S(L): the key-frequency directions removed, nothing else touched."""
    return logits.to(torch.float64) - project_sum_directions(logits, p, freqs)


def restricted_loss(
    logits: Float[Tensor, "*ckpt pp cls"],
    labels: Int[Tensor, " pp"],
    p: int,
    freqs: list[int],
    idx: Int[Tensor, " n"] | None = None,
) -> Float[Tensor, "*ckpt"]:
    """Loss of :func:`restricted_logits` on ``idx`` (default: all p^2 pairs, as the paper)."""
    lr = restricted_logits(logits, p, freqs)
    if idx is None:
        return cross_entropy(lr, labels)
    return cross_entropy(lr[..., idx, :], labels[idx])


def excluded_loss(
    logits: Float[Tensor, "*ckpt pp cls"],
    labels: Int[Tensor, " pp"],
    p: int,
    freqs: list[int],
    idx: Int[Tensor, " n"],
) -> Float[Tensor, "*ckpt"]:
    """Loss of :func:`excluded_logits` on ``idx`` (the paper: the training pairs)."""
    le = excluded_logits(logits, p, freqs)
    return cross_entropy(le[..., idx, :], labels[idx])


def key_logit_fraction(
    logits: Float[Tensor, "*ckpt pp cls"], p: int, freqs: list[int]
) -> Float[Tensor, "*ckpt"]:
    """‖P_S(L - mean)‖² / ‖L - mean‖²: share of the logits' variance in the key directions."""
    x = logits.to(torch.float64)
    centred = x - x.mean(dim=-2, keepdim=True)
    proj = project_sum_directions(centred, p, freqs)
    return proj.pow(2).sum((-2, -1)) / centred.pow(2).sum((-2, -1)).clamp_min(1e-300)
