"""The modular arithmetic tasks: binary operations over Z_p (Power et al. 2022; Nanda et al. 2023).

p elements (the residues), p + 1 input tokens (the residues and '=', token p), p output
classes, inputs ``[a, b, =]`` on the canonical grid a * p + b. Operations that exclude some
pairs (division by 0) mark them invalid. Z_p has the real Fourier basis (:mod:`circuits.fourier`);
for addition the answer is carried by the sum directions cos/sin(w_k (a + b)) (Nanda et al.
2023, §4), which the restricted and excluded losses and the circuit split read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.config import TaskConfig
from circuits.tasks.base import Task

__all__ = ["OPERATIONS", "ModularTask", "make_grid"]


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


class ModularTask(Task):
    """A binary operation over Z_p (``TaskConfig.op``) on the full (a, b) grid, with its split."""

    has_fourier = True

    def fourier_basis(self) -> Float[Tensor, "n n"]:
        """The real Fourier basis of Z_p, rows Const, cos 1, sin 1, ... (:func:`circuits.fourier.fourier_basis`)."""
        from circuits.fourier import fourier_basis

        return fourier_basis(self.n_elements, torch.float64)

    def answer_directions(self, freqs: list[int]) -> Float[Tensor, "dirs pair"]:
        """The sum directions cos/sin(w_k (a + b)) of ``freqs`` over the grid, orthonormal: the
        directions the restricted and excluded losses keep and remove (Nanda et al. 2023, §5.1)."""
        from circuits.fourier import sum_directions

        return sum_directions(self.n_elements, freqs, torch.float64)


def make_grid(config: TaskConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens, labels and validity over the canonical p^2 grid (no split)."""
    p = config.p
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, config.eq_token)], dim=1)
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
