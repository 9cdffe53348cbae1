"""The built-in measure families of ``circuits analyze`` (registered in column order).

Each reduces row blocks of the (a, b) grid to per-pair values and small sums before the next
block is formed (:mod:`circuits.measures.registry`); whatever needs the whole grid (the mean,
the key-direction coefficients) comes from those sums. Two internal families are accumulators
the others share: ``logit_sums`` (per-pair losses and logit sums) and ``key_directions`` (the
logits' coefficients on the key sum directions). The results equal the public tensor functions
of :mod:`circuits.measures` applied to the whole grid (tested against the hooked model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from circuits.fourier import line_index, sum_directions
from circuits.measures.circuits import circuit_efficiency, circuit_norms_sq
from circuits.measures.frequencies import (
    CLUSTER_THRESHOLD,
    NeuronFrequencySums,
    embed_fourier_norms,
    neuron_clusters,
    neuron_frequency_fractions,
    neuron_logit_fourier_norms,
)
from circuits.measures.losses import accuracy, cross_entropy
from circuits.measures.norms import stacked_weight_norms_sq
from circuits.measures.registry import ArraySpec, Block, Checkpoints, Column, Family, Result, register
from circuits.measures.sparsity import gini

__all__: list[str] = []  # the families are used through the registry

F64 = torch.float64


def _pair_nll(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair of ``x [ckpt, pairs, cls]`` (float64): cross-entropy, correct-class logit, and
    whether that logit is the largest (an amax pass serves the loss and the accuracy; it
    differs from argmax only on exact float ties, which trained logits do not have)."""
    top = x.amax(-1, keepdim=True)
    picked = x.gather(-1, labels.expand(x.shape[0], -1).unsqueeze(-1))
    nll = (x - top).exp_().sum(-1, keepdim=True).log_().add_(top).sub_(picked)
    return nll.squeeze(-1), picked.squeeze(-1), (picked >= top).squeeze(-1)


def _by_split(cols: dict[str, Tensor], name: str, means: Tensor, splits: Any) -> None:
    """``cols[name.format(split)]`` = column j of ``means [ckpt, split]``, NaN for an empty split."""
    for j, (split, idx) in enumerate(splits):
        cols[name.format(split)] = means[:, j] if len(idx) else torch.full_like(means[:, j], float("nan"))


def _split_means(task: Any) -> tuple[tuple[tuple[str, Tensor], ...], Tensor]:
    """The splits and a ``[pp, split]`` matrix whose column j averages over split j."""
    splits = (("train", task.train_idx), ("test", task.test_idx))
    weights = torch.zeros(task.labels.shape[0], len(splits), dtype=F64)
    for j, (_, idx) in enumerate(splits):
        if len(idx):
            weights[idx, j] = 1.0 / len(idx)
    return splits, weights


def _sums_start(n: int, pp: int, cls: int) -> dict[str, Tensor]:
    return {
        "nll": torch.empty(n, pp, dtype=F64), "picked": torch.empty(n, pp, dtype=F64),
        "correct": torch.empty(n, pp, dtype=F64), "rowsum": torch.empty(n, pp, dtype=F64),
        "colsum": torch.zeros(n, cls, dtype=F64), "sumsq": torch.zeros(n, dtype=F64),
        "logits32": torch.empty(n, pp, cls, dtype=torch.float32),
    }


def _sums_add(state: dict[str, Tensor], span: slice | Tensor, logits: Tensor, x: Tensor, labels: Tensor) -> None:
    state["logits32"][:, span] = logits
    state["nll"][:, span], state["picked"][:, span], hit = _pair_nll(x, labels[span])
    state["correct"][:, span] = hit.to(F64)
    state["rowsum"][:, span] = x.sum(-1)
    state["colsum"] += x.sum(1)
    state["sumsq"] += x.pow(2).sum((1, 2))


def _sums_finish(state: dict[str, Tensor], table: Any) -> dict[str, Any]:
    pp = table.labels.shape[0]
    mean = state["colsum"] / pp  # [ckpt, cls]: L_bias
    splits, weights = _split_means(table)
    return {**state, "mean": mean, "centred_sq": state["sumsq"] - pp * mean.pow(2).sum(-1),
            "splits": splits, "split_weights": weights, "labels": table.labels, "valid": table.valid,
            "train_idx": table.train_idx}


@register
class LogitSums(Family):
    """Per-pair cross-entropy, correct-class logit and hit, and the logits' sums over the grid."""

    name = "logit_sums"
    internal = True
    needs = frozenset({"logits"})

    one_layer = False  # a run the grid forward cannot read is fed by its model's own forward

    def start(self, ckpts: Checkpoints) -> dict[str, Tensor]:
        return _sums_start(ckpts.n_ckpt, ckpts.task.n_pairs, ckpts.n_classes)

    def add(self, state: dict[str, Tensor], ckpts: Checkpoints, block: Block) -> None:
        _sums_add(state, block.span, block.logits, block.x64, ckpts.task.labels)

    def finish(self, state: dict[str, Tensor], ckpts: Checkpoints) -> Result:
        return Result(shared=_sums_finish(state, ckpts.task))


@register
class FourierSums(Family):
    """:class:`LogitSums` in the task's Fourier view: for add and sub the same result; for mul
    and div over the pairs with a, b != 0 and the classes 1..p-1 in discrete-log order."""

    name = "fourier_sums"
    internal = True
    needs = frozenset({"logits"})
    uses = ("logit_sums",)
    fourier = True

    def start(self, ckpts: Checkpoints) -> dict[str, Tensor] | None:
        n = ckpts.view.n
        return None if ckpts.view.identity else _sums_start(ckpts.n_ckpt, n * n, n)

    def add(self, state: dict[str, Tensor] | None, ckpts: Checkpoints, block: Block) -> None:
        if state is not None:
            vb = block.fourier
            _sums_add(state, vb.span, vb.logits, vb.x64, ckpts.table.labels)

    def finish(self, state: dict[str, Tensor] | None, ckpts: Checkpoints) -> Result:
        if state is None:
            return ckpts.results["logit_sums"]
        return Result(shared=_sums_finish(state, ckpts.table))


@register
class KeyDirections(Family):
    """Each logit column's coefficients on the key answer directions, and its sums along the
    lines on which the answer is constant (a + b = s for add), in the task's Fourier view."""

    name = "key_directions"
    internal = True
    needs = frozenset({"logits"})
    fourier = True

    def start(self, ckpts: Checkpoints) -> dict[str, Tensor]:
        view = ckpts.view
        dirs = sum_directions(view.n, ckpts.key, F64, view.sign)  # [D, view pairs], orthonormal
        n = ckpts.n_ckpt
        return {
            "dirs": dirs, "plus": line_index(view.n, view.sign),
            "coeffs": torch.zeros(n, len(dirs), view.n, dtype=F64),  # <dir, L column>
            "diag": torch.zeros(n, view.n, view.n, dtype=F64),  # sums of L along each answer line
        }

    def add(self, state: dict[str, Tensor], ckpts: Checkpoints, block: Block) -> None:
        vb = block.fourier
        span, x = vb.span, vb.x64
        state["coeffs"] += torch.matmul(state["dirs"][:, span], x)
        state["diag"].index_add_(1, state["plus"][span], x)

    def finish(self, state: dict[str, Tensor], ckpts: Checkpoints) -> Result:
        # Orthonormal directions: |P_S(L)|^2 = |coeffs|^2.
        return Result(shared={**state, "gen_sq": state["coeffs"].pow(2).sum((1, 2))})


@register
class Losses(Family):
    """Train and test loss and accuracy of the full-grid logits on the run's split."""

    name = "losses"
    doc = "train/test cross-entropy (float64) and accuracy"
    one_layer = False
    columns = (
        Column("train_loss", "mean cross-entropy on the training pairs (float64 log-softmax)", "nats"),
        Column("test_loss", "mean cross-entropy on the test pairs", "nats"),
        Column("train_acc", "fraction of training pairs whose largest logit is the answer", "fraction"),
        Column("test_acc", "fraction of test pairs whose largest logit is the answer", "fraction"),
    )
    uses = ("logit_sums",)

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        s = ckpts.results["logit_sums"].shared
        cols: dict[str, Tensor] = {}
        _by_split(cols, "{}_loss", s["nll"] @ s["split_weights"], s["splits"])
        _by_split(cols, "{}_acc", s["correct"] @ s["split_weights"], s["splits"])
        return Result(columns=cols)


@register
class FourierLosses(Family):
    """Restricted and excluded loss (Nanda et al. 2023, §5.1) and the key directions' share."""

    name = "fourier_losses"
    doc = "restricted and excluded loss and accuracy (the key sum directions kept, or removed)"
    columns = (
        Column("restricted_loss", "loss of the logits kept to the key sum directions plus their mean, "
               "on all valid pairs", "nats"),
        Column("excluded_loss", "loss of the logits with the key sum directions removed, on the "
               "training pairs", "nats"),
        Column("restricted_acc", "accuracy of the restricted logits on all valid pairs", "fraction"),
        Column("excluded_acc", "accuracy of the excluded logits on the training pairs", "fraction"),
    )
    uses = ("fourier_sums", "key_directions")
    fourier = True

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        s, k = ckpts.results["fourier_sums"].shared, ckpts.results["key_directions"].shared
        p, labels, valid = ckpts.view.n, s["labels"], s["valid"]
        mean, coeffs, dirs, nll = s["mean"], k["coeffs"], k["dirs"], s["nll"]
        cols: dict[str, Tensor] = {}
        restricted_nll, restricted_hit = torch.empty_like(nll), torch.empty_like(nll)
        rows = ckpts.block_rows
        for a0 in range(0, p, rows):
            span = slice(a0 * p, min(p, a0 + rows) * p)
            restricted = torch.baddbmm(mean[:, None], dirs[:, span].T.expand(ckpts.n_ckpt, -1, -1), coeffs)
            restricted_nll[:, span], _, hit = _pair_nll(restricted, labels[span])
            restricted_hit[:, span] = hit
        valid_w = valid.to(F64) / valid.sum()
        cols["restricted_loss"] = restricted_nll @ valid_w
        cols["restricted_acc"] = restricted_hit @ valid_w
        train = s["train_idx"]
        excluded = s["logits32"][:, train].to(F64) - torch.matmul(dirs[:, train].T, coeffs)
        cols["excluded_loss"] = cross_entropy(excluded, labels[train])
        cols["excluded_acc"] = accuracy(excluded, labels[train])
        return Result(columns=cols)


@register
class Sparsity(Family):
    """Gini coefficients of the embedding's and the neuron-logit map's Fourier norms."""

    name = "sparsity"
    doc = "Gini sparsity of the Fourier norms of W_E and W_L = W_out W_U (Nanda et al. 2023, §5.1)"
    columns = (
        Column("gini_embed", "Gini coefficient of the embedding's non-constant Fourier norms", "0-1"),
        Column("gini_neuron_logit", "Gini coefficient of W_L's non-constant Fourier norms", "0-1"),
    )
    arrays = (
        ArraySpec("embed_fourier_norms",
                  "float32 [ckpt, p]: ‖(F W_E[:p])_i‖ per Fourier component i (Const, cos 1, sin 1, ...)"),
        ArraySpec("neuron_logit_fourier_norms",
                  "float32 [ckpt, p]: Fourier norms of W_L = W_out W_U along the logit axis"),
    )
    fourier = True

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        params = ckpts.params
        emb = embed_fourier_norms(params["embed.W_E"], ckpts.view)  # [ckpt, n]
        nl = neuron_logit_fourier_norms(params["blocks.0.mlp.W_out"], params["unembed.W_U"], ckpts.view)
        return Result(
            columns={"gini_embed": gini(emb[:, 1:]), "gini_neuron_logit": gini(nl[:, 1:])},
            arrays={"embed_fourier_norms": emb.float(), "neuron_logit_fourier_norms": nl.float()},
        )


@register
class Norms(Family):
    """The sum of squared weights (Nanda et al. 2023, Fig. 7), in total and per parameter."""

    name = "norms"
    doc = "sum of squared weights, total and per parameter"
    one_layer = False
    columns = (Column("weight_norm_sq", "sum of squared weights over every parameter", "weight²"),)
    dynamic_columns = ("norm_sq.", "sum of squared weights of the named parameter")

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        norms = stacked_weight_norms_sq(ckpts.params)
        cols = {f"norm_sq.{name}": sq for name, sq in norms.items()}
        cols["weight_norm_sq"] = torch.stack(list(norms.values())).sum(0)
        return Result(columns=cols)


@register
class KeyShare(Family):
    """The share of the logits' variance in the key sum directions (Nanda et al. 2023, §5.1)."""

    name = "key_share"
    doc = "share of the centred logits in the key sum directions"
    columns = (
        Column("key_logit_frac", "share of the centred logits' squared norm in the key sum directions",
               "fraction"),
    )
    uses = ("fourier_sums", "key_directions")
    fourier = True

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        s, k = ckpts.results["fourier_sums"].shared, ckpts.results["key_directions"].shared
        return Result(columns={"key_logit_frac": k["gen_sq"] / s["centred_sq"].clamp_min(1e-300)})


@register
class Neurons(Family):
    """Each MLP neuron's frequency cluster (Nanda et al. 2023, §4) and key-frequency share."""

    name = "neurons"
    doc = "neuron frequency clusters and the share of their variance in the key frequencies"
    columns = (
        Column("neuron_key_frac", "mean over neurons of their variance's share in the key frequencies",
               "fraction"),
        Column("n_clustered_neurons", f"neurons with >= {CLUSTER_THRESHOLD} of their variance in one "
               "frequency", "neurons"),
    )
    arrays = (
        ArraySpec("neuron_cluster",
                  f"int64 [ckpt, d_mlp]: each neuron's frequency k, or -1 below the {CLUSTER_THRESHOLD} threshold"),
        ArraySpec("neuron_best_frac",
                  "float32 [ckpt, d_mlp]: fraction of the neuron's variance in its best frequency's 3x3 block"),
        ArraySpec("neuron_key_frac",
                  "float32 [ckpt, d_mlp]: fraction of the neuron's variance in the key frequencies' blocks"),
    )
    needs = frozenset({"post"})
    fourier = True

    def start(self, ckpts: Checkpoints) -> NeuronFrequencySums:
        W_in = ckpts.params["blocks.0.mlp.W_in"]
        return NeuronFrequencySums(ckpts.n_ckpt, ckpts.view.n, W_in.shape[-1], W_in.dtype, W_in.device)

    def add(self, state: NeuronFrequencySums, ckpts: Checkpoints, block: Block) -> None:
        vb = block.fourier
        state.add(vb.rows, vb.post)

    def finish(self, state: NeuronFrequencySums, ckpts: Checkpoints) -> Result:
        fractions = state.fractions()
        cluster, best = neuron_clusters(fractions)
        kidx = torch.tensor([k - 1 for k in ckpts.key], dtype=torch.long)
        nkf = fractions[..., kidx].sum(-1) if len(ckpts.key) else torch.zeros_like(best)
        return Result(
            columns={"neuron_key_frac": nkf.double().mean(-1), "n_clustered_neurons": (cluster > 0).sum(-1).double()},
            arrays={"neuron_cluster": cluster.to(torch.int64), "neuron_best_frac": best.float(),
                    "neuron_key_frac": nkf.float()},
            shared={"neuron_key_frac": nkf},
        )


@register
class Circuits(Family):
    """The generalising and memorising circuits of the network (Varma et al. 2023; science.md
    Part C): their shares of the logits, parameter norms, logits, margins and efficiencies."""

    name = "circuits"
    doc = "the generalising / memorising split: logit shares, norms, logits, margins, efficiency"
    columns = (
        Column("gen_share", "‖P_S(L - L_bias)‖ / ‖L - L_bias‖ for the key frequencies S", "fraction"),
        Column("gen_share_all", "the same share over every frequency (the part of L that depends on "
               "a + b only)", "fraction"),
        Column("gen_norm_sq", "squared parameter norm of the generalising part", "weight²"),
        Column("mem_norm_sq", "squared parameter norm of the memorising part", "weight²"),
        Column("shared_norm_sq", "squared norm of the shared machinery (attention, W_pos, other biases)",
               "weight²"),
        Column("gen_logit_train", "mean correct-class logit of L_gen on the training pairs", "logit"),
        Column("mem_logit_train", "mean correct-class logit of L_mem on the training pairs", "logit"),
        Column("gen_logit_test", "mean correct-class logit of L_gen on the test pairs", "logit"),
        Column("mem_logit_test", "mean correct-class logit of L_mem on the test pairs", "logit"),
        Column("gen_margin_train", "mean margin of L_gen on the training pairs (correct minus mean other)",
               "logit"),
        Column("mem_margin_train", "mean margin of L_mem on the training pairs", "logit"),
        Column("gen_margin_test", "mean margin of L_gen on the test pairs", "logit"),
        Column("mem_margin_test", "mean margin of L_mem on the test pairs", "logit"),
        Column("gen_efficiency", "gen_margin_train^(1/4) / sqrt(gen_norm_sq): unchanged when the part's "
               "weights are scaled (the logits are homogeneous of degree 4 in them)", "logit^(1/4)/weight"),
        Column("mem_efficiency", "mem_margin_train^(1/4) / sqrt(mem_norm_sq) (sign kept: -|m|^(1/4) for m < 0)",
               "logit^(1/4)/weight"),
        Column("mem_norm_sq_init", "mem_norm_sq of the epoch-0 weights split with the same key set: what "
               "the memorising part holds by chance (NaN when the run has no epoch 0)", "weight²"),
        Column("mem_norm_sq_excess", "mem_norm_sq - mem_norm_sq_init: the memorising part beyond chance",
               "weight²"),
    )
    uses = ("fourier_sums", "key_directions", "neurons")
    fourier = True

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        s, k = ckpts.results["fourier_sums"].shared, ckpts.results["key_directions"].shared
        p, labels = ckpts.view.n, s["labels"]
        n_cls = p
        mean, coeffs, dirs = s["mean"], k["coeffs"], k["dirs"]
        cols: dict[str, Tensor] = {}
        centred_sq = s["centred_sq"]
        cols["gen_share"] = (k["gen_sq"] / centred_sq.clamp_min(1e-300)).sqrt()
        # Every frequency: the part of L that depends on (a, b) through the answer's position
        # only (a + b for add), i.e. each answer line's mean minus the overall mean
        # (sum_direction_share with freqs=None).
        all_sq = p * (k["diag"] / p - mean[:, None]).pow(2).sum((1, 2))
        cols["gen_share_all"] = (all_sq / centred_sq.clamp_min(1e-300)).sqrt()
        gen_correct = torch.einsum("dq,kdq->kq", dirs, coeffs[:, :, labels])
        gen_rowsum = torch.einsum("dq,kd->kq", dirs, coeffs.sum(-1))
        mem_correct = s["picked"] - mean[:, labels] - gen_correct
        mem_rowsum = s["rowsum"] - mean.sum(-1, keepdim=True) - gen_rowsum
        for name, part_correct, part_rowsum in (("gen", gen_correct, gen_rowsum), ("mem", mem_correct, mem_rowsum)):
            margin = part_correct - (part_rowsum - part_correct) / (n_cls - 1)
            _by_split(cols, name + "_logit_{}", part_correct @ s["split_weights"], s["splits"])
            _by_split(cols, name + "_margin_{}", margin @ s["split_weights"], s["splits"])
        nkf = ckpts.results["neurons"].shared["neuron_key_frac"]
        cols.update(circuit_norms_sq(ckpts.params, ckpts.view, ckpts.key, nkf))
        for name in ("gen", "mem"):
            cols[f"{name}_efficiency"] = circuit_efficiency(cols[f"{name}_margin_train"], cols[f"{name}_norm_sq"])
        init = _init_mem_norm_sq(ckpts)
        cols["mem_norm_sq_init"] = torch.full_like(cols["mem_norm_sq"], init)
        cols["mem_norm_sq_excess"] = cols["mem_norm_sq"] - init
        return Result(columns=cols)


def _init_mem_norm_sq(ckpts: Checkpoints) -> float:
    """The memorising part of the initial weights with the run's key set (science.md Part C: at
    initialisation the non-key remainder already holds about two thirds of the squared norm)."""
    if ckpts.init is None:
        return float("nan")
    memo_key = ("mem_norm_sq_init", tuple(ckpts.key))
    if memo_key not in ckpts.memo:  # a property of the run: one grid forward per analysis
        from circuits.grid import grid_forward

        _, post = grid_forward(ckpts.init, ckpts.task, ckpts.act_fn)
        fractions = neuron_frequency_fractions(post[0], ckpts.view)
        kidx = torch.tensor([k - 1 for k in ckpts.key], dtype=torch.long)
        nkf = fractions[:, kidx].sum(-1)[None] if len(ckpts.key) else torch.zeros(1, fractions.shape[0])
        ckpts.memo[memo_key] = float(circuit_norms_sq(ckpts.init, ckpts.view, ckpts.key, nkf)["mem_norm_sq"][0])
    return ckpts.memo[memo_key]
