"""The modular arithmetic tasks: binary operations over Z_p (Power et al. 2022; Nanda et al. 2023).

p elements (the residues), p + 1 input tokens (the residues and '=', token p), p output
classes, inputs ``[a, b, =]`` on the canonical grid a * p + b. Operations that exclude some
pairs (division by 0) mark them invalid. The Fourier view of each operation
(:class:`circuits.tasks.base.FourierView`; science.md, "Which directions, which measures"):
add reads the characters of Z_p in a + b (Nanda et al. 2023, §4), sub in a - b, mul and div
the characters of the discrete logarithm (base the least primitive root g) in log a + log b
and log a - log b, on the pairs with a, b != 0 and the classes 1..p-1; mix1 and the
polynomial operations have no view.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from circuits.config import TaskConfig
from circuits.tasks.base import FourierView, Task

__all__ = ["OPERATIONS", "ModularTask", "make_grid", "primitive_root", "modular_view"]


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


def primitive_root(p: int) -> int:
    """The least generator g of the multiplicative group of Z_p (p prime): g^((p-1)/q) != 1
    for every prime q dividing p - 1."""
    n, factors, q = p - 1, set(), 2
    while q * q <= n:
        while n % q == 0:
            factors.add(q)
            n //= q
        q += 1
    if n > 1:
        factors.add(n)
    for g in range(2, p):
        if all(pow(g, (p - 1) // q, p) != 1 for q in factors):
            return g
    if p == 2:
        return 1
    raise ValueError(f"{p} has no primitive root: not a prime")


@lru_cache(maxsize=32)
def modular_view(op: str, p: int) -> FourierView | None:
    """The Fourier view of operation ``op`` over Z_p, or None (mix1, the polynomials)."""
    if op in ("add", "sub"):
        return FourierView.cyclic(p, 1 if op == "add" else -1)
    if op in ("mul", "div"):
        g = primitive_root(p)
        powers = torch.tensor([pow(g, i, p) for i in range(p - 1)])
        what = "log a + log b" if op == "mul" else "log a - log b"
        return FourierView(p - 1, 1 if op == "mul" else -1, powers, powers, p, p,
                           f"characters of the discrete logarithm (base {g}) in {what}, on a, b != 0")
    return None


class ModularTask(Task):
    """A binary operation over Z_p (``TaskConfig.op``) on the full (a, b) grid, with its split."""

    @classmethod
    def view_of(cls, config: TaskConfig) -> FourierView | None:
        """The operation's view (:func:`modular_view`): Z_p for add and sub, the discrete
        logarithm's Z_(p-1) for mul and div, None for the rest."""
        return modular_view(config.op, config.p)

    @classmethod
    def no_view_reason(cls, config: TaskConfig) -> str:
        return (f"op {config.op} has no Fourier basis the measures know (add, sub, mul and div "
                "have one)")


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
