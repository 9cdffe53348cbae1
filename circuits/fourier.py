"""The real Fourier basis over Z_n and 1D/2D transforms (Nanda et al. 2023, Appendix / §4).

Convention (the official code's, science.md Part A §2): row 0 is the constant 1/sqrt(n); for
k = 1..(n-1)/2, row 2k-1 is cos(2πkx/n) and row 2k is sin(2πkx/n), each of unit norm. For even
n (the multiplicative group of Z_p has order p - 1) a last row holds the Nyquist frequency
cos(πx) = (-1)^x, which has no sine; it is a basis row but not one of the frequencies
k = 1..(n-1)//2 that the measures look for. The matrix ``F`` is orthonormal, so ``F @ F.T = I``
and a transform is a matrix product. Inputs on the (a, b) grid are in canonical order
(index a*n + b). ``p`` in the names below is the group's order n.
"""

from __future__ import annotations

import math
from functools import lru_cache

import einops
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "fourier_basis",
    "fourier_labels",
    "n_frequencies",
    "fft1d",
    "fft2d",
    "ifft2d",
    "sum_directions",
    "line_index",
    "frequency_norms",
]


def n_frequencies(p: int) -> int:
    """Number of frequencies with a cos and a sin row, (p - 1) // 2 (the Nyquist row of an even
    order is not one of them)."""
    return (p - 1) // 2


@lru_cache(maxsize=16)
def _basis(p: int, dtype: torch.dtype) -> Tensor:
    if p < 2:
        raise ValueError(f"the Fourier basis needs a group of order >= 2, got {p}")
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, n_frequencies(p) + 1):
        rows.append(torch.cos(2 * math.pi * k * x / p))
        rows.append(torch.sin(2 * math.pi * k * x / p))
    if p % 2 == 0:
        rows.append(torch.cos(math.pi * x))
    basis = torch.stack(rows)
    basis = basis / basis.norm(dim=1, keepdim=True)
    return basis.to(dtype)


def fourier_basis(p: int, dtype: torch.dtype = torch.float32) -> Float[Tensor, "p p"]:
    """Orthonormal real Fourier basis; rows are basis vectors over x = 0..p-1."""
    return _basis(p, dtype).clone()


def fourier_labels(p: int) -> list[str]:
    """Names of the basis rows: ``Const``, ``cos 1``, ``sin 1``, ..., ``sin (p-1)/2``."""
    labels = ["Const"]
    for k in range(1, n_frequencies(p) + 1):
        labels += [f"cos {k}", f"sin {k}"]
    if p % 2 == 0:
        labels.append(f"cos {p // 2}")
    return labels


def fft1d(x: Float[Tensor, "... p"]) -> Float[Tensor, "... p"]:
    """Fourier coefficients along the last axis (length p): ``x @ F.T``."""
    basis = _basis(x.shape[-1], x.dtype).to(x.device)
    return x @ basis.T


def fft2d(x: Float[Tensor, "pp *rest"], p: int) -> Float[Tensor, "p p *rest"]:
    """2D coefficients over the (a, b) grid: entry [i, j] is ⟨x, F_i(a) F_j(b)⟩."""
    basis = _basis(p, x.dtype).to(x.device)
    grid = x.reshape(p, p, -1)
    out = einops.einsum(grid, basis, basis, "a b r, i a, j b -> i j r")
    return out.reshape(p, p, *x.shape[1:])


def ifft2d(coeffs: Float[Tensor, "p p *rest"]) -> Float[Tensor, "pp *rest"]:
    """Inverse of :func:`fft2d` (back to canonical a*p + b order)."""
    p = coeffs.shape[0]
    basis = _basis(p, coeffs.dtype).to(coeffs.device)
    flat = coeffs.reshape(p, p, -1)
    out = einops.einsum(flat, basis, basis, "i j r, i a, j b -> a b r")
    return out.reshape(p * p, *coeffs.shape[2:])


def line_index(p: int, sign: int = 1, device: torch.device | str | None = None) -> Tensor:
    """``(a + sign * b) mod p`` for every pair in canonical order a*p + b: the anti-diagonal
    (``sign=1``) or diagonal (``sign=-1``) each pair lies on."""
    a = torch.arange(p, device=device)
    return ((a[:, None] + sign * a[None, :]) % p).reshape(-1)


def sum_directions(
    p: int, freqs: list[int] | tuple[int, ...], dtype: torch.dtype = torch.float64, sign: int = 1
) -> Float[Tensor, "dirs pp"]:
    """Unit vectors cos(w_k(a + sign b)) and sin(w_k(a + sign b)) over the grid, w_k = 2πk/p
    (2 per k): ``sign=1`` for a sum, -1 for a difference.

    These are the directions of the restricted and excluded losses (Nanda et al. 2023, §5.1);
    they are orthonormal for distinct k in 1..(p-1)//2.
    """
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    rows = []
    for k in freqs:
        if not 1 <= k <= n_frequencies(p):
            raise ValueError(f"frequency {k} is outside 1..{n_frequencies(p)} for a group of order {p}")
        angle = 2 * math.pi * k * (a + sign * b) / p
        rows += [torch.cos(angle), torch.sin(angle)]
    if not rows:
        return torch.zeros(0, p * p, dtype=dtype)
    out = torch.stack(rows)
    return (out / out.norm(dim=1, keepdim=True)).to(dtype)


def frequency_norms(coeff_norms: Float[Tensor, "*batch p"]) -> Float[Tensor, "*batch freq"]:
    """Merge cos k and sin k component norms into one norm per frequency k = 1..(p-1)//2
    (an even order's Nyquist row is left out: it is not one of the frequencies)."""
    nonconst = coeff_norms[..., 1 : 1 + 2 * n_frequencies(coeff_norms.shape[-1])]
    pairs = einops.rearrange(nonconst, "... (k two) -> ... k two", two=2)
    return pairs.pow(2).sum(-1).sqrt()
