"""Losses on the full (a, b) grid: train/test, restricted and excluded (Nanda et al. 2023, §5.1).

Logits are the last-position logits of all inputs of the grid in canonical order, shape
[pairs, classes] (or with a leading checkpoint axis). Every loss is a float64 cross-entropy.

* restricted loss: keep only the key-frequency directions cos/sin(w_k(a+b)) of each logit column
  plus its mean over the grid, score all pairs (the paper's Fig. 7; ``idx`` to change).
* excluded loss: remove those directions (mean and everything else kept), score the training
  pairs (the paper's Fig. 7).

The Fourier functions take the task (a :class:`circuits.tasks.Task`, its config, its
:class:`circuits.tasks.FourierView`, or p for modular addition) and read the directions that
carry its answer: a + b for add, a - b for sub, the discrete logarithm's for mul and div. Where
the view is part of the grid (mul, div: pairs with a zero and class 0 are left out), their
pair and class axes are the view's (:meth:`FourierView.take`), and so is ``idx``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuits.fourier import sum_directions
from circuits.tasks import FourierView, TaskLike, as_view

__all__ = [
    "cross_entropy",
    "accuracy",
    "project_sum_directions",
    "logits_in_view",
    "project_in_view",
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


def logits_in_view(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike
) -> tuple[FourierView, Float[Tensor, "*ckpt nn view_cls"]]:
    """``(the task's Fourier view, the logits in it as float64)``: what every Fourier measure
    starts from (for add and sub, the logits themselves)."""
    view = as_view(task)
    return view, view.take(logits, classes=True).to(torch.float64)


def project_in_view(
    x: Float[Tensor, "*ckpt nn cls"], view: FourierView, freqs: list[int]
) -> Float[Tensor, "*ckpt nn cls"]:
    """P_S of float64 logits already in the view's coordinates (:func:`logits_in_view`)."""
    dirs = sum_directions(view.n, freqs, torch.float64, view.sign).to(x.device)
    return torch.einsum("dq,...dc->...qc", dirs, torch.einsum("dq,...qc->...dc", dirs, x))


def project_sum_directions(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int]
) -> Float[Tensor, "*ckpt nn view_cls"]:
    """P_S(L): each logit column projected onto the answer directions cos/sin(w_k(a+b)) (for
    add; the task's own for the others) for k in ``freqs``, on the task's Fourier view."""
    view, x = logits_in_view(logits, task)
    return project_in_view(x, view, freqs)


def restricted_logits(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int]
) -> Float[Tensor, "*ckpt nn view_cls"]:
    """P_S(L) plus the per-class mean of L over the view (the constant 2D component)."""
    view, x = logits_in_view(logits, task)
    return project_in_view(x, view, freqs) + x.mean(dim=-2, keepdim=True)


def excluded_logits(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int]
) -> Float[Tensor, "*ckpt nn view_cls"]:
    """L - P_S(L): the key-frequency directions removed, nothing else touched."""
    view, x = logits_in_view(logits, task)
    return x - project_in_view(x, view, freqs)


def restricted_loss(
    logits: Float[Tensor, "*ckpt pp cls"],
    labels: Int[Tensor, " pp"],
    task: TaskLike,
    freqs: list[int],
    idx: Int[Tensor, " n"] | None = None,
) -> Float[Tensor, "*ckpt"]:
    """Loss of :func:`restricted_logits` on the canonical pairs ``idx`` (default: every pair of
    the view, as the paper's all p^2 pairs)."""
    view = as_view(task)
    lr, y = restricted_logits(logits, view, freqs), view.labels(labels)
    if idx is None:
        return cross_entropy(lr, y)
    idx = view.index(idx)
    return cross_entropy(lr[..., idx, :], y[idx])


def excluded_loss(
    logits: Float[Tensor, "*ckpt pp cls"],
    labels: Int[Tensor, " pp"],
    task: TaskLike,
    freqs: list[int],
    idx: Int[Tensor, " n"],
) -> Float[Tensor, "*ckpt"]:
    """Loss of :func:`excluded_logits` on the canonical pairs ``idx`` (the paper: the training
    pairs; those outside the view are left out)."""
    view = as_view(task)
    le, y, idx = excluded_logits(logits, view, freqs), view.labels(labels), view.index(idx)
    return cross_entropy(le[..., idx, :], y[idx])


def key_logit_fraction(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int]
) -> Float[Tensor, "*ckpt"]:
    """‖P_S(L - mean)‖² / ‖L - mean‖²: share of the logits' variance in the key directions
    (on the task's Fourier view)."""
    view, x = logits_in_view(logits, task)
    centred = x - x.mean(dim=-2, keepdim=True)
    proj = project_in_view(centred, view, freqs)
    return proj.pow(2).sum((-2, -1)) / centred.pow(2).sum((-2, -1)).clamp_min(1e-300)
