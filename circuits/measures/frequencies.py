"""Key frequencies: which Fourier frequencies the network computes with (Nanda et al. 2023, §4).

Default rule (science.md, Decisions): centre each MLP neuron's activation at the last position
over all p^2 inputs, take its 2D Fourier transform, and for each frequency k sum the squared
coefficients of the 3x3 block {Const, cos k, sin k}^2 (constant, linear and quadratic terms of k)
over the neuron's total. A neuron *votes* for its best k when that fraction is >= 0.85; k is a
key frequency when at least max(3, d_mlp // 100) neurons vote for it. The official code keeps
every argmax with no threshold, which lets one stray neuron add a frequency; the vote keeps the
threshold the paper uses for its clusters. The embedding-norm rule (TransformerLens demo) is
:func:`embed_key_frequencies`.

Each function takes the task (or p for modular addition) and works in its Fourier view
(:class:`circuits.tasks.FourierView`): for mul and div the grid of the discrete logarithms of
a, b != 0, whose group Z_(p-1) has frequencies 1..(p-2)/2.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.fourier import _basis, fft1d, line_index, n_frequencies
from circuits.tasks import TaskLike, as_view

__all__ = [
    "neuron_frequency_fractions",
    "NeuronFrequencySums",
    "neuron_clusters",
    "key_frequencies",
    "embed_fourier_norms",
    "neuron_logit_fourier_norms",
    "embed_key_frequencies",
    "CLUSTER_THRESHOLD",
]

CLUSTER_THRESHOLD = 0.85


def neuron_frequency_fractions(
    acts: Float[Tensor, "*ckpt pp neuron"], task: TaskLike
) -> Float[Tensor, "*ckpt neuron freq"]:
    """Fraction of each neuron's centred variance in each frequency's 3x3 Fourier block.

    ``acts`` are activations over the grid's inputs in canonical order (a*p + b), taken to the
    task's Fourier view (an n x n grid; for add, n = p and the whole grid). The block of
    frequency k holds the 8 coefficients {Const, cos k, sin k}^2 minus (Const, Const). Its
    energy needs no 2D transform: by the product-to-sum identities, the four "same-frequency"
    coefficients carry (1/p)(|Y+^(k)|^2 + |Y-^(k)|^2) where Y+ and Y- are the sums of the
    activation grid along its diagonals a + b = s and a - b = d, and the four "axis"
    coefficients carry (1/p)(|R^(k)|^2 + |S^(k)|^2) for the row and column sums R, S (^ is the
    real 1D transform's cos k / sin k pair). Four line sums and 1D transforms replace the
    O(p^3)-per-neuron 2D transform with O(p^2) work (tested against the full transform).
    :class:`NeuronFrequencySums` computes the same from row blocks of the grid.
    """
    view = as_view(task)
    x = acts if acts.dtype in (torch.float32, torch.float64) else acts.float()
    grid = view.n_elements * view.n_elements
    if x.shape[-2] != grid:
        raise ValueError(f"expected {grid} inputs (the grid of {view.n_elements} elements) on axis -2, "
                         f"got {x.shape[-2]}")
    x = view.take(x)
    *lead, pp, n = x.shape
    flat = x.reshape(-1, pp, n)
    sums = NeuronFrequencySums(flat.shape[0], view.n, n, x.dtype, x.device)
    sums.add(0, flat)
    return sums.fractions().reshape(*lead, n, n_frequencies(view.n))


class NeuronFrequencySums:
    """:func:`neuron_frequency_fractions` accumulated over row blocks of the (a, b) grid.

    ``add(a0, block)`` takes the activations of the pairs with a0 <= a < a0 + rows (canonical
    order of an n x n grid, ``[ckpt, rows * n, neuron]``), blocks in any order, each row once;
    ``a0`` may instead be a tensor of the block's row indices (a Fourier view's rows, which a
    block of the task's grid holds in any order). ``fractions()`` then gives
    ``[ckpt, neuron, freq]``. The four line sums are additive over blocks. The
    centred energy is summed around the first block's mean and corrected to the grid mean at the
    end (exact algebra; the shift keeps float32 block sums free of cancellation).
    """

    def __init__(self, n_ckpt: int, p: int, n_neurons: int, dtype: torch.dtype, device: torch.device) -> None:
        self.p = p
        self.lines = torch.zeros(n_ckpt, 4, p, n_neurons, dtype=dtype, device=device)
        self.shift: Tensor | None = None
        self.shifted_sq = torch.zeros(n_ckpt, n_neurons, dtype=torch.float64, device=device)
        self._plus = line_index(p, 1, device)
        self._minus = line_index(p, -1, device)

    def add(self, a0: int | Tensor, block: Float[Tensor, "ckpt rows neuron"]) -> None:
        """Accumulate the activations of rows a0 .. a0 + block.shape[1] // n - 1 (or of the
        rows listed in the tensor ``a0``)."""
        p = self.p
        c, rows, n = block.shape
        m = rows // p
        grid = block.reshape(c, m, p, n)
        if isinstance(a0, Tensor):
            self.lines[:, 0, a0] = grid.sum(dim=2)
            pairs: slice | Tensor = (a0[:, None] * p + torch.arange(p, device=a0.device)).reshape(-1)
        else:
            self.lines[:, 0, a0 : a0 + m] = grid.sum(dim=2)  # R[a]: row sums
            pairs = slice(a0 * p, (a0 + m) * p)
        self.lines[:, 1] += grid.sum(dim=1)  # S[b]: column sums
        self.lines[:, 2].index_add_(1, self._plus[pairs], block)  # Y+[s]
        self.lines[:, 3].index_add_(1, self._minus[pairs], block)  # Y-[d]
        if self.shift is None:
            self.shift = block.mean(dim=1, keepdim=True)
        self.shifted_sq += (block - self.shift).pow_(2).sum(dim=1)

    def fractions(self) -> Float[Tensor, "ckpt neuron freq"]:
        """Each neuron's fraction of centred variance per frequency k = 1..(p-1)/2."""
        if self.shift is None:
            raise ValueError("no activations were added")
        p, lines = self.p, self.lines
        c, _, _, n = lines.shape
        basis = _basis(p, lines.dtype).to(lines.device)
        k = n_frequencies(p)
        coeffs = torch.matmul(basis[1 : 1 + 2 * k], lines)  # [c, 4, 2k, n]: cos 1, sin 1, cos 2, ...
        block = coeffs.pow(2).view(c, 4, k, 2, n).sum(dim=(1, 3)) / p  # [c, k, n]
        # The centred energy (Parseval: every coefficient but (Const, Const)), from the shifted
        # sum of squares: sum (x - s)^2 - p^2 (mean - s)^2 = sum (x - mean)^2.
        mean = lines[:, 0].sum(dim=1).double() / (p * p)
        offset = mean - self.shift[:, 0].double()
        total = (self.shifted_sq - p * p * offset.pow(2)).to(lines.dtype)
        frac = block / total.unsqueeze(1).clamp_min(1e-30)
        # A neuron with no variance over the grid (dead, or constant) has no frequency: its
        # "fractions" would be rounding noise over rounding noise (seen as 1e19, or any value
        # in [0, 1] that changes with the weights' scale), so they are 0. The test is relative
        # to the neuron's second moment, which a constant neuron's rounding noise never reaches.
        second = total.double() + p * p * mean.pow(2)
        alive = total.double() > 1e-6 * second.clamp_min(1e-300)
        frac = torch.where(alive.unsqueeze(1), frac, torch.zeros_like(frac))
        return frac.transpose(1, 2)


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
    W_E: Float[Tensor, "*ckpt d_vocab d_model"], task: TaskLike
) -> Float[Tensor, "*ckpt n"]:
    """Norm of each Fourier component of the embedding over the task's view: for add,
    ``‖(F @ W_E[:p])_i‖`` ('=' row dropped); for mul and div, the rows of the nonzero residues
    in discrete-log order (the '=' and 0 rows dropped)."""
    view = as_view(task)
    rows = W_E[..., view.elements.to(W_E.device), :] if not view.identity else W_E[..., : view.n, :]
    return fft1d(rows.transpose(-1, -2).to(torch.float64)).norm(dim=-2)


def neuron_logit_fourier_norms(
    W_out: Float[Tensor, "*ckpt d_mlp d_model"], W_U: Float[Tensor, "*ckpt d_model p"],
    task: TaskLike | None = None,
) -> Float[Tensor, "*ckpt n"]:
    """Fourier norms of the neuron-logit map W_L = W_out @ W_U along its output axis (the
    task's view of the classes; default every class, as for add)."""
    W_L = W_out.to(torch.float64) @ W_U.to(torch.float64)
    if task is not None:
        W_L = _classes(W_L, task)
    return fft1d(W_L).norm(dim=-2)


def _classes(x: Tensor, task: TaskLike) -> Tensor:
    """The last axis (classes) taken to the task's view."""
    view = as_view(task)
    return x if view.identity else x.index_select(-1, view.classes.to(x.device))


def embed_key_frequencies(W_E: Float[Tensor, "d_vocab d_model"], task: TaskLike, ratio: float = 0.25) -> list[int]:
    """Embedding-norm rule: frequencies with a cos or sin component above ``ratio`` x the max."""
    norms = embed_fourier_norms(W_E, task)
    norms = norms[1 : 1 + 2 * n_frequencies(norms.shape[-1])]
    keep = torch.nonzero(norms > ratio * norms.max()).squeeze(1)
    return sorted({int(i) // 2 + 1 for i in keep})
