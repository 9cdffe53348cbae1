"""A stack of same-shaped models as one set of tensors, and AdamW over the stack.

Each member keeps its own hyperparameters (learning rate, weight decay, betas, epsilon, warm-up):
they become per-member tensors broadcast over the leading ``model`` axis, so an ensemble of
E members is one elementwise update. The update is PyTorch's AdamW (decoupled weight decay,
Loshchilov & Hutter 2019) written out, in the same order of operations as its single-tensor
path, so one member of a stack follows the same trajectory as that member trained alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from circuits.config import RunConfig
from circuits.model import Transformer

__all__ = ["StackedAdamW", "stack_models", "member_state", "check_stackable", "stack_key", "warmup_lr"]

#: Training fields that must agree across an ensemble: they set the shared loop and schedule.
SHARED_TRAIN_FIELDS = (
    "epochs", "checkpoint_every", "checkpoint_early_every", "checkpoint_early_until", "log_every",
)


def warmup_lr(lr: Tensor, warmup: Tensor, update: Tensor) -> Tensor:
    """The learning rate of 0-based update ``update``: linear warm-up over ``warmup`` updates,
    then constant (as the official code's ``LambdaLR(min(step / warmup, 1))``: the first update
    of a warm-up has lr 0). Float64 tensors, elementwise, so a stack computes every member's
    rate on the device; the one schedule of both engines.
    """
    ramp = torch.where(warmup > 0, update / warmup.clamp(min=1), 1.0)
    return lr * ramp.clamp(max=1.0)


def stack_key(config: RunConfig) -> dict[str, object]:
    """What members of one stack must share: the model's shape (every model field but the seed),
    the task's layout (tokens, classes, sequence length, elements), the schedule and the engine."""
    t = config.task
    # The config field a user sets comes first, so a refusal names it (p for a modular task);
    # the layout it implies follows, so any task whose layout differs is told apart too.
    key: dict[str, object] = {"p": t.p}
    key.update(dataclasses.asdict(config.model))
    key.pop("seed")
    key.update(d_vocab=t.n_tokens, d_vocab_out=t.n_classes, n_ctx=t.n_ctx, n_elements=t.n_elements)
    key.update({k: getattr(config.train, k) for k in SHARED_TRAIN_FIELDS})
    key["engine"] = config.train.engine
    return key


def check_stackable(configs: Sequence[RunConfig]) -> None:
    """Raise ``ValueError`` naming the first field that keeps these runs out of one stack."""
    if not configs:
        raise ValueError("an ensemble needs at least one run config")
    first = stack_key(configs[0])
    for i, cfg in enumerate(configs[1:], start=1):
        other = stack_key(cfg)
        for key, value in first.items():
            if other[key] == value:
                continue
            if key == "engine":
                raise ValueError(f"member {i} uses engine {other[key]!r}; ensembles are fused")
            what = "the schedule" if key in SHARED_TRAIN_FIELDS else "shapes"
            raise ValueError(
                f"member {i} has {key}={other[key]!r} but member 0 has {value!r}: members of one "
                f"ensemble share {what}; put it in a separate ensemble"
            )


def stack_models(models: Sequence[Transformer], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Copy the members' parameters into stacked leaf tensors ``[model, ...]`` on ``device``."""
    stacked = {}
    for name, p in models[0].named_parameters():
        t = torch.stack([dict(m.named_parameters())[name].detach() for m in models]).to(device, copy=True)
        stacked[name] = t.requires_grad_(p.requires_grad)
    return stacked


def member_state(stacked: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Member ``i``'s parameters as a plain CPU state dict (contiguous copies, ready to save)."""
    return {name: t[i].detach().to("cpu", copy=True) for name, t in stacked.items()}


class StackedAdamW:
    """AdamW over stacked parameters, with per-member hyperparameters and warm-up.

    The trainable parameters are moved into one flat ``[model, n_params]`` buffer per dtype
    (each parameter tensor stays the same object, now a view of it), and so are both moments,
    so an update is a dozen elementwise ops over the whole stack instead of a dozen per
    parameter: on a GPU each op is a kernel launch, and a Nanda-sized run has 9 trainable
    tensors. ``state[name]`` holds ``exp_avg`` and ``exp_avg_sq`` with the parameter's stacked
    shape (views of the flat moments); ``step`` is the per-member count of updates taken (a
    float64 tensor ``[model]``).
    """

    def __init__(self, params: dict[str, Tensor], configs: Sequence[RunConfig]) -> None:
        self.params = {n: p for n, p in params.items() if p.requires_grad}
        self.configs = list(configs)
        n = len(configs)
        tr = [c.train for c in configs]
        # Hyperparameters live beside the weights so a GPU step never waits on the host.
        kw = {"dtype": torch.float64, "device": next(iter(params.values())).device}
        self.lr = torch.tensor([t.lr for t in tr], **kw)
        self.weight_decay = torch.tensor([t.weight_decay for t in tr], **kw)
        self.beta1 = torch.tensor([t.beta1 for t in tr], **kw)
        self.beta2 = torch.tensor([t.beta2 for t in tr], **kw)
        self.eps = torch.tensor([t.eps for t in tr], **kw)
        self.warmup = torch.tensor([t.warmup_steps for t in tr], **kw)
        self.step_count = torch.zeros(n, **kw)
        self.state: dict[str, dict[str, Tensor]] = {}
        self._groups: list[_FlatGroup] = []
        for dtype in dict.fromkeys(p.dtype for p in self.params.values()):
            names = [k for k, p in self.params.items() if p.dtype == dtype]
            group = _FlatGroup([self.params[k] for k in names], n)
            self._groups.append(group)
            for k, m, v in zip(names, group.view(group.exp_avg), group.view(group.exp_avg_sq)):
                self.state[k] = {"exp_avg": m, "exp_avg_sq": v}

    def lr_at(self, update: Tensor) -> Tensor:
        """Per-member learning rate of 0-based update ``update``: linear warm-up, then constant."""
        return warmup_lr(self.lr, self.warmup, update)

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every member (PyTorch's single-tensor order of operations)."""
        lr = self.lr_at(self.step_count)
        self.step_count += 1
        bc1 = 1 - self.beta1**self.step_count
        bc2_sqrt = (1 - self.beta2**self.step_count).sqrt()
        decay = 1 - lr * self.weight_decay
        step_size = lr / bc1
        # Scalars per member, computed in float64 as PyTorch does in Python, then cast to the
        # weights' dtype and viewed as a column: each element gets exactly the arithmetic of
        # torch.optim.AdamW's single-tensor loop, so flattening changes no bit.
        scalars = (decay, 1 - self.beta1, self.beta2, 1 - self.beta2, bc2_sqrt, self.eps, step_size)
        for group in self._groups:
            grads = [p.grad for p in group.params]
            if all(g is None for g in grads):
                continue
            cast = torch.stack(scalars).to(group.flat.dtype)[:, :, None]  # one cast, not 7
            p_decay, one_m_beta1, beta2, one_m_beta2, bc2, eps, size = cast
            # A parameter without a gradient keeps its weights and moments, as torch.optim.AdamW
            # skips it (never the case in this package's training; unlike torch, the step count
            # is per member, not per parameter).
            kept = [
                (sl, [t[:, sl].clone() for t in (group.flat, group.exp_avg, group.exp_avg_sq)])
                for sl, g in zip(group.slices, grads) if g is None
            ]
            n = group.flat.shape[0]
            grad = torch.cat([
                torch.zeros(n, sl.stop - sl.start, dtype=group.flat.dtype, device=group.flat.device)
                if g is None else g.reshape(n, -1)
                for sl, g in zip(group.slices, grads)
            ], dim=1)
            p, exp_avg, exp_avg_sq = group.flat, group.exp_avg, group.exp_avg_sq
            p.mul_(p_decay)
            exp_avg.lerp_(grad, one_m_beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad * one_m_beta2, grad)
            denom = (exp_avg_sq.sqrt() / bc2).add_(eps)
            p.sub_(size * exp_avg / denom)
            for sl, saved in kept:
                for t, old in zip((group.flat, group.exp_avg, group.exp_avg_sq), saved):
                    t[:, sl] = old

    def zero_grad(self) -> None:
        """Drop every gradient (set to None, as ``Optimizer.zero_grad`` does by default)."""
        for p in self.params.values():
            p.grad = None

    def member_tensors(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s optimizer state in the run folder's resume layout."""
        out = {}
        for name in self.params:
            st = self.state[name]
            if float(self.step_count[i]) == 0:
                continue
            out[f"opt.{name}.exp_avg"] = st["exp_avg"][i].to("cpu", copy=True)
            out[f"opt.{name}.exp_avg_sq"] = st["exp_avg_sq"][i].to("cpu", copy=True)
            out[f"opt.{name}.step"] = self.step_count[i].to("cpu", torch.float32, copy=True)
        return out

    def load_member(self, i: int, tensors: dict[str, Tensor]) -> None:
        """Restore member ``i``'s optimizer state from a resume point (absent: no steps yet)."""
        for name in self.params:
            key = f"opt.{name}.exp_avg"
            if key not in tensors:
                continue
            self.state[name]["exp_avg"][i] = tensors[key]
            self.state[name]["exp_avg_sq"][i] = tensors[f"opt.{name}.exp_avg_sq"]
            self.step_count[i] = float(tensors[f"opt.{name}.step"])


class _FlatGroup:
    """Same-dtype parameters re-homed as column blocks of one ``[model, n_params]`` buffer."""

    def __init__(self, params: list[Tensor], n_models: int) -> None:
        self.params = params
        self.flat = torch.cat([p.detach().reshape(n_models, -1) for p in params], dim=1)
        self.slices, start = [], 0
        for p in params:
            size = p[0].numel()  # an ensemble has at least one member (check_stackable)
            self.slices.append(slice(start, start + size))
            start += size
        for p, view in zip(params, self.view(self.flat)):
            p.data = view  # the same leaf tensor, now stored in the flat buffer
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)

    def view(self, flat: Tensor) -> list[Tensor]:
        """Each parameter's block of ``flat``, in the parameter's stacked shape."""
        return [flat[:, sl].view(p.shape) for sl, p in zip(self.slices, self.params)]
