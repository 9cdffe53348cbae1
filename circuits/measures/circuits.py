"""The memorising and the generalising circuit inside one network, at one checkpoint.

Varma et al. (2023, "Explaining grokking through circuit efficiency") explain grokking as a
competition between a memorising circuit C_mem and a generalising circuit C_gen, won by the
more *efficient* one (more logit per unit of parameter norm). They compare separate networks
(random labels vs large data); here one network is split into the two parts at every
checkpoint, by definitions that add up exactly (docs/measures.md, science.md Part C). The
functions take the task (or p for addition) and read its Fourier view: for mul and div, the
pairs with a, b != 0 and the classes 1..p-1 in discrete-log order.

* **Logits.** Over all p^2 inputs, ``L = L_bias + L_gen + L_mem``: ``L_bias`` the per-class mean
  over inputs, ``L_gen = P_S(L)`` the projection of each logit column onto cos/sin(w_k(a+b)) for
  the key frequencies S (the restricted-loss directions of Nanda et al. 2023), ``L_mem`` the rest.
* **Parameters.** Squared norms split through orthogonal projections: W_E's token axis and W_U's
  output axis in the Fourier basis (key-frequency cos/sin rows to C_gen, the rest to C_mem);
  each MLP neuron's W_in column, b_in entry and W_out row split in proportion to the share of
  the neuron's activation variance in the key frequencies. Attention, W_pos and the other
  biases are shared machinery, reported on their own. gen + mem + shared = the total.
* **Efficiency.** Varma et al.: a circuit is more efficient when it needs less parameter norm
  for a given logit. With no LayerNorm and frozen zero biases the logits are positively
  homogeneous of degree 4 along W_E -> W_in -> W_out -> W_U (attention held fixed), so a
  part's margin m (mean training margin: correct-class logit minus mean other-class logit,
  linear, so the parts' margins add up) grows as c^4 when its weights grow by c, while its
  norm grows as c. ``efficiency = sign(m) |m|^(1/4) / sqrt(norm_sq)`` is the one ratio that
  does not change when a part merely grows (science.md, Decisions 2026-12-04;
  docs/measures.md says why the earlier margin / norm misled by orders of magnitude).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.fourier import line_index
from circuits.measures.losses import logits_in_view, project_in_view
from circuits.tasks import TaskLike, as_view

__all__ = [
    "logit_parts",
    "part_logit_stats",
    "sum_direction_share",
    "circuit_norms_sq",
    "circuit_efficiency",
    "DEGREE",
    "SHARED_PARAMS",
]

#: Parameters counted in neither circuit: the attention and position machinery both use.
SHARED_PARAMS = (
    "pos_embed.W_pos",
    "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V", "blocks.0.attn.W_O",
    "blocks.0.attn.b_Q", "blocks.0.attn.b_K", "blocks.0.attn.b_V", "blocks.0.attn.b_O",
    "blocks.0.mlp.b_out", "unembed.b_U",
)


def logit_parts(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int]
) -> tuple[Float[Tensor, "*ckpt 1 cls"], Float[Tensor, "*ckpt nn cls"], Float[Tensor, "*ckpt nn cls"]]:
    """``(L_bias, L_gen, L_mem)`` in float64 on the task's view; ``L_bias + L_gen + L_mem`` is
    the view's logits exactly up to rounding.

    ``L_bias`` broadcasts over the inputs (one value per class).
    """
    view, x = logits_in_view(logits, task)
    bias = x.mean(dim=-2, keepdim=True)
    gen = project_in_view(x, view, freqs)  # zero-mean directions: P_S(L - bias) = P_S(L)
    return bias, gen, x - bias - gen


def part_logit_stats(
    part: Float[Tensor, "*ckpt pp cls"], labels: Int[Tensor, " pp"], idx: Int[Tensor, " n"]
) -> tuple[Float[Tensor, "*ckpt"], Float[Tensor, "*ckpt"]]:
    """A logit part's mean correct-class logit and mean margin over the pairs ``idx``.

    Margin = correct-class logit minus the mean of the other classes' logits (linear in the
    logits, so the margins of the parts add up to the network's).
    """
    x = part[..., idx, :]
    y = labels[idx].expand(*x.shape[:-1]).unsqueeze(-1)
    correct = x.gather(-1, y).squeeze(-1)
    others = (x.sum(-1) - correct) / (x.shape[-1] - 1)
    return correct.mean(-1), (correct - others).mean(-1)


def sum_direction_share(
    logits: Float[Tensor, "*ckpt pp cls"], task: TaskLike, freqs: list[int] | None = None
) -> Float[Tensor, "*ckpt"]:
    """``‖P_S(L - L_bias)‖ / ‖L - L_bias‖``: Varma et al.'s trig-subspace share of the logit norm
    (on the task's view).

    ``freqs=None`` takes every frequency: then P_S(L - L_bias) is exactly the part of the logits
    that depends on (a, b) only through the answer's position (a + b mod p for add; for sub
    a - b; for mul and div, the discrete log of the answer), i.e. each such line's mean minus
    the overall mean, so the share needs no key set (``gen_share_all``).
    """
    view, x = logits_in_view(logits, task)
    p = view.n
    centred_sq = (x - x.mean(dim=-2, keepdim=True)).pow(2).sum((-2, -1))
    if freqs is not None:
        gen_sq = project_in_view(x, view, freqs).pow(2).sum((-2, -1))
    else:
        diag = line_index(p, view.sign, x.device)
        sums = x.new_zeros(*x.shape[:-2], p, x.shape[-1]).index_add_(-2, diag, x)
        means = sums / p
        gen_sq = p * (means - x.mean(dim=-2, keepdim=True)).pow(2).sum((-2, -1))
    return (gen_sq / centred_sq.clamp_min(1e-300)).sqrt()


def circuit_norms_sq(
    params: Mapping[str, Tensor],
    task: TaskLike,
    freqs: list[int],
    neuron_key_frac: Float[Tensor, "ckpt d_mlp"],
) -> dict[str, Float[Tensor, " ckpt"]]:
    """Squared parameter norms of the generalising, memorising and shared parts (float64).

    ``params`` are stacked checkpoints (leading ``ckpt`` axis, classic names);
    ``neuron_key_frac`` is each neuron's share of activation variance in the key frequencies
    (:func:`circuits.measures.frequencies.neuron_frequency_fractions` summed over S), clipped to
    [0, 1]. Returns ``gen_norm_sq``, ``mem_norm_sq`` and ``shared_norm_sq``; they add up to the
    total sum of squared weights. The Fourier rows are the task view's: for mul and div, the
    discrete-log characters over the nonzero residues (the 0 token's row and class 0 go to the
    memorising part with everything else outside the key directions).
    """
    f64 = torch.float64
    view = as_view(task)
    W_E = params["embed.W_E"].to(f64)
    W_U = params["unembed.W_U"].to(f64)
    basis = view.basis().to(W_E.device)  # [n, elements]
    rows = torch.tensor([r for k in freqs for r in (2 * k - 1, 2 * k)], dtype=torch.long)
    p = view.n_elements
    # Token axis of W_E (number tokens only; '=' is not a residue) and output axis of W_U.
    emb = torch.einsum("ip,kpd->kid", basis, W_E[:, :p]).pow(2).sum(-1)  # [ckpt, n]
    unemb = torch.einsum("ip,kdp->kid", view.class_basis().to(W_U.device), W_U[..., : view.n_classes]).pow(2).sum(-1)
    emb_gen, unemb_gen = emb[:, rows].sum(-1), unemb[:, rows].sum(-1)
    emb_total = W_E.pow(2).sum((1, 2))
    unemb_total = W_U.pow(2).sum((1, 2))
    f = neuron_key_frac.to(f64).clamp(0.0, 1.0)
    per_neuron = (
        params["blocks.0.mlp.W_in"].to(f64).pow(2).sum(1)
        + params["blocks.0.mlp.W_out"].to(f64).pow(2).sum(2)
        + params["blocks.0.mlp.b_in"].to(f64).pow(2)
    )  # [ckpt, d_mlp]
    mlp_gen = (f * per_neuron).sum(-1)
    mlp_total = per_neuron.sum(-1)
    gen = emb_gen + unemb_gen + mlp_gen
    mem = (emb_total - emb_gen) + (unemb_total - unemb_gen) + (mlp_total - mlp_gen)
    shared = torch.zeros_like(gen)
    for name in SHARED_PARAMS:
        if name in params:
            shared = shared + params[name].to(f64).pow(2).flatten(1).sum(1)
    return {"gen_norm_sq": gen, "mem_norm_sq": mem, "shared_norm_sq": shared}


#: The homogeneity degree of the logits in a part's weights (W_E, W_in, W_out, W_U).
DEGREE = 4


def circuit_efficiency(
    margin: Float[Tensor, "*ckpt"], norm_sq: Float[Tensor, "*ckpt"], degree: int = DEGREE
) -> Float[Tensor, "*ckpt"]:
    """Scale-free efficiency of a part: ``sign(m) |m|^(1/degree) / sqrt(norm_sq)`` (0 where the
    norm is 0), with m its mean training margin.

    Varma et al. (2023, "Explaining grokking through circuit efficiency"): the parameter norm a
    circuit needs for a given logit. The logits are homogeneous of degree 4 in the weights
    along W_E -> W_in -> W_out -> W_U, so multiplying a part's weights by c multiplies m by
    c^4 and the norm by c: this ratio is unchanged, where ``m / norm`` (the 0.1 definition)
    grew as c^3 and ranked a large part above a small one for being large (tested on a
    hand-built circuit scaled by 2 and 3).
    """
    m = torch.as_tensor(margin, dtype=torch.float64)
    norm = torch.as_tensor(norm_sq, dtype=torch.float64).sqrt()
    root = m.sign() * m.abs().pow(1.0 / degree)
    return torch.where(norm > 0, root / norm.clamp_min(1e-300), torch.zeros_like(norm))
