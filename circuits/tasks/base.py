"""The task interface: what every task gives the trainer, the analysis and the dashboards.

A task is a table over pairs of elements (a, b) with a seeded train/test split. Its static
layout (elements, tokens, the '=' token, classes, sequence length) is derived from its config
(:class:`circuits.config.TaskConfig`: ``n_elements``, ``n_tokens``, ``eq_token``, ``n_classes``,
``n_ctx``); a :class:`Task` adds the full table: the inputs, the answers, which pairs are valid,
and the split. Pairs are indexed on the canonical grid ``a * n_elements + b`` (a slowest), as in
Nanda et al. (2023), so a vector over pairs reshapes to an (a, b) image. Where the task has one,
``fourier_basis()`` and ``answer_directions(freqs)`` give its Fourier (character) basis and the
directions that carry the answer; a task without them returns None and the Fourier measures
are skipped for it, with the reason. Nothing else uses ``p`` as a stand-in for these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.config import ConfigError, TaskConfig

__all__ = ["Task", "SplitError", "make_split", "split_problem"]


@dataclass(frozen=True)
class Task:
    """A task's full table on the canonical grid, with its train/test split.

    Attributes:
        config: the TaskConfig it was made from.
        tokens: ``[pairs, n_ctx]`` int64 inputs (``[a, b, =]``) in canonical order.
        labels: ``[pairs]`` int64 answers (for invalid pairs: 0, never used).
        valid: ``[pairs]`` bool, False where the operation is undefined (b = 0 for division).
        train_idx, test_idx: canonical indices (``a * n_elements + b``) of the two splits.
    """

    has_fourier: ClassVar[bool] = False
    """Whether the task has a Fourier basis and answer directions (the Fourier measures apply)."""

    config: TaskConfig
    tokens: Int[Tensor, "pair 3"]
    labels: Int[Tensor, " pair"]
    valid: Bool[Tensor, " pair"]
    train_idx: Int[Tensor, " train"]
    test_idx: Int[Tensor, " test"]

    @property
    def p(self) -> int:
        """The modulus of a modular task (its number of elements)."""
        return self.config.p

    @property
    def n_elements(self) -> int:
        """Elements a, b range over: the grid is ``n_elements`` x ``n_elements``."""
        return self.config.n_elements

    @property
    def n_pairs(self) -> int:
        """Pairs on the canonical grid (valid or not)."""
        return self.n_elements * self.n_elements

    @property
    def eq_token(self) -> int:
        """Index of the '=' token."""
        return self.config.eq_token

    @property
    def n_tokens(self) -> int:
        """Input vocabulary size (the model's d_vocab)."""
        return self.config.n_tokens

    @property
    def n_classes(self) -> int:
        """Answer classes (the model's d_vocab_out)."""
        return self.config.n_classes

    @property
    def n_ctx(self) -> int:
        """Input sequence length."""
        return self.config.n_ctx

    def pair_index(self, a: Int[Tensor, "*n"], b: Int[Tensor, "*n"]) -> Int[Tensor, "*n"]:
        """Canonical index of the pairs (a, b): ``a * n_elements + b``."""
        return a * self.n_elements + b

    def fourier_basis(self) -> Float[Tensor, "n n"] | None:
        """The orthonormal Fourier (character) basis of the elements, or None when the task has
        none (the Fourier measures are then skipped)."""
        return None

    def answer_directions(self, freqs: list[int]) -> Float[Tensor, "dirs pair"] | None:
        """Orthonormal directions over the grid that carry the answer at frequencies ``freqs``
        (the restricted and excluded losses' directions), or None."""
        return None

    def is_train(self) -> Bool[Tensor, " pair"]:
        """Boolean mask over the canonical grid: True on training pairs."""
        mask = torch.zeros(self.n_pairs, dtype=torch.bool)
        mask[self.train_idx] = True
        return mask

    def train_data(self) -> tuple[Int[Tensor, "train 3"], Int[Tensor, " train"]]:
        """Training inputs and labels, in split order."""
        return self.tokens[self.train_idx], self.labels[self.train_idx]

    def test_data(self) -> tuple[Int[Tensor, "test 3"], Int[Tensor, " test"]]:
        """Test inputs and labels, in split order."""
        return self.tokens[self.test_idx], self.labels[self.test_idx]


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


class SplitError(ValueError):
    """Saved split indices that do not fit the task's config (the message says how)."""


def split_problem(config: TaskConfig, valid: Tensor, train_idx: Tensor, test_idx: Tensor) -> str | None:
    """Why a saved split cannot be this task's, or None when it fits.

    A split fits when both index sets are 1-D int64, name valid pairs of the ``p * p`` grid
    once each, do not overlap, cover every valid pair, and the training set has the size the
    config asks for (issue 19, item 6: a split file of another p used to index out of range).
    """
    n = config.n_elements * config.n_elements
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
