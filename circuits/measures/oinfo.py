"""O-information of the MLP's neuron groups (Clauw, Stramaglia and Marinazzo 2024,
"Information-theoretic progress measures reveal grokking is an emergent phase transition").

For variables X_1..X_n, Rosas et al.'s (2019) O-information is

    Omega = (n - 2) H(X) + sum_j [H(X_j) - H(X without X_j)],

positive when the set is dominated by redundancy (the variables repeat each other), negative
when dominated by synergy (information only the whole set holds; the Gaussian analogue of XOR is
X_3 = X_1 + X_2). Entropies use the Gaussian-copula estimator (Ince et al. 2017): each variable
is rank-transformed to a standard normal, and H is that of a Gaussian with the sample covariance,
with Ince's analytic bias correction; in bits, as ``hoi`` (the package Clauw et al. used) reports.

Clauw et al.'s recipe, followed here (science.md Decisions): the post-ReLU MLP activations at
the answer position on the training inputs; the neurons grouped by Ward linkage (Euclidean, on
the activation columns) into k groups (default 10), fitted once on the run's newest checkpoint
and reused at every checkpoint; every multiplet of 2..k groups (each group one multivariate
variable) searched exhaustively; per checkpoint the synergy (the most negative Omega), the
redundancy (the largest) and the size of the multiplets that reach them. Only the 2^k subset
entropies are needed, each one log-determinant of a block of the neurons' covariance.

Ties (a ReLU's zeros) have no rank order. ``hoi`` breaks them by sample order, which gives every
pair of neurons that are zero on the same inputs a spurious correlation, and two dead neurons
identical columns (a singular covariance); here ties are broken by an independent seeded random
order per neuron, so a dead neuron is an independent variable, which adds exactly nothing to
Omega. On data without ties the two agree (tested against ``hoi`` when it is installed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.measures.registry import (
    ArraySpec,
    Block,
    Checkpoints,
    Column,
    Family,
    Result,
    post_activations,
    register,
)

__all__ = [
    "copula_normalise",
    "gaussian_entropy",
    "subset_entropies",
    "o_information",
    "multiplet_o_information",
    "ward_groups",
]

F64 = torch.float64
LN2 = math.log(2.0)


def copula_normalise(x: Float[Tensor, "samples vars"], seed: int | None = 0) -> Float[Tensor, "samples vars"]:
    """Each column replaced by the standard-normal quantiles of its ranks, ``Phi^-1(rank / (N +
    1))``, then demeaned (Ince et al. 2017). ``seed``: ties broken by a seeded random order, one
    per column (None: by sample order, as ``hoi`` and Ince's ``gcmi`` do)."""
    x = x.to(F64)
    n = x.shape[0]
    if seed is None:
        ranks = torch.argsort(torch.argsort(x, dim=0, stable=True), dim=0)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        shuffle = torch.argsort(torch.rand(x.shape, generator=gen, dtype=F64), dim=0)  # a permutation per column
        shuffled = torch.gather(x, 0, shuffle)
        order = torch.argsort(shuffled, dim=0, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(0, torch.gather(shuffle, 0, order), torch.arange(n)[:, None].expand_as(order).contiguous())
    g = torch.special.ndtri((ranks.to(F64) + 1.0) / (n + 1.0))
    return g - g.mean(0, keepdim=True)


def _bias(n_samples: int, max_dim: int) -> Tensor:
    """Ince's analytic bias of the Gaussian entropy (nats) for dimensions 0..max_dim."""
    d = torch.arange(1, max_dim + 1, dtype=F64)
    psi = torch.special.digamma((n_samples - d) / 2.0) / 2.0
    dterm = (LN2 - math.log(n_samples - 1.0)) / 2.0
    per_dim = dterm + psi  # subtracted once per dimension
    return torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(per_dim, 0)])


def gaussian_entropy(
    cov: Float[Tensor, "d d"], n_samples: int | None = None, bias_correct: bool = True
) -> float:
    """Entropy in bits of a Gaussian with covariance ``cov``; with ``bias_correct`` (needs
    ``n_samples``), Ince et al.'s correction for a covariance estimated from that many samples."""
    d = cov.shape[-1]
    if d == 0:
        return 0.0
    logdet = 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(cov.to(F64)))).sum()
    h = 0.5 * float(logdet) + 0.5 * d * (math.log(2 * math.pi) + 1.0)
    if bias_correct:
        if n_samples is None:
            raise ValueError("bias correction needs the number of samples the covariance came from")
        h -= float(_bias(n_samples, d)[d])
    return h / LN2


def subset_entropies(
    cov: Float[Tensor, "vars vars"], groups: Sequence[Sequence[int]], n_samples: int, bias_correct: bool = True
) -> Float[Tensor, " subsets"]:
    """H (bits) of every union of ``groups``, indexed by bitmask (bit g set: group g is in it);
    entry 0, the empty set, is 0. A union of more dimensions than ``n_samples - 2`` is NaN (its
    covariance is singular or its bias correction undefined)."""
    k = len(groups)
    if k > 20:
        raise ValueError(f"{k} groups: the exhaustive search over 2^{k} multiplets is out of reach; use <= 20")
    index = [torch.as_tensor(list(g), dtype=torch.long) for g in groups]
    sizes = [len(g) for g in groups]
    total = sum(sizes)
    bias = _bias(n_samples, min(total, max(n_samples - 2, 0)))
    out = torch.full((1 << k,), float("nan"), dtype=F64)
    out[0] = 0.0
    cov = cov.to(F64)
    for mask in range(1, 1 << k):
        members = [g for g in range(k) if mask >> g & 1]
        d = sum(sizes[g] for g in members)
        if d > n_samples - 2:
            continue
        idx = torch.cat([index[g] for g in members])
        chol, info = torch.linalg.cholesky_ex(cov[idx][:, idx])
        if int(info) != 0:
            continue
        h = torch.log(torch.diagonal(chol)).sum() + 0.5 * d * (math.log(2 * math.pi) + 1.0)
        if bias_correct:
            h = h - bias[d]
        out[mask] = h / LN2
    return out


def multiplet_o_information(entropies: Float[Tensor, " subsets"], k: int) -> Float[Tensor, " subsets"]:
    """Omega of every multiplet (bitmask) of ``k`` variables from :func:`subset_entropies`: NaN
    for the empty set and the single variables, where it is not defined."""
    masks = torch.arange(1 << k)
    size = torch.zeros(1 << k, dtype=F64)
    singles = torch.zeros(1 << k, dtype=F64)
    leave_one_out = torch.zeros(1 << k, dtype=F64)
    for g in range(k):
        has = (masks >> g & 1).bool()
        size += has.to(F64)
        singles += torch.where(has, entropies[1 << g], torch.zeros((), dtype=F64))
        leave_one_out += torch.where(has, entropies[masks & ~(1 << g)], torch.zeros((), dtype=F64))
    omega = (size - 2) * entropies + singles - leave_one_out
    omega[size < 2] = float("nan")
    return omega


def o_information(
    x: Float[Tensor, "samples vars"],
    groups: Sequence[Sequence[int]] | None = None,
    bias_correct: bool = True,
    seed: int | None = 0,
) -> float:
    """Omega (bits) of the variables ``groups`` (lists of columns of ``x``, each one multivariate
    variable; default: every column its own variable) with the Gaussian-copula estimator
    (Rosas et al. 2019; Ince et al. 2017). Positive: redundancy; negative: synergy."""
    z = copula_normalise(x, seed)
    groups = [[i] for i in range(x.shape[1])] if groups is None else groups
    cov = z.T @ z / (z.shape[0] - 1)
    ent = subset_entropies(cov, groups, z.shape[0], bias_correct)
    return float(multiplet_o_information(ent, len(groups))[-1])


def ward_groups(x: Float[Tensor, "samples vars"], k: int) -> Int[Tensor, " vars"]:
    """Each column's group among ``k``, by agglomerative clustering of the columns with Ward's
    linkage on Euclidean distance (as scikit-learn's ``AgglomerativeClustering``, which Clauw et
    al. use). Groups are numbered by their smallest column, so the labels are canonical."""
    pts = x.to(F64).T.numpy()
    n = pts.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot group {n} neurons into {k} groups; choose 1 <= k <= {n}")
    sq = (pts * pts).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * pts @ pts.T, 0.0)
    np.fill_diagonal(d2, np.inf)
    size = np.ones(n)
    alive = np.ones(n, dtype=bool)
    label = np.arange(n)
    for _ in range(n - k):
        flat = int(np.argmin(d2))
        i, j = divmod(flat, n)
        if i > j:
            i, j = j, i
        # Lance-Williams for Ward on squared distances: cluster j merges into i.
        ni, nj, nk = size[i], size[j], size
        merged = ((ni + nk) * d2[i] + (nj + nk) * d2[j] - nk * d2[i, j]) / (ni + nj + nk)
        merged[~alive] = np.inf
        d2[i], d2[:, i] = merged, merged
        d2[i, i] = np.inf
        d2[j], d2[:, j] = np.inf, np.inf
        size[i] += size[j]
        alive[j] = False
        label[label == j] = i
    _, canonical = np.unique(label, return_inverse=True)  # np.unique sorts: smallest column first
    first = {}
    out = np.empty(n, dtype=np.int64)
    for col, lab in enumerate(canonical):
        out[col] = first.setdefault(lab, len(first))
    return torch.from_numpy(out)


@register
class OInformation(Family):
    """Synergy and redundancy of the MLP's neuron groups (Clauw et al. 2024), every ``every``-th
    checkpoint."""

    name = "oinfo"
    doc = "O-information of the MLP's Ward neuron groups: synergy, redundancy (Clauw et al. 2024)"
    default = False
    options = {"groups": 10, "every": 1, "seed": 1, "bias_correct": True}
    zero_allowed = frozenset({"seed"})
    columns = (
        Column("oinfo_synergy", "the most negative O-information over every multiplet of neuron groups "
               "(more negative: more synergy)", "bits"),
        Column("oinfo_redundancy", "the largest O-information over every multiplet of neuron groups", "bits"),
        Column("oinfo_synergy_size", "groups in the multiplet with the most negative O-information", "groups"),
        Column("oinfo_redundancy_size", "groups in the multiplet with the largest O-information", "groups"),
    )
    arrays = (
        ArraySpec("oinfo", "float64 [ckpt, 2^k]: the O-information of every multiplet of the k groups, by "
                  "bitmask (bit g: group g is in it); NaN for sizes 0-1 and checkpoints not analysed"),
        ArraySpec("oinfo_groups", "int64 [ckpt, d_mlp]: each neuron's Ward group (fitted once, on the newest "
                  "checkpoint)"),
    )
    needs = frozenset({"post"})
    one_layer = False  # the fully connected network's hidden layer is read as well (Clauw et al.'s setting)

    def applies(self, config) -> str | None:  # noqa: ANN001 - a RunConfig
        from circuits.tasks import make_task

        n_train = len(make_task(config.task).train_idx)
        if n_train < config.model.d_mlp + 3:
            return (f"its covariance of {config.model.d_mlp} neurons needs more training inputs than "
                    f"neurons; this run has {n_train}")
        return None

    def start(self, ckpts: Checkpoints) -> dict[str, Tensor]:
        every = int(ckpts.option(self, "every"))
        chosen = [i for i, pos in enumerate(ckpts.positions) if pos % every == 0]
        d_mlp = ckpts.config.model.d_mlp
        train = ckpts.task.train_idx
        return {"chosen": torch.tensor(chosen, dtype=torch.long), "train_of_pair": _positions(train, ckpts.task.n_pairs),
                "acts": torch.zeros(len(chosen), len(train), d_mlp, dtype=torch.float32)}

    def add(self, state: dict[str, Tensor], ckpts: Checkpoints, block: Block) -> None:
        if not len(state["chosen"]):
            return
        where = state["train_of_pair"][block.span]
        rows = torch.nonzero(where >= 0).squeeze(1)
        post = block.post
        assert post is not None
        state["acts"][:, where[rows]] = post[state["chosen"]][:, rows].float()

    def finish(self, state: dict[str, Tensor], ckpts: Checkpoints) -> Result:
        k = int(ckpts.option(self, "groups"))
        seed = int(ckpts.option(self, "seed"))
        bias_correct = bool(ckpts.option(self, "bias_correct"))
        groups = _reference_groups(ckpts, k)
        members = [torch.nonzero(groups == g).squeeze(1).tolist() for g in range(int(groups.max()) + 1)]
        n = ckpts.n_ckpt
        omega = torch.full((n, 1 << len(members)), float("nan"), dtype=F64)
        for row, i in enumerate(state["chosen"].tolist()):
            z = copula_normalise(state["acts"][row], seed)
            cov = z.T @ z / (z.shape[0] - 1)
            omega[i] = multiplet_o_information(subset_entropies(cov, members, z.shape[0], bias_correct), len(members))
        sizes = torch.tensor([bin(m).count("1") for m in range(1 << len(members))], dtype=F64)
        cols: dict[str, Tensor] = {}
        nan = torch.full((n,), float("nan"), dtype=F64)
        syn, red, syn_size, red_size = nan.clone(), nan.clone(), nan.clone(), nan.clone()
        for i in state["chosen"].tolist():
            row = omega[i]
            ok = ~torch.isnan(row)
            if not bool(ok.any()):
                continue
            lo = torch.where(ok, row, torch.full_like(row, float("inf"))).argmin()
            hi = torch.where(ok, row, torch.full_like(row, float("-inf"))).argmax()
            syn[i], red[i], syn_size[i], red_size[i] = row[lo], row[hi], sizes[lo], sizes[hi]
        cols.update(oinfo_synergy=syn, oinfo_redundancy=red, oinfo_synergy_size=syn_size,
                    oinfo_redundancy_size=red_size)
        return Result(columns=cols, arrays={"oinfo": omega, "oinfo_groups": groups.expand(n, -1).clone()})


def _positions(idx: Tensor, n: int) -> Tensor:
    """``[n]``: each pair's position in ``idx``, -1 when it is not there."""
    out = torch.full((n,), -1, dtype=torch.long)
    out[idx] = torch.arange(len(idx))
    return out


def _reference_groups(ckpts: Checkpoints, k: int) -> Tensor:
    """The Ward groups of the newest checkpoint's training activations, once per analysis."""
    key = ("oinfo_groups", k)
    if key not in ckpts.memo:
        post = post_activations(ckpts.reference, ckpts.task, ckpts.config)
        acts = post[0][ckpts.task.train_idx]
        ckpts.memo[key] = ward_groups(acts, min(k, acts.shape[1]))
    return ckpts.memo[key]
