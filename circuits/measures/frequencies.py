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

    ``acts`` are activations over the p^2 inputs in canonical order. The 2D transform is two
    batched matmuls with the real basis (an FFT is slower here: p is prime), and the block of
    frequency k is read off as the 8 coefficients {0, cos k, sin k}^2 minus (0, 0) (zero after
    centring).
    """
    # Float32 is ample for fractions (within ~1e-6 of float64) and twice as fast on a CPU.
    x = acts if acts.dtype in (torch.float32, torch.float64) else acts.float()
    x = x - x.mean(dim=-2, keepdim=True)
    *lead, pp, n = x.shape
    c = 1
    for d in lead:
        c *= d
    basis = _basis(p, x.dtype).to(x.device)
    total = x.pow(2).sum(dim=-2).reshape(c, n)  # Parseval: the centred neuron's energy
    g = torch.matmul(basis, x.reshape(c, p, p * n))  # along a: [c, i, (b n)]
    coeffs = torch.matmul(basis, g.reshape(c * p, p, n)).reshape(c, p, p, n)  # along b
    k = torch.arange(1, n_frequencies(p) + 1, device=x.device)
    zero, cos_k, sin_k = torch.zeros_like(k), 2 * k - 1, 2 * k
    rows = torch.stack([zero, zero, cos_k, sin_k, cos_k, cos_k, sin_k, sin_k], dim=1)
    cols = torch.stack([cos_k, sin_k, zero, zero, cos_k, sin_k, cos_k, sin_k], dim=1)
    block = coeffs[:, rows, cols, :].pow(2).sum(dim=2)  # [c, k, n]
    frac = block / total.unsqueeze(1).clamp_min(1e-30)
    return frac.transpose(1, 2).reshape(*lead, n, len(k))


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
