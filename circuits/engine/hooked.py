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
from circuits.engine.optim import EMBED_PARAMS, Batches, NORM_TARGET_KEY, GradFilter, constrain_norm_, flat_norm, moment_names, split_blocks
from circuits.engine.stacked import warmup_lr
from circuits.model import Model, is_buffer_key
from circuits.tasks import Task

__all__ = ["HookedStep", "evaluate", "last_position_logits", "model_weights"]


def last_position_logits(
    model: Model, tokens: Int[Tensor, "batch pos"], engine: str = "fused"
) -> Float[Tensor, "batch d_vocab_out"]:
    """Last-position logits by the chosen engine (both compute the same function)."""
    if engine == "fused" and fused.supports(model):
        return fused.last_logits(model, tokens)
    return model(tokens)[:, -1]


@torch.no_grad()
def evaluate(model: Model, task: Task, engine: str = "fused") -> dict[str, float]:
    """Train/test loss (float64) and accuracy of the model on the full grid."""
    return split_metrics(last_position_logits(model, task.tokens, engine), task)


def model_weights(model: Model) -> dict[str, Tensor]:
    """The model's parameters as a state dict (its buffers, ``mask`` and ``IGNORE``, left out)."""
    return {k: v for k, v in model.state_dict().items() if not is_buffer_key(k)}


class HookedStep:
    """One full-batch update of one hooked model per call, by ``torch.optim`` itself (AdamW,
    Adam or SGD, their single-tensor path, ``foreach=False``, so the same run gives the same
    bits every time), with the embeddings as their own parameter group when their learning rate
    or weight decay is set. Grokfast's filter and Omnigrok's norm constraint are
    :mod:`circuits.engine.optim`'s, on this model's gradients and weights flattened as a stack
    of one.

    ``opt_tensors`` is a resume point's optimizer state (``opt.<param>.exp_avg``, ...; empty
    before the first update) and ``updates`` the number of updates already taken, which sets
    the learning rate of the next one.
    """

    def __init__(
        self, model: Model, config: RunConfig, task: Task, opt_tensors: dict[str, Tensor], updates: int
    ) -> None:
        t = config.train
        self.model, self.task, self.updates = model, task, updates
        f64 = torch.float64
        self._warmup = torch.tensor(float(t.warmup_steps), dtype=f64)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        embed = [p for n, p in self.named if n in EMBED_PARAMS]
        rest = [p for n, p in self.named if n not in EMBED_PARAMS]
        grouped = t.embed_lr is not None or t.embed_weight_decay is not None
        groups = [{"params": rest if grouped else [p for _, p in self.named], "lr": t.lr,
                   "weight_decay": t.weight_decay}]
        if grouped and embed:
            groups.append({"params": embed, "lr": t.lr if t.embed_lr is None else t.embed_lr,
                           "weight_decay": t.weight_decay if t.embed_weight_decay is None else t.embed_weight_decay})
        self._base_lr = [torch.tensor(float(g["lr"]), dtype=f64) for g in groups]
        if t.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, foreach=False)
        else:
            cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
            self.opt = cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)
        self._moments = moment_names(t)
        for name, p in self.named:
            if f"opt.{name}.step" not in opt_tensors:
                continue
            state = {m: opt_tensors[f"opt.{name}.{m}"].clone() for m in self._moments}
            if t.optimizer != "sgd":
                state["step"] = opt_tensors[f"opt.{name}.step"].clone()
            self.opt.state[p] = state
        ps = [p for _, p in self.named]
        self.filter = GradFilter([config], [n for n, _ in self.named], [p.shape for p in ps],
                                 ps[0].dtype, ps[0].device)
        self.filter.load_member(0, opt_tensors)
        self.norm_target = flat_norm([self._flat()]) if t.constrain_norm else None
        if t.constrain_norm and NORM_TARGET_KEY in opt_tensors:
            self.norm_target = opt_tensors[NORM_TARGET_KEY].to(f64).reshape(1)
        self.x, self.y = task.train_data()
        self.batches = Batches(len(self.y), config.batch, config.model.seed)

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(1, -1) for _, p in self.named], dim=1)

    def __call__(self) -> None:
        update = torch.tensor(float(self.updates), dtype=torch.float64)
        for group, base in zip(self.opt.param_groups, self._base_lr):
            group["lr"] = float(warmup_lr(base, self._warmup, update))
        x, y = self.x, self.y
        if not self.batches.full:
            idx = self.batches.indices(self.updates)
            x, y = x[idx], y[idx]
        self.model.train()  # dropout, where the model has it, is on for the update only
        try:
            loss_fn(last_position_logits(self.model, x, "reference"), y).backward()
        finally:
            self.model.eval()
        if self.filter.active:
            grads = self.filter(torch.cat([p.grad.reshape(1, -1) for _, p in self.named], dim=1))
            for (_, p), g in zip(self.named, split_blocks(grads[0], [p.shape for _, p in self.named])):
                p.grad = g.clone()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.norm_target is not None:
            with torch.no_grad():
                flat = self._flat()
                constrain_norm_([flat], self.norm_target)
                for (_, p), w in zip(self.named, split_blocks(flat[0], [p.shape for _, p in self.named])):
                    p.copy_(w)
        self.updates += 1

    def evaluate(self) -> list[dict[str, float]]:
        """The member's train/test metrics, as a list of one."""
        return [evaluate(self.model, self.task, "reference")]

    def weights(self, i: int) -> dict[str, Tensor]:
        """The model's parameters (``i`` is 0: a stack of one)."""
        return model_weights(self.model)

    def optimizer_state(self, i: int) -> dict[str, Tensor]:
        """The optimiser's moments, step count, Grokfast state and norm target in the run
        folder's resume layout."""
        out: dict[str, Tensor] = {}
        if self.updates == 0:
            return out
        for name, p in self.named:
            state = self.opt.state.get(p, {})
            for m in self._moments:
                out[f"opt.{name}.{m}"] = torch.as_tensor(state[m])
            out[f"opt.{name}.step"] = torch.tensor(float(self.updates), dtype=torch.float32)
        out.update(self.filter.member_tensors(0))
        if self.norm_target is not None:
            out[NORM_TARGET_KEY] = self.norm_target[0].clone()
        return out
