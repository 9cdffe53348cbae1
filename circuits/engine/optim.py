"""The training knobs both engines share: Grokfast's gradient filters, Omnigrok's norm constraint,
and the names of every optimiser state a resume point holds (one place for all of them).

Both engines run the same code on the same flat layout, ``[model, n_params]`` with the trainable
parameters as column blocks in ``named_parameters`` order: the fused engine's stacked optimiser
holds its gradients that way already, and the reference engine (``torch.optim`` on the hooked
model) flattens its gradients into a stack of one, filters them here and writes them back. So a
filter or a constraint is written once, and its state is saved and restored per member under
each parameter's name (``opt.<param>.grokfast_ema``, ``opt.<param>.grokfast_ma``) by
:meth:`GradFilter.member_tensors` / :meth:`GradFilter.load_member`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.config import RunConfig, TrainConfig

__all__ = ["Batches", "GradFilter", "constrain_norm_", "flat_norm", "split_blocks", "moment_names", "filter_names",
           "state_names", "NORM_TARGET_KEY", "EMBED_PARAMS"]

#: Resume key of the constrained-norm target (float64 scalar, the norm just after initialisation).
NORM_TARGET_KEY = "opt.norm_target"
#: The "embeddings" of the parameter groups (science.md, Decisions: knobs).
EMBED_PARAMS = ("embed.W_E", "pos_embed.W_pos")


def moment_names(train: TrainConfig) -> tuple[str, ...]:
    """The per-parameter optimiser moments of this optimiser (torch.optim's state names)."""
    if train.optimizer in ("adamw", "adam"):
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if train.momentum else ()


def filter_names(train: TrainConfig) -> tuple[str, ...]:
    """The per-parameter Grokfast state names (``grokfast_ma`` holds up to ``window`` gradients,
    oldest first)."""
    return {"ema": ("grokfast_ema",), "ma": ("grokfast_ma",)}.get(train.grokfast, ())


def state_names(train: TrainConfig) -> tuple[str, ...]:
    """Every per-parameter state a resume point may hold after the first update, ``step`` included."""
    return (*moment_names(train), "step", *filter_names(train))


def split_blocks(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """The column blocks of ``flat [..., n_params]`` as views, each reshaped to ``[..., *shape]``."""
    out, start = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        out.append(flat[..., start:start + size].reshape(*flat.shape[:-1], *shape))
        start += size
    return out


class GradFilter:
    """Grokfast (Lee et al. 2024) over flat gradients ``[model, n_params]``, per member.

    * ``ema``: mu <- alpha * mu + (1 - alpha) * g (mu starts at the first gradient), then
      g <- g + lambda * mu;
    * ``ma``: the last ``window`` gradients are kept; once there are ``window`` of them,
      g <- g + lambda * (their sum, oldest first, / window); before that g is unchanged.

    The arithmetic is the reference implementation's (``ironjr/grokfast``: ``gradfilter_ema``,
    ``gradfilter_ma`` with ``filter_type="mean"``, ``warmup=True``), per element. Members of one
    stack share the filter and its window; alpha and lambda are per member. ``names`` and
    ``shapes`` describe the column blocks, for the resume layout.
    """

    def __init__(self, configs: Sequence[RunConfig], names: Sequence[str], shapes: Sequence[torch.Size],
                 dtype: torch.dtype, device: torch.device) -> None:
        train = configs[0].train
        self.kind, self.window = train.grokfast, train.grokfast_window
        self.names, self.shapes = list(names), list(shapes)
        n, width = len(configs), sum(int(torch.Size(s).numel()) for s in shapes)
        self.alpha = torch.tensor([c.train.grokfast_alpha for c in configs], dtype=dtype, device=device)[:, None]
        self.gain = torch.tensor([c.train.grokfast_gain for c in configs], dtype=dtype, device=device)[:, None]
        self.ema: Tensor | None = None
        self.queue = torch.zeros(n, self.window, width, dtype=dtype, device=device) if self.kind == "ma" else None
        self.filled = 0  # gradients in the queue (members of one stack are at one epoch)
        self.head = 0  # where the next one goes (the oldest, once full)
        self._n, self._width, self._dtype, self._device = n, width, dtype, device

    @property
    def active(self) -> bool:
        """Whether this filter changes anything (``grokfast != "none"``)."""
        return self.kind != "none"

    def __call__(self, grad: Float[Tensor, "model n_params"]) -> Float[Tensor, "model n_params"]:
        """The filtered gradients (a new tensor; ``grad`` itself is not changed)."""
        if self.kind == "ema":
            # As the reference: mu starts at the first gradient, then the update applies to it.
            mu = grad.clone() if self.ema is None else self.ema
            self.ema = mu * self.alpha + grad * (1 - self.alpha)
            return grad + self.ema * self.gain
        if self.kind == "ma":
            assert self.queue is not None
            self.queue[:, self.head] = grad
            self.head = (self.head + 1) % self.window
            self.filled = min(self.filled + 1, self.window)
            if self.filled < self.window:
                return grad
            total = self.queue[:, self.head].clone()  # the reference sums 0 + g_oldest + ... in order
            for k in range(1, self.window):
                total = total + self.queue[:, (self.head + k) % self.window]
            return grad + total / self.window * self.gain
        return grad

    def member_tensors(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s filter state in the resume layout (empty before the first update)."""
        out: dict[str, Tensor] = {}
        if self.kind == "ema" and self.ema is not None:
            for name, block in zip(self.names, split_blocks(self.ema[i], self.shapes)):
                out[f"opt.{name}.grokfast_ema"] = block.to("cpu", copy=True)
        elif self.kind == "ma" and self.filled:
            assert self.queue is not None
            order = [(self.head - self.filled + k) % self.window for k in range(self.filled)]
            kept = self.queue[i, order]  # oldest first
            for name, block in zip(self.names, split_blocks(kept, self.shapes)):
                out[f"opt.{name}.grokfast_ma"] = block.to("cpu", copy=True)
        return out

    def load_member(self, i: int, tensors: dict[str, Tensor]) -> None:
        """Restore member ``i``'s filter state from a resume point (absent: no update yet)."""
        if self.kind == "ema" and f"opt.{self.names[0]}.grokfast_ema" in tensors:
            flat = torch.cat([tensors[f"opt.{n}.grokfast_ema"].reshape(-1) for n in self.names])
            if self.ema is None:
                self.ema = torch.zeros(self._n, self._width, dtype=self._dtype, device=self._device)
            self.ema[i] = flat
        elif self.kind == "ma" and f"opt.{self.names[0]}.grokfast_ma" in tensors:
            assert self.queue is not None
            blocks = [tensors[f"opt.{n}.grokfast_ma"] for n in self.names]
            filled = blocks[0].shape[0]
            flat = torch.cat([b.reshape(filled, -1) for b in blocks], dim=1)
            self.queue[i, :filled] = flat
            self.filled, self.head = filled, filled % self.window


def flat_norm(flats: Sequence[Float[Tensor, "model _"]]) -> Float[Tensor, " model"]:
    """Each member's total L2 norm over the column blocks of ``flats``, in float64."""
    return torch.stack([f.double().pow(2).sum(1) for f in flats]).sum(0).sqrt()


def constrain_norm_(flats: Sequence[Float[Tensor, "model _"]], target: Float[Tensor, " model"]) -> None:
    """Omnigrok's constrained-norm training (Liu et al. 2022b): rescale each member's weights, in
    place, to its ``target`` total L2 norm (members whose target is 0 are left alone)."""
    scale = torch.where(target > 0, target / flat_norm(flats), torch.ones_like(target))
    for f in flats:
        f.mul_(scale.to(f.dtype)[:, None])


class Batches:
    """Which training pairs each update sees (Power et al.'s minibatches; full batch without).

    Update u is batch ``u % k`` of pass ``u // k`` (k = ceil(n_train / size) batches per pass);
    each pass is a fresh permutation of the training set drawn from a generator seeded by the
    run's model seed and the pass number, the last partial batch kept. The update count alone
    fixes the sampler's place, so the resume file's step count is its state.
    """

    def __init__(self, n_train: int, size: int | None, seed: int) -> None:
        self.n_train, self.size, self.seed = n_train, size, seed
        self.per_pass = 1 if size is None else -(-n_train // size)
        self._pass: tuple[int, Tensor] | None = None

    @property
    def full(self) -> bool:
        """Whether every update sees the whole training set."""
        return self.size is None or self.size >= self.n_train

    def indices(self, update: int) -> Tensor:
        """Positions (into the training split's order) of the pairs update ``update`` trains on."""
        if self.full:
            return torch.arange(self.n_train)
        assert self.size is not None
        n_pass, k = divmod(update, self.per_pass)
        if self._pass is None or self._pass[0] != n_pass:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + n_pass)
            self._pass = (n_pass, torch.randperm(self.n_train, generator=g))
        return self._pass[1][k * self.size:(k + 1) * self.size]
