"""Key frequencies: which Fourier frequencies the network computes with (Nanda et al. 2023, §4).

Default rule (science.md, Decisions): centre each MLP neuron's activation at the last position
over all p^2 inputs, take its 2D Fourier transform, and for each frequency k sum the squared
coefficients of the 3x3 block {Const, cos k, sin k}^2 (constant, linear and quadratic terms of k)
over the neuron's total. A neuron *votes* for its best k when that fraction is >= 0.85; k is a
key frequency when at least max(3, d_mlp // 100) neurons vote for it. The official code keeps
every argmax with no threshold, which lets one stray neuron add a frequency; the vote keeps the
threshold the paper uses for its clusters. The embedding-norm rule (TransformerLens demo) is
:func:`embed_key_frequencies`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.fourier import _basis, fft1d, n_frequencies

__all__ = [
    "neuron_frequency_fractions",
    "neuron_clusters",
    "key_frequencies",
    "embed_fourier_norms",
    "neuron_logit_fourier_norms",
    "embed_key_frequencies",
    "CLUSTER_THRESHOLD",
]

CLUSTER_THRESHOLD = 0.85


def neuron_frequency_fractions(
    acts: Float[Tensor, "*ckpt pp neuron"], p: int
) -> Float[Tensor, "*ckpt neuron freq"]:
    """Fraction of each neuron's centred variance in each frequency's 3x3 Fourier block.

    ``acts`` are activations over the p^2 inputs in canonical order (a*p + b). The block of
    frequency k holds the 8 coefficients {Const, cos k, sin k}^2 minus (Const, Const). Its
    energy needs no 2D transform: by the product-to-sum identities, the four "same-frequency"
    coefficients carry (1/p)(|Y+^(k)|^2 + |Y-^(k)|^2) where Y+ and Y- are the sums of the
    activation grid along its diagonals a + b = s and a - b = d, and the four "axis"
    coefficients carry (1/p)(|R^(k)|^2 + |S^(k)|^2) for the row and column sums R, S (^ is the
    real 1D transform's cos k / sin k pair). Four line sums and 1D transforms replace the
    O(p^3)-per-neuron 2D transform with O(p^2) work (tested against the full transform).
    """
    x = acts if acts.dtype in (torch.float32, torch.float64) else acts.float()
    *lead, pp, n = x.shape
    if pp != p * p:
        raise ValueError(f"expected p^2 = {p * p} inputs on axis -2, got {pp}")
    c = 1
    for d in lead:
        c *= d
    grid = x.reshape(c, p, p, n)
    a = torch.arange(p, device=x.device)
    plus = ((a[:, None] + a[None, :]) % p).reshape(-1)  # diagonal index of (a, b)
    minus = ((a[:, None] - a[None, :]) % p).reshape(-1)
    flat = grid.view(c, p * p, n)
    lines = torch.stack([
        grid.sum(dim=2),  # R[a]: row sums
        grid.sum(dim=1),  # S[b]: column sums
        x.new_zeros(c, p, n).index_add_(1, plus, flat),  # Y+[s]
        x.new_zeros(c, p, n).index_add_(1, minus, flat),  # Y-[d]
    ], dim=1)  # [c, 4, p, n]
    basis = _basis(p, x.dtype).to(x.device)
    coeffs = torch.matmul(basis[1:], lines)  # [c, 4, p - 1, n]: cos 1, sin 1, cos 2, ...
    k = n_frequencies(p)
    block = coeffs.pow(2).view(c, 4, k, 2, n).sum(dim=(1, 3)) / p  # [c, k, n]
    # The centred neuron's energy (Parseval: every coefficient but (Const, Const)).
    total = (flat - flat.mean(dim=1, keepdim=True)).pow_(2).sum(dim=1)
    frac = block / total.unsqueeze(1).clamp_min(1e-30)
    return frac.transpose(1, 2).reshape(*lead, n, k)


def neuron_clusters(
    fractions: Float[Tensor, "*ckpt neuron freq"], threshold: float = CLUSTER_THRESHOLD
) -> tuple[Int[Tensor, "*ckpt neuron"], Float[Tensor, "*ckpt neuron"]]:
    """Each neuron's frequency (1-based k), or -1 when its best fraction is below ``threshold``.

    Returns ``(cluster, best_fraction)``; a dead neuron (no variance) is -1.
    """
    best, arg = fractions.max(dim=-1)
    cluster = torch.where(best >= threshold, arg + 1, torch.full_like(arg, -1))
    return cluster, best


def key_frequencies(
    fractions: Float[Tensor, "neuron freq"],
    threshold: float = CLUSTER_THRESHOLD,
    min_neurons: int | None = None,
) -> list[int]:
    """Frequencies voted for by at least ``min_neurons`` neurons (default max(3, d_mlp // 100))."""
    n_neurons = fractions.shape[-2]
    if min_neurons is None:
        min_neurons = max(3, n_neurons // 100)
    cluster, _ = neuron_clusters(fractions, threshold)
    counts = torch.bincount(cluster[cluster > 0], minlength=fractions.shape[-1] + 1)
    return [k for k in range(1, fractions.shape[-1] + 1) if counts[k] >= min_neurons]


def embed_fourier_norms(
    W_E: Float[Tensor, "*ckpt d_vocab d_model"], p: int
) -> Float[Tensor, "*ckpt p"]:
    """Norm of each Fourier component of the embedding, '=' row dropped: ``‖(F @ W_E[:p])_i‖``."""
    return fft1d(W_E[..., :p, :].transpose(-1, -2).to(torch.float64)).norm(dim=-2)


def neuron_logit_fourier_norms(
    W_out: Float[Tensor, "*ckpt d_mlp d_model"], W_U: Float[Tensor, "*ckpt d_model p"]
) -> Float[Tensor, "*ckpt p"]:
    """Fourier norms of the neuron-logit map W_L = W_out @ W_U along its output axis."""
    W_L = W_out.to(torch.float64) @ W_U.to(torch.float64)
    return fft1d(W_L).norm(dim=-2)


def embed_key_frequencies(W_E: Float[Tensor, "d_vocab d_model"], p: int, ratio: float = 0.25) -> list[int]:
    """Embedding-norm rule: frequencies with a cos or sin component above ``ratio`` x the max."""
    norms = embed_fourier_norms(W_E, p)[1:]
    keep = torch.nonzero(norms > ratio * norms.max()).squeeze(1)
    return sorted({int(i) // 2 + 1 for i in keep})
