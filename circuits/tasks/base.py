"""The task interface: what every task gives the trainer, the analysis and the dashboards.

A task is a table over pairs of elements (a, b) with a seeded train/test split. Its static
layout (elements, tokens, the '=' token, classes, sequence length) is derived from its config
(:class:`circuits.config.TaskConfig`: ``n_elements``, ``n_tokens``, ``eq_token``, ``n_classes``,
``n_ctx``); a :class:`Task` adds the full table: the inputs, the answers, which pairs are valid,
and the split. Pairs are indexed on the canonical grid ``a * n_elements + b`` (a slowest), as in
Nanda et al. (2023), so a vector over pairs reshapes to an (a, b) image.

Where the answer is a sum or difference in a cyclic group, the task has a :class:`FourierView`:
the group's order n, which element and which class sit at each group position, and the sign.
Addition over Z_p is the whole grid (n = p, positions = residues, a + b); subtraction reads
a - b; multiplication and division read the discrete logarithm (the multiplicative group of Z_p
is cyclic of order p - 1: a = g^i, b = g^j, ab = g^(i+j), a/b = g^(i-j)), on the pairs with
a, b != 0 and the classes 1..p-1. The Fourier measures (key frequencies, restricted and
excluded loss, Gini, the circuit split) work in the view: its characters are the task's
Fourier basis, its sum or difference directions carry the answer. A task with no view (the
polynomial operations) gets none of them, and the reason is recorded. Nothing else uses ``p``
as a stand-in for these.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.config import ConfigError, TaskConfig

__all__ = ["Task", "FourierView", "ViewTable", "SplitError", "make_split", "split_problem", "corrupt_labels"]


@dataclass(frozen=True, eq=False)
class FourierView:
    """Where a task's answer is ``i + sign * j`` in a cyclic group Z_n (the Fourier measures' frame).

    Attributes:
        n: the group's order.
        sign: 1 when the answer sits at position i + j, -1 at i - j.
        elements: ``[n]`` the element (input token) at each group position.
        classes: ``[n]`` the answer class at each group position.
        n_elements, n_classes: the task's (the full grid is n_elements x n_elements).
        reason: what the view reads, in words (for docs and summaries).
    """

    n: int
    sign: int
    elements: Int[Tensor, " n"]
    classes: Int[Tensor, " n"]
    n_elements: int
    n_classes: int
    reason: str = field(default="")

    @classmethod
    def cyclic(cls, p: int, sign: int = 1) -> FourierView:
        """The whole p x p grid as Z_p: addition (``sign=1``) or subtraction (``sign=-1``)."""
        ar = torch.arange(p)
        what = "a + b" if sign == 1 else "a - b"
        return cls(p, sign, ar, ar, p, p, f"characters of Z_{p} in {what}")

    @cached_property
    def identity(self) -> bool:
        """The view is the whole grid in its own order (no pair or class is left out)."""
        ar = torch.arange(self.n)
        return (self.n == self.n_elements == self.n_classes and torch.equal(self.elements, ar)
                and torch.equal(self.classes, ar))

    @cached_property
    def pairs(self) -> Int[Tensor, " nn"]:
        """Canonical grid index of view pair (i, j), in view order i * n + j."""
        return (self.elements[:, None] * self.n_elements + self.elements[None, :]).reshape(-1)

    @cached_property
    def element_position(self) -> Int[Tensor, " n_elements"]:
        """Each element's group position, -1 for an element outside the view (0 for mul, div)."""
        return _positions(self.elements, self.n_elements)

    @cached_property
    def class_position(self) -> Int[Tensor, " n_classes"]:
        """Each class's group position, -1 for a class outside the view."""
        return _positions(self.classes, self.n_classes)

    @cached_property
    def pair_position(self) -> Int[Tensor, " pairs"]:
        """Each canonical pair's index in the view, -1 for a pair outside it."""
        return _positions(self.pairs, self.n_elements * self.n_elements)

    def take(self, x: Tensor, classes: bool = False) -> Tensor:
        """``x [..., pairs, last]`` over the canonical grid, its pairs (axis -2) taken to the
        view's in view order; with ``classes``, its last axis (logits) to the view's classes."""
        grid = self.n_elements * self.n_elements
        # The class axis matters only where classes are taken (mul, div); over the whole grid
        # the projections act on the pairs axis alone, whatever the number of columns.
        if x.dim() < 2 or x.shape[-2] != grid or (classes and not self.identity and x.shape[-1] != self.n_classes):
            want = f"[..., {grid}, {self.n_classes}]" if classes else f"[..., {grid}, features]"
            hint = ("; for a model's [batch, pos, classes] logits over the grid's inputs, pass the "
                    "answer position's: logits[:, -1]") if x.dim() == 3 and x.shape[-2] != grid else ""
            raise ValueError(f"expected a tensor {want} over the {self.n_elements} x {self.n_elements} "
                             f"grid of inputs in canonical order, got shape {tuple(x.shape)}{hint}")
        if self.identity:
            return x
        out = x.index_select(-2, self.pairs.to(x.device))
        return out.index_select(-1, self.classes.to(x.device)) if classes else out

    def labels(self, labels: Int[Tensor, " pairs"]) -> Int[Tensor, " nn"]:
        """The answers of the view's pairs as group positions of their classes."""
        if self.identity:
            return labels
        pos = self.class_position[labels[self.pairs]]
        if bool((pos < 0).any()):
            raise ValueError("an answer of a pair in the Fourier view is outside the view's classes")
        return pos

    def index(self, idx: Int[Tensor, " k"]) -> Int[Tensor, " m"]:
        """Canonical pair indices ``idx`` as view indices, those outside the view dropped."""
        if self.identity:
            return idx
        out = self.pair_position[idx]
        return out[out >= 0]

    def table(self, task: Task) -> ViewTable:
        """The task's labels, validity and split in view coordinates."""
        if self.identity:
            return ViewTable(task.labels, task.valid, task.train_idx, task.test_idx)
        return ViewTable(self.labels(task.labels), task.valid[self.pairs],
                         self.index(task.train_idx), self.index(task.test_idx))

    def basis(self) -> Float[Tensor, "n n_elements"]:
        """The characters of Z_n over the task's elements (rows Const, cos 1, sin 1, ...;
        columns of elements outside the view are 0), orthonormal."""
        return self._characters(self.elements, self.n_elements)

    def class_basis(self) -> Float[Tensor, "n n_classes"]:
        """The characters of Z_n over the task's answer classes (as :meth:`basis`)."""
        return self._characters(self.classes, self.n_classes)

    def _characters(self, order: Tensor, size: int) -> Tensor:
        from circuits.fourier import fourier_basis

        out = torch.zeros(self.n, size, dtype=torch.float64)
        out[:, order] = fourier_basis(self.n, torch.float64)
        return out

    def directions(self, freqs: list[int]) -> Float[Tensor, "dirs pairs"]:
        """The answer directions cos/sin(w_k (i + sign j)) over the canonical grid (0 on pairs
        outside the view), orthonormal."""
        from circuits.fourier import sum_directions

        dirs = sum_directions(self.n, freqs, torch.float64, self.sign)
        out = torch.zeros(len(dirs), self.n_elements * self.n_elements, dtype=torch.float64)
        out[:, self.pairs] = dirs
        return out


def _positions(order: Tensor, size: int) -> Tensor:
    """The inverse of ``order`` (distinct indices into range(size)): position of each index in
    it, -1 for an index it does not hold."""
    pos = torch.full((size,), -1, dtype=torch.long)
    pos[order] = torch.arange(len(order))
    return pos


@dataclass(frozen=True)
class ViewTable:
    """A task's labels, validity and split in the coordinates of its :class:`FourierView`."""

    labels: Int[Tensor, " pairs"]
    valid: Bool[Tensor, " pairs"]
    train_idx: Int[Tensor, " train"]
    test_idx: Int[Tensor, " test"]


@dataclass(frozen=True)
class Task:
    """A task's full table on the canonical grid, with its train/test split.

    Attributes:
        config: the TaskConfig it was made from.
        tokens: ``[pairs, n_ctx]`` int64 inputs (``[a, b, =]``, or a mixture's ``[a, op, b, =]``) in canonical order.
        labels: ``[pairs]`` int64 answers (for invalid pairs: 0, never used).
        valid: ``[pairs]`` bool, False where the operation is undefined (b = 0 for division).
        train_idx, test_idx: canonical indices (``a * n_elements + b``) of the two splits.
        noisy_idx: canonical indices of the training pairs whose label was corrupted
            (``TaskConfig.label_noise``; empty without it), sorted.
        clean_labels: the uncorrupted table (equal to ``labels`` without label noise).
    """

    config: TaskConfig
    tokens: Int[Tensor, "pair ctx"]
    labels: Int[Tensor, " pair"]
    valid: Bool[Tensor, " pair"]
    train_idx: Int[Tensor, " train"]
    test_idx: Int[Tensor, " test"]
    noisy_idx: Int[Tensor, " noisy"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    clean_labels: Int[Tensor, " pair"] | None = None

    def __post_init__(self) -> None:
        if self.clean_labels is None:
            object.__setattr__(self, "clean_labels", self.labels)

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
        """Inputs on the canonical grid, valid or not (:attr:`TaskConfig.n_grid`)."""
        return self.config.n_grid

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

    @classmethod
    def view_of(cls, config: TaskConfig) -> FourierView | None:
        """The :class:`FourierView` of the task ``config`` describes (known before the table
        is built), or None."""
        return None

    @classmethod
    def no_view_reason(cls, config: TaskConfig) -> str:
        """Why the task ``config`` describes has no Fourier view (for summaries and the CLI)."""
        return f"the {cls.__name__} task has no Fourier basis the measures know"

    def fourier_view(self) -> FourierView | None:
        """The task's :class:`FourierView`, or None when it has none (the Fourier measures are
        then skipped, with :meth:`no_view_reason`)."""
        return type(self).view_of(self.config)

    @property
    def has_fourier(self) -> bool:
        """Whether the Fourier measures apply (the task has a :class:`FourierView`)."""
        return self.fourier_view() is not None

    def fourier_basis(self) -> Float[Tensor, "n n_elements"] | None:
        """The orthonormal Fourier (character) basis over the elements (:meth:`FourierView.basis`),
        or None when the task has none."""
        view = self.fourier_view()
        return None if view is None else view.basis()

    def answer_directions(self, freqs: list[int]) -> Float[Tensor, "dirs pair"] | None:
        """Orthonormal directions over the grid that carry the answer at frequencies ``freqs``
        (the restricted and excluded losses' directions, :meth:`FourierView.directions`), or None."""
        view = self.fourier_view()
        return None if view is None else view.directions(freqs)

    def is_train(self) -> Bool[Tensor, " pair"]:
        """Boolean mask over the canonical grid: True on training pairs."""
        mask = torch.zeros(self.n_pairs, dtype=torch.bool)
        mask[self.train_idx] = True
        return mask

    def train_data(self) -> tuple[Int[Tensor, "train ctx"], Int[Tensor, " train"]]:
        """Training inputs and labels, in split order."""
        return self.tokens[self.train_idx], self.labels[self.train_idx]

    def test_data(self) -> tuple[Int[Tensor, "test ctx"], Int[Tensor, " test"]]:
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
    if config.mix_mem:
        # The operation's split is the single task's; the memorisation pairs are all training.
        n = config.n_elements * config.n_elements
        op_train, test = make_split(replace(config, mix_mem=0), valid[:n])
        mem = torch.nonzero(valid[n:]).squeeze(1) + n
        return torch.cat([op_train, mem]), test
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


def corrupt_labels(config: TaskConfig, labels: Tensor, train_idx: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(labels with round(label_noise * n_train) training pairs given a wrong label, the
    corrupted canonical indices, sorted)``.

    Doshi et al. (2023), label corruption: the pairs are drawn from the training set and each
    gets a label drawn uniformly from the n_classes - 1 wrong ones, by a generator seeded from
    ``data_seed`` (so the same config corrupts the same pairs the same way); test pairs keep
    their true labels.
    """
    k = config.n_noisy
    if k == 0:
        return labels, torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(config.data_seed + 2)
    chosen = train_idx[torch.randperm(len(train_idx), generator=g)[:k]]
    shift = torch.randint(1, n_classes, (k,), generator=g)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % n_classes
    return noisy, torch.sort(chosen).values


class SplitError(ValueError):
    """Saved split indices that do not fit the task's config (the message says how)."""


def split_problem(config: TaskConfig, valid: Tensor, train_idx: Tensor, test_idx: Tensor) -> str | None:
    """Why a saved split cannot be this task's, or None when it fits.

    A split fits when both index sets are 1-D int64, name valid pairs of the ``p * p`` grid
    once each, do not overlap, cover every valid pair, and the training set has the size the
    config asks for (issue 19, item 6: a split file of another p used to index out of range).
    """
    n = config.n_grid
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
