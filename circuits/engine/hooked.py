"""The reference step: the hooked model itself, trained eagerly with ``torch.optim.AdamW``.

It is the engine the fused one is checked against (``engine = "reference"``), a stack of one
driven by the same training loop (:mod:`circuits.trainer`) as the fused stack, with the same
step interface: call it for one update, ``evaluate()`` for the metrics, ``weights(i)`` and
``optimizer_state(i)`` for what the run folder saves.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine import fused
from circuits.engine.loss import loss_fn, split_metrics
from circuits.engine.stacked import warmup_lr
from circuits.model import Transformer, is_buffer_key
from circuits.tasks import Task

__all__ = ["HookedStep", "evaluate", "last_position_logits", "model_weights"]


def last_position_logits(
    model: Transformer, tokens: Int[Tensor, "batch pos"], engine: str = "fused"
) -> Float[Tensor, "batch d_vocab_out"]:
    """Last-position logits by the chosen engine (both compute the same function)."""
    if engine == "fused" and fused.supports(model):
        return fused.last_logits(model, tokens)
    return model(tokens)[:, -1]


@torch.no_grad()
def evaluate(model: Transformer, task: Task, engine: str = "fused") -> dict[str, float]:
    """Train/test loss (float64) and accuracy of the model on the full grid."""
    return split_metrics(last_position_logits(model, task.tokens, engine), task)


def model_weights(model: Transformer) -> dict[str, Tensor]:
    """The model's parameters as a state dict (its buffers, ``mask`` and ``IGNORE``, left out)."""
    return {k: v for k, v in model.state_dict().items() if not is_buffer_key(k)}


class HookedStep:
    """One full-batch AdamW update of one hooked model per call (PyTorch's single-tensor path,
    ``foreach=False``, so the same run gives the same bits every time).

    ``opt_tensors`` is a resume point's optimizer state (``opt.<param>.exp_avg``, ...; empty
    before the first update) and ``updates`` the number of updates already taken, which sets
    the learning rate of the next one.
    """

    def __init__(
        self, model: Transformer, config: RunConfig, task: Task, opt_tensors: dict[str, Tensor], updates: int
    ) -> None:
        t = config.train
        self.model, self.task, self.updates = model, task, updates
        self._lr, self._warmup = (torch.tensor(float(v), dtype=torch.float64) for v in (t.lr, t.warmup_steps))
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
            foreach=False,
        )
        for name, p in model.named_parameters():
            if f"opt.{name}.exp_avg" in opt_tensors:
                self.opt.state[p] = {
                    key: opt_tensors[f"opt.{name}.{key}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")
                }
        self.x, self.y = task.train_data()

    def __call__(self) -> None:
        lr = float(warmup_lr(self._lr, self._warmup, torch.tensor(float(self.updates), dtype=torch.float64)))
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_fn(last_position_logits(self.model, self.x, "reference"), self.y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1

    def evaluate(self) -> list[dict[str, float]]:
        """The member's train/test metrics, as a list of one."""
        return [evaluate(self.model, self.task, "reference")]

    def weights(self, i: int) -> dict[str, Tensor]:
        """The model's parameters (``i`` is 0: a stack of one)."""
        return model_weights(self.model)

    def optimizer_state(self, i: int) -> dict[str, Tensor]:
        """AdamW's moments and step count in the run folder's resume layout."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out: dict[str, Tensor] = {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state.get(p)
                if state:
                    for key in ("exp_avg", "exp_avg_sq", "step"):
                        out[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(state[key])
        return out
