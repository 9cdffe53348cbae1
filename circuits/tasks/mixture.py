"""A modular operation mixed with a memorisation task (Huang et al. 2024, §5: emergence).

Huang et al. train one network on 3,000 modular-addition examples together with 3,000-6,000
pure-memorisation examples (subtraction inputs with random labels), the two kept apart by their
operator tokens, and ask at which model size the addition task still generalises. Here the
mixture is ``TaskConfig.mix_mem`` > 0 on any modular operation:

* inputs ``[a, op, b, =]``; tokens: the p residues, '+' (index p, the operation), '-' (p + 1,
  the memorisation pairs), '=' (p + 2); answers: the p residues;
* the canonical grid is two blocks of p x p inputs: the operation's (index ``a * p + b``, as
  without a mixture) and the memorisation block (``p * p + a * p + b``);
* the operation's split is exactly the single task's (same ``data_seed``, same ``frac`` or
  ``train_size``), so a mixture adds memorisation data to a training set without changing it;
* ``mix_mem`` memorisation inputs are drawn by a permutation seeded from ``data_seed`` and get
  uniform random labels (each input its own: the block is pure memorisation, with no symmetry
  to exploit); they are all training data, and the rest of the block is not valid (neither
  trained on nor tested: its labels mean nothing);
* the test pairs are the operation's test pairs only: test accuracy is the operation's
  generalisation, Huang et al.'s measurement.

The Fourier measures read the ``[a, b, =]`` grid, so they are skipped for a mixture, with the
reason; losses, accuracies and norms work as for every task.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.config import TaskConfig
from circuits.tasks.base import FourierView, Task
from circuits.tasks.modular import make_grid as modular_grid

__all__ = ["MixtureTask", "mixture_grid", "memorisation_inputs"]


def memorisation_inputs(config: TaskConfig) -> Int[Tensor, " mem"]:
    """The memorisation block's chosen inputs (indices ``a * p + b`` within the block), sorted."""
    n = config.n_elements * config.n_elements
    g = torch.Generator().manual_seed(config.data_seed + 3)
    return torch.sort(torch.randperm(n, generator=g)[: config.mix_mem]).values


def mixture_grid(config: TaskConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens ``[2 p^2, 4]``, labels and validity over the two blocks (no split)."""
    tokens, labels, valid = modular_grid(config)
    plus, minus = config.op_tokens or (0, 0)
    a, b, eq = tokens.unbind(1)
    n = len(a)
    op_tokens = torch.stack([a, torch.full_like(a, plus), b, torch.full_like(a, config.eq_token)], 1)
    mem_tokens = torch.stack([a, torch.full_like(a, minus), b, torch.full_like(a, config.eq_token)], 1)
    chosen = memorisation_inputs(config)
    g = torch.Generator().manual_seed(config.data_seed + 4)
    mem_labels = torch.zeros(n, dtype=torch.long)
    mem_labels[chosen] = torch.randint(0, config.n_classes, (len(chosen),), generator=g)
    mem_valid = torch.zeros(n, dtype=torch.bool)
    mem_valid[chosen] = True
    return torch.cat([op_tokens, mem_tokens]), torch.cat([labels, mem_labels]), torch.cat([valid, mem_valid])


class MixtureTask(Task):
    """A modular operation with a memorisation task mixed in (``TaskConfig.mix_mem``)."""

    @property
    def mem_idx(self) -> Int[Tensor, " mem"]:
        """Canonical indices of the memorisation pairs (all of them training pairs), from the
        split itself: the training pairs in the memorisation block."""
        n = self.n_elements * self.n_elements
        return self.train_idx[self.train_idx >= n]

    @property
    def op_train_idx(self) -> Int[Tensor, " train_op"]:
        """The operation's own training pairs (the training set without the memorisation pairs)."""
        n = self.n_elements * self.n_elements
        return self.train_idx[self.train_idx < n]

    @classmethod
    def view_of(cls, config: TaskConfig) -> FourierView | None:
        """None: the Fourier measures read the ``[a, b, =]`` grid."""
        return None

    @classmethod
    def no_view_reason(cls, config: TaskConfig) -> str:
        return (f"a mixture (mix_mem = {config.mix_mem}) has inputs [a, op, b, =]; the Fourier measures "
                "read the [a, b, =] grid (per-block Fourier measures are not built)")
