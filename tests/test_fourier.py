"""Fourier basis and transforms, checked against direct trigonometry."""

from __future__ import annotations

import math

import torch

from circuits.fourier import (
    fft1d,
    fft2d,
    fourier_basis,
    fourier_labels,
    frequency_norms,
    ifft2d,
    sum_directions,
)


def test_basis_is_orthonormal_with_official_ordering() -> None:
    p = 13
    F = fourier_basis(p, torch.float64)
    torch.testing.assert_close(F @ F.T, torch.eye(p, dtype=torch.float64))
    x = torch.arange(p, dtype=torch.float64)
    cos3 = torch.cos(2 * math.pi * 3 * x / p)
    torch.testing.assert_close(F[5], cos3 / cos3.norm())  # row 2k-1 = cos k
    sin3 = torch.sin(2 * math.pi * 3 * x / p)
    torch.testing.assert_close(F[6], sin3 / sin3.norm())  # row 2k = sin k
    assert fourier_labels(p)[:4] == ["Const", "cos 1", "sin 1", "cos 2"]


def test_1d_2d_transforms_round_trip_and_parseval() -> None:
    p = 11
    x = torch.randn(p * p, 4, dtype=torch.float64)
    c = fft2d(x, p)
    assert c.shape == (p, p, 4)
    torch.testing.assert_close(ifft2d(c), x)
    torch.testing.assert_close(c.pow(2).sum(), x.pow(2).sum())
    v = torch.randn(3, p, dtype=torch.float64)
    torch.testing.assert_close(fft1d(v) @ fourier_basis(p, torch.float64), v)


def test_sum_directions_are_cos_sin_of_a_plus_b_and_match_the_basis_identity() -> None:
    p, k = 17, 4
    dirs = sum_directions(p, [k])
    F = fourier_basis(p, torch.float64)
    c, s = F[2 * k - 1], F[2 * k]
    # cos(w(a+b)) = cos wa cos wb - sin wa sin wb (science.md Part A §2).
    u_cos = (torch.outer(c, c) - torch.outer(s, s)).flatten() / math.sqrt(2)
    u_sin = (torch.outer(s, c) + torch.outer(c, s)).flatten() / math.sqrt(2)
    torch.testing.assert_close(dirs[0], u_cos)
    torch.testing.assert_close(dirs[1], u_sin)
    many = sum_directions(p, [1, 2, 8])
    torch.testing.assert_close(many @ many.T, torch.eye(6, dtype=torch.float64))


def test_frequency_norms_merge_cos_and_sin() -> None:
    norms = torch.tensor([9.0, 3.0, 4.0, 0.0, 1.0])
    torch.testing.assert_close(frequency_norms(norms), torch.tensor([5.0, 1.0]))
