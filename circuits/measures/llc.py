"""The local learning coefficient (LLC) of a model at its weights, by SGLD (an opt-in lens).

Lau, Furman, Wang, Murfet, Wei 2023, "The local learning coefficient: a singularity-aware
complexity measure" (arXiv 2308.12108): around a local minimum w* of the training loss L_n,

    λ̂(w*) = nβ · (E_w[L_n(w)] − L_n(w*)),

the expectation over the tempered posterior localised at w*,
p(w) ∝ exp(−nβ L_n(w) − γ/2 ‖w − w*‖²), sampled by stochastic-gradient Langevin dynamics (SGLD)
whose chains start at w*. For a regular model λ = d/2 (d its number of parameters); a singular
model (a neural network) has a smaller λ, and the LLC counts the directions the loss actually
depends on near w*. Developmental interpretability (the ``devinterp`` package of Timaeus) reads
changes of the LLC over training as the transitions between phases.

The update is devinterp's: :meth:`devinterp.optim.SGMCMC.sgld` (Lau et al.'s SGLD with the
localisation term γ), given a seeded noise generator. The chain loop around it is ours, because
devinterp 2's ``llc()``/``sample()`` are built for language models: a HuggingFace dataset of
``input_ids`` scored by next-token loss (our answers, noisy labels included, are not tokens of
the input), per-token traces written to a Zarr store on disk (a temporary folder left behind on
every call), tqdm bars printed, the global RNGs reseeded. Here the loss is the task's float64
cross-entropy at the answer position, the trace stays in memory, and nothing global changes.

``devinterp`` is an optional dependency (``pip install -e '.[llc]'``): this module imports
without it, and the functions that sample say how to install it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor, nn

from circuits.errors import MissingExtra
from circuits.measures.registry import ArraySpec, Checkpoints, Column, Family, Result, load_checkpoint, register

__all__ = ["LLCEstimate", "estimate_llc", "calibrate_llc", "answer_cross_entropy", "default_nbeta", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'grokking-circuits[llc]' (from a clone: pip install -e '.[llc]')"

#: A loss per example from a model's outputs and the labels (float64 for a classifier).
LossFn = Callable[[Tensor, Tensor], Tensor]


def _sgld() -> Any:
    """devinterp's SGMCMC optimiser class, or :class:`MissingExtra` (an ImportError) saying how to install it."""
    try:
        from devinterp.optim import SGMCMC
    except ImportError:
        raise MissingExtra(f"the local learning coefficient samples with devinterp's SGLD: {INSTALL_HINT}") from None
    return SGMCMC


def answer_cross_entropy(logits: Float[Tensor, "batch *pos cls"], labels: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """Per-example float64 cross-entropy of the logits at the answer position (the last one of
    ``[batch, pos, cls]`` logits; ``[batch, cls]`` as given): a trained model's loss is ~1e-7,
    which float32's log-softmax cannot resolve (science.md §1.5)."""
    if logits.dim() == 3:
        logits = logits[:, -1]
    return F.cross_entropy(logits.to(torch.float64), labels, reduction="none")


@dataclass(frozen=True)
class LLCEstimate:
    """The result of :func:`estimate_llc`.

    ``per_chain``: λ̂ of each chain, ``nbeta · (mean loss over its draws − init_loss)`` (NaN for
    a chain whose loss went non-finite: it diverged, the step size is too large). ``mean``,
    ``std``: over chains (std with n − 1; NaN with one chain or a diverged one). ``loss_trace``:
    the loss of every step of every chain (burn-in included: the calibration reads it), at the
    weights before that step's update, so step 0 is ``init_loss``'s weights seen through a
    batch. ``init_loss``: L_n(w*) on the whole data set.
    """

    per_chain: Float[Tensor, " chain"]
    loss_trace: Float[Tensor, "chain step"]
    init_loss: float
    nbeta: float
    burn_in: int
    diverged: Bool[Tensor, " chain"]

    @property
    def mean(self) -> float:
        return float(self.per_chain.mean())

    @property
    def std(self) -> float:
        return float(self.per_chain.std()) if len(self.per_chain) > 1 else float("nan")

    @property
    def llc_trace(self) -> Float[Tensor, "chain step"]:
        """``nbeta · (loss − init_loss)`` per step: what each draw adds to the estimate."""
        return self.nbeta * (self.loss_trace - self.init_loss)


def default_nbeta(n: int) -> float:
    """Lau et al.'s inverse temperature nβ = n / log n (β* = 1 / log n, the WBIC temperature)."""
    if n < 2:
        raise ValueError(f"nβ = n / log n needs at least 2 examples, got {n}")
    return n / math.log(n)


def estimate_llc(
    model: nn.Module,
    inputs: Shaped[Tensor, "n *x"],
    labels: Shaped[Tensor, "n *y"],
    *,
    lr: float,
    localization: float,
    nbeta: float | None = None,
    chains: int = 4,
    draws: int = 200,
    burn_in: int = 100,
    batch_size: int | None = None,
    seed: int = 1,
    loss_fn: LossFn | None = None,
) -> LLCEstimate:
    """The local learning coefficient λ̂(w*) of ``model`` at its current weights w* on the data
    set ``(inputs, labels)`` (Lau et al. 2023, "The local learning coefficient: a
    singularity-aware complexity measure"), by SGLD with devinterp's sampler
    (:meth:`devinterp.optim.SGMCMC.sgld`).

    Each of ``chains`` chains starts at w* and takes ``burn_in + draws`` steps of
    w ← w − lr/2 · (nβ ∇L_m(w) + γ (w − w*)) + N(0, lr) over the trainable parameters (those
    with ``requires_grad``), L_m the loss of a minibatch of ``batch_size`` examples (a fresh
    seeded permutation per pass, the partial last batch dropped; None: the whole set every
    step); γ = ``localization``. The estimate of a chain is nβ · (its mean minibatch loss over
    the draws − L_n(w*)). ``nbeta`` default: n / log n (Lau et al.'s β* = 1 / log n). ``loss_fn``
    maps the model's outputs and the labels to a loss per example; default
    :func:`answer_cross_entropy` (float64). ``model`` is not changed (a copy is sampled, in
    eval mode, so dropout is off) and no global RNG is read or reseeded: the same call gives
    the same numbers. Choose ``lr`` and ``localization`` with :func:`calibrate_llc`.
    """
    sgmcmc = _sgld()
    n = inputs.shape[0]
    _check(n=n, n_labels=labels.shape[0], lr=lr, localization=localization, nbeta=nbeta, chains=chains,
           draws=draws, burn_in=burn_in, batch_size=batch_size)
    nbeta = default_nbeta(n) if nbeta is None else float(nbeta)
    loss_fn = answer_cross_entropy if loss_fn is None else loss_fn
    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to sample")
    device = params[0].device
    inputs, labels = inputs.to(device), labels.to(device)
    start = [p.detach().clone() for p in params]
    steps = burn_in + draws
    trace = torch.empty(chains, steps, dtype=torch.float64, device=device)
    # Chain c's seed does not depend on how many chains there are: a call with more chains
    # repeats the first ones.
    chain_seeds = torch.randint(0, 2**62, (chains,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.enable_grad():  # the analysis measures under no_grad
        init_loss = _full_loss(work, inputs, labels, loss_fn)
        for c, chain_seed in enumerate(chain_seeds):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            # The optimiser is made after the reset: its localisation centre is w*.
            opt = sgmcmc.sgld(params, lr=lr, localization=localization, nbeta=nbeta)
            noise = torch.Generator(device=device).manual_seed(chain_seed)
            batches = _batches(n, batch_size, torch.Generator().manual_seed(chain_seed + 1), device)
            for t in range(steps):
                idx = next(batches)
                x, y = (inputs, labels) if idx is None else (inputs[idx], labels[idx])
                loss = loss_fn(work(x), y).mean()
                trace[c, t] = loss.detach()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step(noise_generator=noise)
    trace = trace.cpu()
    diverged = ~torch.isfinite(trace).all(1)
    per_chain = nbeta * (trace[:, burn_in:].mean(1) - init_loss)
    per_chain[diverged] = float("nan")
    if bool(diverged.any()):
        warnings.warn(f"{int(diverged.sum())} of {chains} SGLD chains diverged (non-finite loss) at lr={lr}: "
                      "choose a smaller step size (calibrate_llc)", RuntimeWarning, stacklevel=2)
    return LLCEstimate(per_chain, trace, init_loss, nbeta, burn_in, diverged)


def _check(*, n: int, n_labels: int, lr: float, localization: float, nbeta: float | None, chains: int,
           draws: int, burn_in: int, batch_size: int | None) -> None:
    """A ValueError naming the first bad sampler setting."""
    if n_labels != n:
        raise ValueError(f"{n} inputs but {n_labels} labels")
    if n < 1:
        raise ValueError("the data set is empty")
    for name, value, least in (("chains", chains, 1), ("draws", draws, 1), ("burn_in", burn_in, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (the whole set), got {batch_size!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr (the SGLD step size) must be a positive number, got {lr!r}")
    if not (localization >= 0 and math.isfinite(localization)):
        raise ValueError(f"localization (γ) must be >= 0, got {localization!r}")
    if nbeta is not None and not (nbeta > 0 and math.isfinite(nbeta)):
        raise ValueError(f"nbeta must be a positive number or None (n / log n), got {nbeta!r}")


def _full_loss(model: nn.Module, inputs: Tensor, labels: Tensor, loss_fn: LossFn, chunk: int = 4096) -> float:
    """L_n at the model's weights: the mean loss over the whole data set, float64."""
    with torch.no_grad():
        total = sum(loss_fn(model(inputs[i : i + chunk]), labels[i : i + chunk]).double().sum()
                    for i in range(0, inputs.shape[0], chunk))
    return float(total) / inputs.shape[0]


def _batches(n: int, batch_size: int | None, gen: torch.Generator, device: torch.device) -> Iterator[Tensor | None]:
    """Minibatch indices forever: a fresh permutation per pass, the partial last batch dropped
    (every example is then equally likely in every batch); None for full-batch steps."""
    if batch_size is None or batch_size >= n:
        while True:
            yield None
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size].to(device)


def calibrate_llc(
    model: nn.Module,
    inputs: Shaped[Tensor, "n *x"],
    labels: Shaped[Tensor, "n *y"],
    *,
    lrs: Sequence[float] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
    localizations: Sequence[float] = (10.0, 100.0, 1000.0),
    nbeta: float | None = None,
    chains: int = 2,
    draws: int = 200,
    burn_in: int = 100,
    batch_size: int | None = None,
    seed: int = 1,
    loss_fn: LossFn | None = None,
) -> Any:
    """Sweep the SGLD step size and the localisation for :func:`estimate_llc`, devinterp's
    calibration procedure (Lau et al. 2023; devinterp's sampling guide): one row per
    (``lr``, ``localization``) with the estimate and what its loss traces say. A usable
    setting has no diverged chain, a positive estimate, and a trace that is flat after the
    burn-in; among those, prefer the largest step size (it mixes fastest) whose estimate agrees
    with its smaller neighbours'. Calibrate on the checkpoints that are hardest to sample (the
    newest, sharpest one and one from the memorisation phase), then keep one setting for the
    whole run so its LLC curve compares like with like.

    Returns a pandas DataFrame with columns ``lr``, ``localization``, ``nbeta``, ``llc_mean``,
    ``llc_std``, ``diverged`` (chains), ``burn_in_rise`` (λ units: nβ · (mean loss over the draws
    − mean loss over the burn-in's second half); ≈ 0 when the burn-in was long enough),
    ``drift`` (λ units: nβ · (mean loss over the draws' second half − first half); ≈ 0 when the
    chain has settled), ``flat`` (|drift| ≤ 10% of |llc_mean| + 0.5), ``ok`` (no divergence,
    a positive estimate, flat) and ``trace`` (the chains' λ̂ trace ``nbeta · (loss − init_loss)``
    per step, a numpy array ``[chain, step]``, for plotting).
    """
    import pandas as pd

    rows = []
    for loc in localizations:
        for lr in lrs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a diverged chain is a row here, not a warning
                est = estimate_llc(model, inputs, labels, lr=lr, localization=loc, nbeta=nbeta, chains=chains,
                                   draws=draws, burn_in=burn_in, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
            lam = est.llc_trace
            draws_part = lam[:, burn_in:]
            half = draws_part.shape[1] // 2
            drift = float((draws_part[:, half:].mean() - draws_part[:, :half].mean())) if half else float("nan")
            late_burn = lam[:, burn_in // 2 : burn_in]
            rise = float(draws_part.mean() - late_burn.mean()) if late_burn.shape[1] else float("nan")
            n_div = int(est.diverged.sum())
            flat = bool(abs(drift) <= 0.1 * abs(est.mean) + 0.5) if n_div == 0 else False
            rows.append({
                "lr": lr, "localization": loc, "nbeta": est.nbeta, "llc_mean": est.mean, "llc_std": est.std,
                "diverged": n_div, "burn_in_rise": rise, "drift": drift, "flat": flat,
                "ok": n_div == 0 and est.mean > 0 and flat, "trace": lam.numpy(),
            })
    return pd.DataFrame(rows)


@register
class LocalLearningCoefficient(Family):
    """The LLC of each checkpoint on the run's training pairs (:func:`estimate_llc`), at the
    checkpoints whose position among the run's is a multiple of ``every`` (NaN elsewhere)."""

    name = "llc"
    doc = ("local learning coefficient (Lau et al. 2023) by devinterp's SGLD on the training pairs "
           "(~25 s per quick-run checkpoint on one CPU thread)")
    default = False
    one_layer = False  # it runs the model's own forward, whatever its depth
    options = {
        "every": 1, "chains": 4, "draws": 200, "burn_in": 100, "lr": 1e-4, "localization": 1000.0,
        "nbeta": 0.0, "batch_size": 256, "seed": 1,
    }
    zero_allowed = frozenset({"burn_in", "nbeta", "seed"})
    """``nbeta`` 0 (its default) is n / log n of the run's training set; ``batch_size`` at least
    the training set's size means full-batch steps. See docs/measures.md for the calibration."""
    columns = (
        Column("llc_mean", "local learning coefficient λ̂ at the checkpoint, mean over SGLD chains (NaN: not sampled)"),
        Column("llc_std", "standard deviation of λ̂ over the SGLD chains"),
    )
    arrays = (
        ArraySpec("llc_chains", "float64 [ckpt, chain]: λ̂ of each SGLD chain (NaN where not sampled or diverged)"),
        ArraySpec("llc_loss_trace", "float64 [ckpt, chain, step]: the training loss along each chain, burn-in "
                  "included (NaN where not sampled)"),
    )

    def start(self, ckpts: Checkpoints) -> None:
        _sgld()  # before the grid pass: a missing devinterp stops the analysis before it starts

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        from circuits.model import make_model

        opt = {k: ckpts.option(self, k) for k in self.options}
        every, chains, steps = opt["every"], opt["chains"], opt["burn_in"] + opt["draws"]
        n = ckpts.n_ckpt
        per_chain = torch.full((n, chains), float("nan"), dtype=torch.float64)
        traces = torch.full((n, chains, steps), float("nan"), dtype=torch.float64)
        chosen = [i for i, pos in enumerate(ckpts.positions) if pos % every == 0]
        if chosen:
            model = make_model(ckpts.config)
            x, y = ckpts.task.train_data()
            for i in chosen:
                load_checkpoint(model, ckpts.params, i)
                est = estimate_llc(
                    model, x, y, lr=opt["lr"], localization=opt["localization"], nbeta=opt["nbeta"] or None,
                    chains=chains, draws=opt["draws"], burn_in=opt["burn_in"], batch_size=opt["batch_size"],
                    seed=opt["seed"],
                )
                per_chain[i], traces[i] = est.per_chain, est.loss_trace
        # A chain that diverged makes the checkpoint's mean NaN too: a wrong number is worse.
        mean = per_chain.mean(1)
        std = per_chain.std(1) if chains > 1 else torch.full((n,), float("nan"), dtype=torch.float64)
        return Result(columns={"llc_mean": mean, "llc_std": std},
                      arrays={"llc_chains": per_chain, "llc_loss_trace": traces})
