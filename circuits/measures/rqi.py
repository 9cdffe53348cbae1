"""Representation quality (Liu et al. 2022, "Towards Understanding Grokking: An Effective Theory
of Representation Learning", §3.1 and App. D-E).

A quadruple of inputs (i, j, m, n) is *permissible* when i + j = m + n, and *realised* by the
embeddings E when it is a delta-parallelogram: |(E_i + E_j) - (E_m + E_n)| <= delta. With
P0 the permissible quadruples over every pair of the table and P the realised ones,
RQI = |P| / |P0|: 1 for a linear representation E_k = a + k b, near 0 for a random one (the
commuted and repeated quadruples, (i, j, j, i) and (i, j, i, j), are always realised and are the
floor). Liu et al.'s *predicted accuracy* counts the pairs the training set reaches through a
realised parallelogram: D-bar = D + {(i, j): (i, j, m, n) in P for some training pair (m, n)},
acc-hat = |D-bar| / |D0|.

Conventions here (science.md Decisions): the embeddings are the rows of W_E for the p elements,
normalised as Liu et al. do (E - mean) / sigma, with sigma the root-mean-square norm of the
centred rows (their 1-D embeddings' standard deviation, so that delta has the same meaning at any
width); the permissible set uses integer sums i + j = m + n by default (Liu et al.'s), or sums
mod p (``modular=True``; the relation the modular task actually needs). Liu et al. use
delta = 0.01 and warn that RQI is too strict for high-dimensional embeddings (App. D): a
transformer's embedding of Z_p (cos and sin of w_k a) makes E_i + E_j depend on i - j as well as
i + j, so its RQI can stay near the floor while the network generalises.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.measures.registry import Checkpoints, Column, Family, Result, register

__all__ = ["normalised_embeddings", "rqi"]


def normalised_embeddings(E: Float[Tensor, "*ckpt n d"]) -> Float[Tensor, "*ckpt n d"]:
    """(E - mean) / sigma over the n rows, sigma the RMS norm of the centred rows (Liu et al.
    2022, §3.2: their normalised embeddings, with the mean squared norm 1 at any width)."""
    centred = E.to(torch.float64) - E.to(torch.float64).mean(-2, keepdim=True)
    sigma = centred.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-300)
    return centred / sigma[..., None, None]


def _groups(n: int, modular: bool) -> Int[Tensor, "groups size"]:
    """Pair indices i * n + j grouped by their sum (integer or mod n), padded with -1."""
    i = torch.arange(n).repeat_interleave(n)
    j = torch.arange(n).repeat(n)
    key = (i + j) % n if modular else i + j
    n_groups = n if modular else 2 * n - 1
    order = torch.argsort(key * n * n + i * n + j)
    counts = torch.bincount(key, minlength=n_groups)
    size = int(counts.max())
    out = torch.full((n_groups, size), -1, dtype=torch.long)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n * n) - start[key[order]]
    out[key[order], slot] = order
    return out


def rqi(
    embeddings: Float[Tensor, "*ckpt n d"],
    train_pairs: Int[Tensor, " train"],
    delta: float = 0.01,
    modular: bool = False,
) -> tuple[Float[Tensor, "*ckpt"], Float[Tensor, "*ckpt"]]:
    """``(RQI, acc_hat)`` of the element embeddings (Liu et al. 2022, Eqs. 1-3 and App. D).

    ``embeddings``: one row per element (W_E[:p]; normalised here, :func:`normalised_embeddings`).
    ``train_pairs``: the training set as pair indices i * n + j. ``delta``: the parallelogram
    tolerance (theirs: 0.01). ``modular``: permissible when i + j = m + n mod n rather than over
    the integers."""
    x = normalised_embeddings(embeddings)
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, n, d)
    groups = _groups(n, modular)
    mask = groups >= 0
    safe = groups.clamp_min(0)
    i, j = safe // n, safe % n
    sums = x[:, i] + x[:, j]  # [ckpt, groups, size, d]
    close = torch.cdist(sums, sums) <= delta  # [ckpt, groups, size, size]
    both = mask[:, :, None] & mask[:, None, :]
    close &= both
    realised = close.sum((-3, -2, -1)).to(torch.float64)
    permissible = both.sum().to(torch.float64)
    in_train = torch.zeros(n * n, dtype=torch.bool)
    in_train[train_pairs] = True
    partner_train = in_train[safe] & mask  # [groups, size]
    # A pair is reached when a realised parallelogram joins it to a training pair (itself, if trained).
    reached = (close & partner_train[None, :, None, :]).any(-1) & mask
    acc_hat = reached.sum((-2, -1)).to(torch.float64) / (n * n)
    return (realised / permissible).reshape(lead), acc_hat.reshape(lead)


@register
class RQI(Family):
    """Liu et al.'s (2022) representation quality index of the element embeddings, and the
    accuracy it predicts."""

    name = "rqi"
    doc = "representation quality index of the embeddings and its predicted accuracy (Liu et al. 2022)"
    default = False
    options = {"delta": 0.01, "modular": False}
    columns = (
        Column("rqi", "share of the permissible quadruples (i + j = m + n) whose normalised embeddings "
               "form a parallelogram within delta", "fraction"),
        Column("rqi_acc_hat", "Liu et al.'s predicted accuracy: share of all pairs joined to a training pair "
               "by a realised parallelogram", "fraction"),
    )

    def applies(self, config) -> str | None:  # noqa: ANN001 - a RunConfig
        task = config.task
        if task.op != "add":
            return f"RQI's parallelograms read a sum i + j; op {task.op!r} is not addition"
        if task.mix_mem:
            return "RQI reads the addition table alone; this run mixes in a memorisation task"
        return None

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        E = ckpts.params["embed.W_E"][:, : ckpts.p]
        value, acc = rqi(E, ckpts.task.train_idx, float(ckpts.option(self, "delta")),
                         bool(ckpts.option(self, "modular")))
        return Result(columns={"rqi": value, "rqi_acc_hat": acc})
