"""The S5 tasks of Power et al. (2022): binary operations over the 120 permutations of five elements.

Elements are the permutations of (0, 1, 2, 3, 4) in lexicographic order (element 0 is the
identity), tokens are the elements and '=' (token 120), answer classes the elements, inputs
``[x, y, =]`` on the canonical grid x * 120 + y. The product follows Power et al.'s code
(``openai/grok``, ``data.py``: ``c = b[a]``): ``(x·y)[i] = y[x[i]]``, first x, then y. The
operations are ``s5`` (x·y), ``s5conj`` (x·y·x⁻¹: the conjugate of y, so it keeps y's cycle type)
and ``s5aba`` (x·y·x). S5 is not abelian: no Fourier (character) basis of a cyclic group carries
these answers, so the Fourier measures are skipped with the reason (Chughtai et al. 2023's key
irreducible representations would be the replacement; not built). Losses, accuracies, norms and
the dashboards work as for every task.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.config import S5_ORDER, TaskConfig
from circuits.tasks.base import FourierView, Task

__all__ = ["PermutationTask", "permutations", "compose", "inverse", "permutation_grid"]


@lru_cache(maxsize=1)
def permutations() -> Int[Tensor, "120 5"]:
    """The 120 permutations of five elements, lexicographic (row 0 is the identity)."""
    return torch.tensor(list(itertools.permutations(range(5))), dtype=torch.long)


def compose(x: Int[Tensor, "*n 5"], y: Int[Tensor, "*n 5"]) -> Int[Tensor, "*n 5"]:
    """The product x·y of permutations given as rows: ``(x·y)[i] = y[x[i]]`` (Power et al.)."""
    return torch.gather(y, -1, x)


def inverse(x: Int[Tensor, "*n 5"]) -> Int[Tensor, "*n 5"]:
    """The inverse permutation of each row."""
    out = torch.empty_like(x)
    out.scatter_(-1, x, torch.arange(5).expand_as(x).contiguous())
    return out


def _index(rows: Int[Tensor, "*n 5"]) -> Int[Tensor, "*n"]:
    # Lexicographic rank of a permutation: sum over positions of (smaller later entries) * (4 - i)!.
    fact = torch.tensor([24, 6, 2, 1, 1])
    later = (rows[..., :, None] > rows[..., None, :]) & torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    return (later.sum(-1) * fact).sum(-1)


def permutation_grid(config: TaskConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens, labels and validity over the 120 x 120 grid (every pair valid, no split)."""
    n = S5_ORDER
    perms = permutations()
    a = torch.arange(n).repeat_interleave(n)
    b = torch.arange(n).repeat(n)
    x, y = perms[a], perms[b]
    if config.op == "s5":
        c = compose(x, y)
    elif config.op == "s5conj":
        c = compose(compose(x, y), inverse(x))
    elif config.op == "s5aba":
        c = compose(compose(x, y), x)
    else:
        raise ValueError(f"{config.op!r} is not an S5 operation")
    labels = _index(c)
    if config.random_labels:
        from circuits.tasks.modular import _random_labels

        labels = _random_labels(n, config.data_seed)
    tokens = torch.stack([a, b, torch.full_like(a, config.eq_token)], dim=1)
    return tokens, labels, torch.ones(n * n, dtype=torch.bool)


class PermutationTask(Task):
    """An operation over S5 (``TaskConfig.op`` in s5, s5conj, s5aba), with its split."""

    @classmethod
    def view_of(cls, config: TaskConfig) -> FourierView | None:
        """None: S5 is not abelian, so no cyclic group's characters carry the answer."""
        return None

    @classmethod
    def no_view_reason(cls, config: TaskConfig) -> str:
        return (f"op {config.op} is over S5, which is not abelian: no Fourier basis carries its answers "
                "(key irreducible representations, Chughtai et al. 2023, are not implemented)")
