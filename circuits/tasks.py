"""Binary-operation tables over Z_p with the token layout ``[a, b, =]`` (Power et al. 2022).

Everything is indexed on the canonical grid: pair (a, b) has index ``a * p + b`` (a slowest),
as in Nanda et al. (2023), so a length-p^2 vector reshapes to an (a, b) image. Operations
that exclude some pairs (division by 0) mark them invalid; the split only draws valid pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuits.config import ConfigError, TaskConfig
from circuits.errors import RunFolderError

__all__ = ["Task", "make_task", "OPERATIONS", "SplitError", "split_problem", "task_from_saved_split"]


def _inverse(b: Tensor, p: int) -> Tensor:
    # Fermat: b^(p-2) is the inverse of b mod prime p (b = 0 maps to 0; such pairs are invalid).
    result = torch.ones_like(b)
    base = b.clone()
    e = p - 2
    while e:
        if e & 1:
            result = result * base % p
        base = base * base % p
        e >>= 1
    return result


# Each operation maps int64 grids a, b (values in 0..p-1) to c in 0..p-1. Intermediate values stay
# below p^3 < 2^63 for any p we accept, so int64 arithmetic is exact.
OPERATIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: (a * _inverse(b, p)) % p,
    # Power et al.: x / y if y is odd, else x - y.
    "mix1": lambda a, b, p: torch.where(b % 2 == 1, a * _inverse(b, p) % p, (a - b) % p),
    "x2_y2": lambda a, b, p: (a * a + b * b) % p,
    "x2_xy_y2": lambda a, b, p: (a * a + a * b + b * b) % p,
    "x2_xy_y2_x": lambda a, b, p: (a * a + a * b + b * b + a) % p,
    "x3_xy": lambda a, b, p: (a * a % p * a + a * b) % p,
    "x3_xy2_y": lambda a, b, p: (a * a % p * a + a * (b * b % p) + b) % p,
}


@dataclass(frozen=True)
class Task:
    """A binary operation over Z_p on the full (a, b) grid, with its train/test split.

    Attributes:
        config: the TaskConfig it was made from.
        tokens: ``[p*p, 3]`` int64 inputs ``[a, b, p]`` in canonical order.
        labels: ``[p*p]`` int64 targets (for invalid pairs: 0, never used).
        valid: ``[p*p]`` bool, False where the operation is undefined (b = 0 for division).
        train_idx, test_idx: canonical indices (``a*p + b``) of the training and test pairs.
    """

    config: TaskConfig
    tokens: Int[Tensor, "pair 3"]
    labels: Int[Tensor, " pair"]
    valid: Bool[Tensor, " pair"]
    train_idx: Int[Tensor, " train"]
    test_idx: Int[Tensor, " test"]

    @property
    def p(self) -> int:
        """The modulus."""
        return self.config.p

    @property
    def eq_token(self) -> int:
        """Index of the '=' token."""
        return self.config.p

    def is_train(self) -> Bool[Tensor, " pair"]:
        """Boolean mask over the canonical grid: True on training pairs."""
        mask = torch.zeros(self.p * self.p, dtype=torch.bool)
        mask[self.train_idx] = True
        return mask

    def train_data(self) -> tuple[Int[Tensor, "train 3"], Int[Tensor, " train"]]:
        """Training inputs and labels, in split order."""
        return self.tokens[self.train_idx], self.labels[self.train_idx]

    def test_data(self) -> tuple[Int[Tensor, "test 3"], Int[Tensor, " test"]]:
        """Test inputs and labels, in split order."""
        return self.tokens[self.test_idx], self.labels[self.test_idx]


def make_grid(config: TaskConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens, labels and validity over the canonical p^2 grid (no split)."""
    p = config.p
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    valid = torch.ones(p * p, dtype=torch.bool)
    if config.op == "div":
        valid = b != 0
    labels = OPERATIONS[config.op](a, b, p)
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    if config.random_labels:
        labels = _random_labels(p, config.data_seed)
    return tokens, labels, valid


def _random_labels(p: int, seed: int) -> Tensor:
    # Varma et al. / Huang et al.: (a, b) and (b, a) share one uniform label, so the table
    # stays commutative and a symmetric model is not forced to memorise two answers per pair.
    g = torch.Generator().manual_seed(seed + 1)
    table = torch.randint(0, p, (p, p), generator=g)
    sym = torch.triu(table) + torch.triu(table, diagonal=1).T
    return sym.reshape(-1)


def make_split(config: TaskConfig, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Seeded split over the valid pairs: a torch permutation, first ``n_train`` are train.

    Matches the TransformerLens demo: ``torch.manual_seed(598); torch.randperm(p*p)`` with the
    first ``int(0.3 * p*p)`` as training pairs. Because the order is fixed by ``data_seed``, a
    smaller ``train_size`` gives a subset of a larger one's training set. With ``pool_size``, the
    training pairs are instead ``n_train`` pairs drawn (by ``subset_seed``) from the first
    ``pool_size`` of the permutation, so every seed's subset only removes examples from the
    pool (Varma et al. 2023, ungrokking); every other valid pair is a test pair.
    """
    pool = torch.nonzero(valid).squeeze(1)
    n_train = config.n_train
    if n_train > len(pool):
        raise ConfigError(f"train_size {n_train} exceeds the {len(pool)} valid pairs")
    g = torch.Generator().manual_seed(config.data_seed)
    perm = pool[torch.randperm(len(pool), generator=g)]
    if config.pool_size is None:
        return perm[:n_train].clone(), perm[n_train:].clone()
    if config.pool_size > len(perm):
        raise ConfigError(f"pool_size {config.pool_size} exceeds the {len(perm)} valid pairs")
    gs = torch.Generator().manual_seed(config.subset_seed)
    chosen = torch.zeros(len(perm), dtype=torch.bool)
    chosen[torch.randperm(config.pool_size, generator=gs)[:n_train]] = True
    return perm[chosen].clone(), perm[~chosen].clone()


def make_task(
    config: TaskConfig,
    train_idx: Tensor | None = None,
    test_idx: Tensor | None = None,
) -> Task:
    """Build the task; pass saved split indices to reuse them rather than re-derive them."""
    tokens, labels, valid = make_grid(config)
    if train_idx is None or test_idx is None:
        train_idx, test_idx = make_split(config, valid)
    else:
        problem = split_problem(config, valid, train_idx, test_idx)
        if problem is not None:
            raise SplitError(problem)
    return Task(config, tokens, labels, valid, train_idx, test_idx)


class SplitError(ValueError):
    """Saved split indices that do not fit the task's config (the message says how)."""


def task_from_saved_split(config: TaskConfig, train_idx: Tensor, test_idx: Tensor, path: Path) -> Task:
    """:func:`make_task` with a run's saved split; RunFolderError names ``path`` when it does
    not fit ``config``."""
    try:
        return make_task(config, train_idx, test_idx)
    except SplitError as e:
        raise RunFolderError(
            f"split file {path} does not fit the run's config: {e}; restore the run's own split "
            "file, or retrain with --force"
        ) from None


def split_problem(config: TaskConfig, valid: Tensor, train_idx: Tensor, test_idx: Tensor) -> str | None:
    """Why a saved split cannot be this task's, or None when it fits.

    A split fits when both index sets are 1-D int64, name valid pairs of the ``p * p`` grid
    once each, do not overlap, cover every valid pair, and the training set has the size the
    config asks for (issue 19, item 6: a split file of another p used to index out of range).
    """
    n = config.p * config.p
    for name, idx in (("train", train_idx), ("test", test_idx)):
        if idx.dtype != torch.int64 or idx.dim() != 1:
            return f"{name} is {idx.dtype} of shape {tuple(idx.shape)}, not a 1-D int64 index list"
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
            return (f"{name} holds pair indices outside 0..{n - 1} (p = {config.p}): a split of "
                    "another p?")
        if len(torch.unique(idx)) != len(idx):
            return f"{name} names a pair twice"
        if not bool(valid[idx].all()):
            return f"{name} holds pairs on which {config.op} is undefined"
    if bool(torch.isin(train_idx, test_idx).any()):
        return "a pair is in both train and test"
    if len(train_idx) != config.n_train:
        return f"train has {len(train_idx)} pairs, the config asks for {config.n_train}"
    if len(train_idx) + len(test_idx) != int(valid.sum()):
        return f"train and test cover {len(train_idx) + len(test_idx)} pairs, not all {int(valid.sum())}"
    return None
