"""The training loss (cross-entropy with a float64 log-softmax) of one model and of a stack, and
the train/test metrics read from full-grid logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from circuits.tasks import Task

__all__ = ["loss_fn", "split_metrics", "stacked_loss"]


def loss_fn(
    logits: Float[Tensor, "batch d_vocab_out"], labels: Int[Tensor, " batch"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy with the log-softmax in float64.

    Float32 log-softmax cannot represent losses below ~1e-7 and quantises them, which causes
    loss spikes late in grokking (Nanda et al. 2023, ``cross_entropy_high_precision``).
    """
    return F.cross_entropy(logits.to(torch.float64), labels)


def split_metrics(logits: Float[Tensor, "pair d_vocab_out"], task: Task) -> dict[str, float]:
    """Train/test loss (float64) and accuracy of full-grid logits on the task's saved split."""
    out: dict[str, float] = {}
    for split, idx in (("train", task.train_idx), ("test", task.test_idx)):
        if len(idx) == 0:
            out[f"{split}_loss"], out[f"{split}_acc"] = float("nan"), float("nan")
            continue
        lg, y = logits[idx], task.labels[idx].to(logits.device)
        out[f"{split}_loss"] = loss_fn(lg, y).item()
        out[f"{split}_acc"] = (lg.argmax(-1) == y).to(torch.float64).mean().item()
    return out


def stacked_loss(
    logits: Float[Tensor, "model batch d_vocab_out"],
    labels: Int[Tensor, "model batch"],
    weights: Float[Tensor, "model batch"],
) -> Float[Tensor, ""]:
    """Sum over members of each member's weighted cross-entropy (float64 log-softmax).

    With ``weights`` = 1/n on a member's n real rows and 0 on padding, each member's term is its
    own mean loss, so the gradient of the sum w.r.t. one member's weights is that member's alone.
    """
    return _WeightedCrossEntropy.apply(logits.flatten(0, 1), labels.flatten(), weights.flatten())


class _WeightedCrossEntropy(torch.autograd.Function):
    """``sum_r w_r CE(logits_r, label_r)``, log-softmax in float64, hand-differentiated.

    The same value and gradient as ``(F.cross_entropy(logits.double(), labels, reduction=
    "none") * w).sum()`` (tested), in half the time: one float64 buffer of exponentials serves
    the forward and becomes the gradient in place, with no one-hot fill or second pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, logits: Tensor, labels: Tensor, weights: Tensor
    ) -> Tensor:
        x = logits.detach().to(torch.float64, copy=True)  # never the caller's tensor
        x -= x.amax(-1, keepdim=True)
        picked = x.gather(1, labels[:, None])[:, 0]
        exp = x.exp_()
        total = exp.sum(-1)
        ctx.save_for_backward(exp, total, labels, weights)
        ctx.dtype = logits.dtype
        return (weights * (total.log() - picked)).sum()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g: Tensor
    ) -> tuple[Tensor | None, ...]:
        exp, total, labels, weights = ctx.saved_tensors
        gw = g * weights
        grad = exp.mul_((gw / total)[:, None])  # the softmax, scaled, in place
        grad[torch.arange(len(labels), device=grad.device), labels] -= gw
        return grad.to(ctx.dtype), None, None
