"""Nanda et al.'s (2023) remaining Fourier measures: one frequency at a time, the logits'
cos(w(a+b-c)) fit, and the TransformerLens demo's neuron-level restricted and excluded losses.

* excluded loss per frequency (the paper's appendix figure "Excluded Loss - Key Frequencies"):
  the logits with only frequency k's two answer directions cos/sin(w_k(a+b)) removed, scored on
  the training pairs, for every k = 1..(p-1)/2. Removing a key frequency should hurt; removing
  any other should not (a model-independent variant is the maximum over k).
* cos(w(a+b-c)) fit (the paper's §4.1 and App. D): the logits approximated by
  sum_k alpha_k cos(w_k(a+b-c)) over the key frequencies, each alpha_k a least-squares
  coefficient; the share of the logits' variance (about their mean over every (a, b, c)) it
  explains. The paper reports about 95% at the end of training.
* neuron-level restricted / excluded loss (science.md Part A §4.2, the TransformerLens demo): the
  projection applied to the MLP activations at the answer position rather than to the logits;
  restricted on the test pairs, excluded on the training pairs with the attention path kept.

Each works in the task's Fourier view (a + b for add, a - b for sub, the discrete logarithm's
for mul and div; science.md Decisions), as the other Fourier measures do. The families are
opt-in (``circuits analyze --measures default,per_frequency,cos_fit,neuron_losses``).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.fourier import n_frequencies, sum_directions
from circuits.measures.losses import cross_entropy, excluded_loss, logits_in_view
from circuits.measures.registry import ArraySpec, Block, Checkpoints, Column, Family, Result, register
from circuits.tasks import FourierView, TaskLike, as_view

__all__ = [
    "excluded_loss_per_frequency",
    "cos_cube",
    "cos_fit",
    "neuron_level_losses",
]

F64 = torch.float64


def excluded_loss_per_frequency(
    logits: Float[Tensor, "*ckpt pp cls"],
    labels: Int[Tensor, " pp"],
    task: TaskLike,
    idx: Int[Tensor, " n"],
    freqs: list[int] | None = None,
) -> Float[Tensor, "*ckpt freq"]:
    """The excluded loss with one frequency removed at a time (Nanda et al. 2023, App.
    "Excluded Loss - Key Frequencies"): column j is :func:`~circuits.measures.excluded_loss`
    with ``[freqs[j]]``, on the canonical pairs ``idx`` (the paper: the training pairs).
    ``freqs`` default: every frequency 1..(n-1)/2 of the task's view."""
    view = as_view(task)
    ks = list(range(1, n_frequencies(view.n) + 1)) if freqs is None else list(freqs)
    return torch.stack([excluded_loss(logits, labels, view, [k], idx) for k in ks], dim=-1)


def cos_cube(view: FourierView, k: int) -> Float[Tensor, "nn cls"]:
    """cos(w_k(i + sign j - c)) over the view's pairs (i, j) and classes c, w_k = 2 pi k / n:
    the logit pattern of one frequency in Nanda et al.'s algorithm (their §4.1)."""
    n = view.n
    pos = (torch.arange(n)[:, None] + view.sign * torch.arange(n)[None, :]).reshape(-1)
    return torch.cos(2 * math.pi * k * (pos[:, None] - torch.arange(n)[None, :]).to(F64) / n)


def cos_fit(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int]
) -> tuple[Float[Tensor, "*ckpt freq"], Float[Tensor, "*ckpt"]]:
    """``(alpha, share)``: the least-squares coefficients of the logits (in the task's view) on
    cos(w_k(a+b-c)) for k in ``freqs`` (:func:`cos_cube`), and the share of the logits' variance
    about their mean over every (a, b, c) that the fit explains (Nanda et al. 2023, §4.1: about
    95% at the end of training). The cubes are orthogonal to each other and to constants, so the
    coefficients are separate projections."""
    view, x = logits_in_view(logits, task)
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    alphas, explained = [], torch.zeros(centred.shape[:-2], dtype=F64)
    for k in freqs:
        cube = cos_cube(view, k).to(x.device)
        sq = cube.pow(2).sum()
        alpha = (centred * cube).sum((-2, -1)) / sq
        alphas.append(alpha)
        explained = explained + alpha.pow(2) * sq
    total = centred.pow(2).sum((-2, -1)).clamp_min(1e-300)
    alpha_t = torch.stack(alphas, dim=-1) if alphas else torch.zeros(*centred.shape[:-2], 0, dtype=F64)
    return alpha_t, explained / total


def neuron_level_losses(
    post: Float[Tensor, "*ckpt pp d_mlp"],
    logits: Float[Tensor, "*ckpt pp cls"],
    W_out: Float[Tensor, "*ckpt d_mlp d_model"],
    W_U: Float[Tensor, "*ckpt d_model cls"],
    labels: Int[Tensor, " pp"],
    task: TaskLike,
    freqs: list[int],
    train_idx: Int[Tensor, " n_train"],
    test_idx: Int[Tensor, " n_test"],
) -> tuple[Float[Tensor, "*ckpt"], Float[Tensor, "*ckpt"]]:
    """``(restricted, excluded)``: the TransformerLens demo's neuron-level losses (science.md
    Part A §4.2). With N the MLP activations at the answer position and P_S the projection on
    the key answer directions over the view's pairs: restricted logits = (mean N + P_S N) W_out
    W_U shifted to the logits' mean, scored on the test pairs; excluded logits = the logits minus
    (P_S N) W_out W_U (the attention path kept), scored on the training pairs."""
    view = as_view(task)
    n = view.take(post).to(F64)
    x = view.take(logits, classes=True).to(F64)
    W_L = torch.matmul(W_out.to(F64), W_U.to(F64))
    W_L = W_L.index_select(-1, view.classes.to(W_L.device)) if not view.identity else W_L
    dirs = sum_directions(view.n, freqs, F64, view.sign).to(n.device)
    proj = torch.einsum("dq,...dm->...qm", dirs, torch.einsum("dq,...qm->...dm", dirs, n))
    through = torch.matmul(proj, W_L)  # P_S(N) W_L: zero mean over the pairs
    restricted = through + x.mean(dim=-2, keepdim=True)
    excluded = x - through
    y = view.labels(labels)
    test, train = view.index(test_idx), view.index(train_idx)
    return cross_entropy(restricted[..., test, :], y[test]), cross_entropy(excluded[..., train, :], y[train])


@register
class PerFrequency(Family):
    """The excluded loss with one frequency removed at a time (Nanda et al. 2023, appendix)."""

    name = "per_frequency"
    doc = "excluded loss with one frequency removed at a time, every frequency (Nanda et al. 2023, App.)"
    default = False
    columns = (
        Column("excluded_loss_max_freq", "the largest one-frequency excluded loss over every frequency "
               "(the paper's model-independent variant)", "nats"),
    )
    arrays = (
        ArraySpec("excluded_loss_per_freq", "float64 [ckpt, (n-1)/2]: the training loss with only "
                  "frequency k = 1, 2, ... removed from the logits"),
    )
    needs = frozenset({"logits"})
    uses = ("fourier_sums",)
    fourier = True

    def start(self, ckpts: Checkpoints) -> dict[str, Tensor]:
        view = ckpts.view
        ks = list(range(1, n_frequencies(view.n) + 1))
        dirs = sum_directions(view.n, ks, F64, view.sign)
        return {"dirs": dirs, "coeffs": torch.zeros(ckpts.n_ckpt, len(dirs), view.n, dtype=F64)}

    def add(self, state: dict[str, Tensor], ckpts: Checkpoints, block: Block) -> None:
        vb = block.fourier
        state["coeffs"] += torch.matmul(state["dirs"][:, vb.span], vb.x64)

    def finish(self, state: dict[str, Tensor], ckpts: Checkpoints) -> Result:
        s = ckpts.results["fourier_sums"].shared
        train, labels = s["train_idx"], s["labels"]
        x = s["logits32"][:, train].to(F64)
        dirs, coeffs = state["dirs"][:, train], state["coeffs"]
        losses = []
        for j in range(0, len(dirs), 2):
            removed = torch.matmul(dirs[j : j + 2].T, coeffs[:, j : j + 2])
            losses.append(cross_entropy(x - removed, labels[train]))
        per = torch.stack(losses, dim=-1)
        return Result(columns={"excluded_loss_max_freq": per.amax(-1)}, arrays={"excluded_loss_per_freq": per})


@register
class CosFit(Family):
    """The logits' fit by sum_k alpha_k cos(w_k(a+b-c)) over the key frequencies (Nanda et al.
    2023, §4.1), from the key directions' coefficients: <L, cos(w(q - c))> = sum_c cos(wc)
    <L_c, cos(wq)> + sin(wc) <L_c, sin(wq)>, q the answer position of the pair."""

    name = "cos_fit"
    doc = "share of the logits' variance explained by sum_k alpha_k cos(w_k(a+b-c)) (Nanda et al. 2023)"
    default = False
    columns = (
        Column("cos_fit_share", "share of the logits' variance (about their mean over every (a, b, c)) "
               "explained by the key frequencies' cos(w_k(a+b-c)) least-squares fit", "fraction"),
    )
    arrays = (ArraySpec("cos_fit_alpha", "float64 [ckpt, key]: each key frequency's coefficient alpha_k"),)
    uses = ("fourier_sums", "key_directions")
    fourier = True

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        s, kd = ckpts.results["fourier_sums"].shared, ckpts.results["key_directions"].shared
        view, n = ckpts.view, ckpts.view.n
        pos = (torch.arange(n)[:, None] + view.sign * torch.arange(n)[None, :]).reshape(-1).to(F64)
        c = torch.arange(n, dtype=F64)
        coeffs = kd["coeffs"]  # [ckpt, 2 per key, cls]: <unit direction, logit column>
        alphas, explained = [], torch.zeros(ckpts.n_ckpt, dtype=F64)
        for j, k in enumerate(ckpts.key):
            w = 2 * math.pi * k / n
            # The unit directions' norms: the raw cos and sin over the view's pairs.
            cos_norm, sin_norm = torch.cos(w * pos).norm(), torch.sin(w * pos).norm()
            inner = (torch.cos(w * c) * coeffs[:, 2 * j] * cos_norm + torch.sin(w * c) * coeffs[:, 2 * j + 1] * sin_norm).sum(-1)
            cube_sq = n * n * torch.cos(w * c).pow(2).sum()  # sum over (q, c) of cos^2(w(q - c))
            alpha = inner / cube_sq
            alphas.append(alpha)
            explained = explained + alpha.pow(2) * cube_sq
        pp, cls = s["labels"].shape[0], s["colsum"].shape[-1]
        grand = s["colsum"].sum(-1) / (pp * cls)
        total = (s["sumsq"] - pp * cls * grand.pow(2)).clamp_min(1e-300)
        alpha_t = torch.stack(alphas, dim=-1) if alphas else torch.zeros(ckpts.n_ckpt, 0, dtype=F64)
        return Result(columns={"cos_fit_share": explained / total}, arrays={"cos_fit_alpha": alpha_t})


@register
class NeuronLosses(Family):
    """The TransformerLens demo's neuron-level restricted and excluded losses (science.md Part A
    §4.2): the key answer directions projected out of (or kept in) the MLP activations."""

    name = "neuron_losses"
    doc = "neuron-level restricted (test pairs) and excluded (train pairs) loss, the TransformerLens demo's"
    default = False
    columns = (
        Column("restricted_loss_neurons", "loss on the test pairs of (mean N + P_S N) W_out W_U, shifted to "
               "the logits' mean (N: MLP activations at the answer position)", "nats"),
        Column("excluded_loss_neurons", "loss on the training pairs of the logits minus (P_S N) W_out W_U "
               "(the attention path kept)", "nats"),
    )
    needs = frozenset({"post"})
    uses = ("fourier_sums",)
    fourier = True

    def start(self, ckpts: Checkpoints) -> dict[str, Tensor]:
        view = ckpts.view
        dirs = sum_directions(view.n, ckpts.key, F64, view.sign)
        d_mlp = ckpts.params["blocks.0.mlp.W_in"].shape[-1]
        return {"dirs": dirs, "coeffs": torch.zeros(ckpts.n_ckpt, len(dirs), d_mlp, dtype=F64)}

    def add(self, state: dict[str, Tensor], ckpts: Checkpoints, block: Block) -> None:
        vb = block.fourier
        state["coeffs"] += torch.matmul(state["dirs"][:, vb.span], vb.post.to(F64))

    def finish(self, state: dict[str, Tensor], ckpts: Checkpoints) -> Result:
        s, view = ckpts.results["fourier_sums"].shared, ckpts.view
        W_L = torch.matmul(ckpts.params["blocks.0.mlp.W_out"].to(F64), ckpts.params["unembed.W_U"].to(F64))
        if not view.identity:
            W_L = W_L.index_select(-1, view.classes)
        through_coeffs = torch.matmul(state["coeffs"], W_L)  # [ckpt, dirs, cls]
        dirs, labels, mean = state["dirs"], s["labels"], s["mean"]
        test = ckpts.table.test_idx
        train = s["train_idx"]
        cols: dict[str, Tensor] = {}
        logits = s["logits32"]
        through_test = torch.matmul(dirs[:, test].T, through_coeffs)
        cols["restricted_loss_neurons"] = cross_entropy(through_test + mean[:, None], labels[test])
        through_train = torch.matmul(dirs[:, train].T, through_coeffs)
        cols["excluded_loss_neurons"] = cross_entropy(logits[:, train].to(F64) - through_train, labels[train])
        if not len(test):
            cols["restricted_loss_neurons"] = torch.full((ckpts.n_ckpt,), float("nan"), dtype=F64)
        return Result(columns=cols)
