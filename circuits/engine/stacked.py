"""A stack of same-shaped models as one set of tensors, and the optimiser over the stack.

Each member keeps its own hyperparameters (learning rate, weight decay, betas, epsilon, warm-up,
Grokfast's alpha and lambda, the embeddings' learning rate and weight decay):
they become per-member tensors broadcast over the leading ``model`` axis, so an ensemble of
E members is one elementwise update. The default update is PyTorch's AdamW (decoupled weight
decay, Loshchilov & Hutter 2019) written out, in the same order of operations as its
single-tensor path, so one member of a stack follows the same trajectory as that member trained
alone; Adam (coupled L2) and SGD are the options of :class:`StackedOptimizer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine.optim import EMBED_PARAMS, NORM_TARGET_KEY, GradFilter, constrain_norm_, flat_norm, moment_names
from circuits.model import Transformer

__all__ = ["StackedOptimizer", "StackedAdamW", "stack_models", "member_state", "check_stackable", "stack_key", "warmup_lr"]

#: Training fields that must agree across an ensemble: they set the shared loop and schedule.
SHARED_TRAIN_FIELDS = (
    "epochs", "checkpoint_every", "checkpoint_early_every", "checkpoint_early_until", "log_every",
    "optimizer", "grokfast", "grokfast_window",
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
    key.pop("init_scale")  # it scales the initial weights, not their shapes
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
            what = "the schedule and optimiser" if key in SHARED_TRAIN_FIELDS else "shapes"
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


class StackedOptimizer:
    """The optimiser over stacked parameters, with per-member hyperparameters and warm-up.

    AdamW (default), Adam with coupled L2 weight decay, or SGD with momentum, each with
    torch.optim's semantics; optionally separate learning rate and weight decay for the
    embeddings (Liu et al. 2022's parameter groups), Grokfast's gradient filter (applied between
    the backward pass and the update) and Omnigrok's norm constraint (applied after it), both
    from :mod:`circuits.engine.optim`. Members of one stack share the optimiser, the filter
    and whether the norm is constrained (``stack_key``).

    The trainable parameters are moved into one flat ``[model, n_params]`` buffer per dtype
    (each parameter tensor stays the same object, now a view of it), and so are the moments,
    so an update is a dozen elementwise ops over the whole stack instead of a dozen per
    parameter: on a GPU each op is a kernel launch, and a Nanda-sized run has 9 trainable
    tensors. ``state[name]`` holds the moments (``exp_avg`` and ``exp_avg_sq``, or SGD's
    ``momentum_buffer``) with the parameter's stacked shape (views of the flat moments);
    ``step`` is the per-member count of updates taken (a float64 tensor ``[model]``). AdamW's
    update is PyTorch's single-tensor path written out in the same order of operations, so one
    member of a stack follows the same trajectory as that member trained alone.
    """

    def __init__(self, params: dict[str, Tensor], configs: Sequence[RunConfig]) -> None:
        self.params = {n: p for n, p in params.items() if p.requires_grad}
        self.configs = list(configs)
        n = len(configs)
        tr = [c.train for c in configs]
        self.kind = tr[0].optimizer
        # Hyperparameters live beside the weights so a GPU step never waits on the host.
        kw = {"dtype": torch.float64, "device": next(iter(params.values())).device}
        self.lr = torch.tensor([t.lr for t in tr], **kw)
        self.weight_decay = torch.tensor([t.weight_decay for t in tr], **kw)
        self.embed_lr = torch.tensor([t.lr if t.embed_lr is None else t.embed_lr for t in tr], **kw)
        self.embed_weight_decay = torch.tensor(
            [t.weight_decay if t.embed_weight_decay is None else t.embed_weight_decay for t in tr], **kw)
        self.grouped = any(t.embed_lr is not None or t.embed_weight_decay is not None for t in tr)
        self.beta1 = torch.tensor([t.beta1 for t in tr], **kw)
        self.beta2 = torch.tensor([t.beta2 for t in tr], **kw)
        self.eps = torch.tensor([t.eps for t in tr], **kw)
        self.momentum = torch.tensor([t.momentum for t in tr], **kw)
        self.warmup = torch.tensor([t.warmup_steps for t in tr], **kw)
        self.step_count = torch.zeros(n, **kw)
        self.state: dict[str, dict[str, Tensor]] = {}
        self._groups: list[_FlatGroup] = []
        self._moments = moment_names(tr[0])
        for dtype in dict.fromkeys(p.dtype for p in self.params.values()):
            names = [k for k, p in self.params.items() if p.dtype == dtype]
            group = _FlatGroup([self.params[k] for k in names], n, self._moments)
            group.names = names
            group.embed = torch.cat([torch.full((sl.stop - sl.start,), k in EMBED_PARAMS, device=kw["device"])
                                     for k, sl in zip(names, group.slices)])[None, :]
            group.filter = GradFilter(configs, names, [self.params[k].shape[1:] for k in names], dtype,
                                      kw["device"])
            self._groups.append(group)
            for i, k in enumerate(names):
                self.state[k] = {m: group.view(group.moments[m])[i] for m in self._moments}
        # Omnigrok: each member's total norm as it starts (its initialisation; a resume point
        # restores the target saved with it). 0 leaves a member unconstrained.
        self.constrained = any(t.constrain_norm for t in tr)
        on = torch.tensor([t.constrain_norm for t in tr], device=kw["device"])
        self.norm_target = torch.where(on, flat_norm([g.flat for g in self._groups]), 0.0)

    @property
    def capturable(self) -> bool:
        """Whether an update is pure tensor work a CUDA graph can replay (no host-side state:
        Grokfast's filters and SGD's first momentum step branch on the host)."""
        return self.kind != "sgd" and all(not g.filter.active for g in self._groups)

    def lr_at(self, update: Tensor) -> Tensor:
        """Per-member learning rate of 0-based update ``update``: linear warm-up, then constant."""
        return warmup_lr(self.lr, self.warmup, update)

    def _columns(self, group: _FlatGroup, main: Tensor, embed: Tensor) -> Tensor:
        """A per-member hyperparameter as ``[model, 1]``, or ``[model, n_params]`` with the
        embeddings' own value in their columns when parameter groups are in use."""
        if not self.grouped:
            return main[:, None]
        return torch.where(group.embed, embed[:, None], main[:, None])

    @torch.no_grad()
    def step(self) -> None:
        """One update of every member (PyTorch's single-tensor order of operations)."""
        lr = self.lr_at(self.step_count)
        embed_lr = warmup_lr(self.embed_lr, self.warmup, self.step_count) if self.grouped else lr
        first = self.step_count == 0
        self.step_count += 1
        bc1 = 1 - self.beta1**self.step_count
        bc2_sqrt = (1 - self.beta2**self.step_count).sqrt()
        for group in self._groups:
            grads = [p.grad for p in group.params]
            if all(g is None for g in grads):
                continue
            # A parameter without a gradient keeps its weights and moments, as torch.optim
            # skips it (never the case in this package's training; unlike torch, the step count
            # is per member, not per parameter).
            kept = [
                (sl, [t[:, sl].clone() for t in (group.flat, *group.moments.values())])
                for sl, g in zip(group.slices, grads) if g is None
            ]
            n = group.flat.shape[0]
            grad = torch.cat([
                torch.zeros(n, sl.stop - sl.start, dtype=group.flat.dtype, device=group.flat.device)
                if g is None else g.reshape(n, -1)
                for sl, g in zip(group.slices, grads)
            ], dim=1)
            if group.filter.active:
                grad = group.filter(grad)
            lr_c = self._columns(group, lr, embed_lr)
            wd_c = self._columns(group, self.weight_decay, self.embed_weight_decay)
            if self.kind == "sgd":
                self._sgd(group, grad, lr_c, wd_c, first)
            else:
                self._adam(group, grad, lr_c, wd_c, bc1, bc2_sqrt)
            for sl, saved in kept:
                for t, old in zip((group.flat, *group.moments.values()), saved):
                    t[:, sl] = old
        if self.constrained:
            constrain_norm_([g.flat for g in self._groups], self.norm_target)

    def _adam(self, group: _FlatGroup, grad: Tensor, lr: Tensor, wd: Tensor, bc1: Tensor,
              bc2_sqrt: Tensor) -> None:
        # Scalars per member (or per member and column), computed in float64 as PyTorch does in
        # Python, then cast to the weights' dtype: each element gets exactly the arithmetic of
        # torch.optim.AdamW's single-tensor loop, so flattening changes no bit.
        dtype = group.flat.dtype
        decay = (1 - lr * wd).to(dtype)
        size = (lr / bc1[:, None]).to(dtype)
        cast = torch.stack((1 - self.beta1, self.beta2, 1 - self.beta2, bc2_sqrt, self.eps)).to(dtype)[:, :, None]
        one_m_beta1, beta2, one_m_beta2, bc2, eps = cast
        p, exp_avg, exp_avg_sq = group.flat, group.moments["exp_avg"], group.moments["exp_avg_sq"]
        if self.kind == "adamw":
            p.mul_(decay)
        else:  # Adam: the weight decay is an L2 term in the gradient (torch.optim.Adam)
            grad = torch.addcmul(grad, p, wd.to(dtype))
        exp_avg.lerp_(grad, one_m_beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad * one_m_beta2, grad)
        denom = (exp_avg_sq.sqrt() / bc2).add_(eps)
        p.sub_(size * exp_avg / denom)

    def _sgd(self, group: _FlatGroup, grad: Tensor, lr: Tensor, wd: Tensor, first: Tensor) -> None:
        # torch.optim.SGD without dampening or Nesterov: d = g + wd * p; with momentum the
        # buffer starts at the first d, then buf <- momentum * buf + d; p <- p - lr * d.
        # addcmul computes a + b * c as torch's add(alpha=) does (one rounding where it fuses),
        # so a member gets torch.optim.SGD's bits.
        dtype = group.flat.dtype
        p = group.flat
        d = torch.addcmul(grad, p, wd.to(dtype))
        if "momentum_buffer" in group.moments:
            buf = group.moments["momentum_buffer"]
            buf.copy_(torch.where(first[:, None], d, buf * self.momentum.to(dtype)[:, None] + d))
            d = buf
        p.addcmul_(d, (-lr).to(dtype))

    def zero_grad(self) -> None:
        """Drop every gradient (set to None, as ``Optimizer.zero_grad`` does by default)."""
        for p in self.params.values():
            p.grad = None

    def member_tensors(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s optimizer state in the run folder's resume layout (moments, step
        count, Grokfast state, norm target)."""
        out = {}
        if float(self.step_count[i]) == 0:
            return out
        for name in self.params:
            for m, t in self.state[name].items():
                out[f"opt.{name}.{m}"] = t[i].to("cpu", copy=True)
            out[f"opt.{name}.step"] = self.step_count[i].to("cpu", torch.float32, copy=True)
        for group in self._groups:
            out.update(group.filter.member_tensors(i))
        if self.configs[i].train.constrain_norm:  # only a constrained member has a target
            out[NORM_TARGET_KEY] = self.norm_target[i].to("cpu", copy=True)
        return out

    def load_member(self, i: int, tensors: dict[str, Tensor]) -> None:
        """Restore member ``i``'s optimizer state from a resume point (absent: no steps yet)."""
        for name in self.params:
            key = f"opt.{name}.step"
            if key not in tensors:
                continue
            for m in self._moments:
                self.state[name][m][i] = tensors[f"opt.{name}.{m}"]
            self.step_count[i] = float(tensors[key])
        for group in self._groups:
            group.filter.load_member(i, tensors)
        if NORM_TARGET_KEY in tensors:
            self.norm_target[i] = tensors[NORM_TARGET_KEY].to(self.norm_target.dtype)


#: The name it had while it was AdamW only (benchmarks and notebooks import it).
StackedAdamW = StackedOptimizer


class _FlatGroup:
    """Same-dtype parameters re-homed as column blocks of one ``[model, n_params]`` buffer, with
    the optimiser's moments (``moments``) in the same layout."""

    names: list[str]
    embed: Tensor
    filter: GradFilter

    def __init__(self, params: list[Tensor], n_models: int, moments: Sequence[str] = ("exp_avg", "exp_avg_sq")) -> None:
        self.params = params
        self.flat = torch.cat([p.detach().reshape(n_models, -1) for p in params], dim=1)
        self.slices, start = [], 0
        for p in params:
            size = p[0].numel()  # an ensemble has at least one member (check_stackable)
            self.slices.append(slice(start, start + size))
            start += size
        for p, view in zip(params, self.view(self.flat)):
            p.data = view  # the same leaf tensor, now stored in the flat buffer
        self.moments = {m: torch.zeros_like(self.flat) for m in moments}

    def view(self, flat: Tensor) -> list[Tensor]:
        """Each parameter's block of ``flat``, in the parameter's stacked shape."""
        return [flat[:, sl].view(p.shape) for sl, p in zip(self.slices, self.params)]
