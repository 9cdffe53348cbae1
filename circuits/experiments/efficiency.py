"""Reference circuits and the critical dataset size D_crit (Varma et al. 2023, §4 and App. B).

Varma et al. explain grokking by efficiency: the generalising circuit C_gen needs the same
parameter norm whatever the training-set size D, while the memorising circuit C_mem needs more
norm the more pairs it must memorise. They measure each circuit in a network that has only it:

* a **memorisation-only** network trains on random labels (nothing to generalise), so its whole
  converged norm is memorisation;
* a **generalisation-only** network trains on real labels and counts only when more than 95% of
  its logit norm lies in the a+b Fourier subspace (App. B's criterion).

Under weight decay each network settles where the loss gradient balances the decay, so its norm
at convergence is the norm its circuit needs. D_crit is the size where the memorisation-only
norm, rising with D, crosses the generalisation-only norm, which stays flat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from circuits.config import RunConfig, preset
from circuits.errors import ProtocolError
from circuits.measures.phases import crossing
from circuits.tasks import fourier_view, task_class
from circuits.stats import mean_ci
from circuits.experiments.members import (
    ExperimentResult,
    interval_by,
    Member,
    check_grid,
    member_table,
    run_members,
    write_result,
)
from circuits.trainer import StepInfo

__all__ = ["reference_circuits", "critical_dataset_size", "crossing", "GEN_ONLY_SHARE"]

#: Varma et al.'s criterion for a generalisation-only network: > 95% of the logit norm is trig.
GEN_ONLY_SHARE = 0.95


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    values = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    return check_grid("seeds", values)


def _check_size(config: RunConfig, size: int, what: str) -> None:
    if not isinstance(size, int) or size < 1:
        raise ProtocolError(f"{what} sizes must be positive integers, got {size!r}")
    if size > config.task.n_pairs:
        raise ProtocolError(
            f"{what} size {size} exceeds the {config.task.n_pairs} pairs at p={config.task.p}; "
            "use smaller sizes or a larger p"
        )


def _seeded(base: RunConfig, offset: int, /, **overrides: Any) -> RunConfig:
    # Seed s moves the init and the split (and the random labels, which the data seed draws).
    fields: dict[str, Any] = {"seed": base.model.seed + offset, "data_seed": base.task.data_seed + offset}
    fields.update(overrides)  # a grid over seed or data_seed sets them itself
    return base.replace(**fields)


def reference_circuits(
    out: str | Path,
    base: RunConfig | None = None,
    mem_size: int | None = None,
    gen_frac: float = 0.9,
    seeds: int | Sequence[int] = 2,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Train the two reference networks of Varma et al. (2023, App. B) and split each one.

    Memorisation only: random labels (the same for (a, b) and (b, a)) on ``mem_size`` pairs
    (default: the base config's training-set size). Generalisation only: real labels on a
    fraction ``gen_frac`` of all pairs. Returns one row per network with its final measures
    (:func:`~circuits.experiments.members.final_measures`): the within-run separation must give a
    generalising share near chance (1/sqrt(p+1)) on the first and above 0.95 on the second.
    """
    base = base or preset("nanda")
    mem_size = base.task.n_train if mem_size is None else mem_size
    _check_size(base, mem_size, "memorisation")
    if not 0.0 < gen_frac <= 1.0:
        raise ProtocolError(f"gen_frac must lie in (0, 1], got {gen_frac}")
    view = fourier_view(base.task)
    if view is None:
        raise ProtocolError(f"the reference circuits compare Fourier shares: {task_class(base.task).no_view_reason(base.task)}")
    members = []
    for s in _seeds(seeds):
        members.append(Member(f"mem-s{s}", _seeded(base, s, random_labels=True, train_size=mem_size),
                               (("kind", "mem"), ("seed", s), ("dataset_size", mem_size))))
        gen = _seeded(base, s, random_labels=False, frac=gen_frac)
        members.append(Member(f"gen-s{s}", gen, (("kind", "gen"), ("seed", s), ("dataset_size", gen.task.n_train))))
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    # Logits with no structure put 1/sqrt(n + 1) of their norm in the all-frequency span of
    # the task's view (n = p for add and sub, p - 1 for mul and div) by chance.
    chance = 1.0 / math.sqrt(view.n + 1)
    mem, gen = table[table.kind == "mem"], table[table.kind == "gen"]
    summary = {
        "p": base.task.p,
        "chance_share": chance,
        "mem_gen_share_all": float(mem.gen_share_all.mean()),
        "intervals": {col: interval_by(table, "kind", col) for col in ("gen_share", "gen_share_all", "efficiency",
                                                                       "weight_norm", "train_acc", "test_acc")},
        "gen_gen_share": float(gen.gen_share.mean()),
        "gen_gen_share_all": float(gen.gen_share_all.mean()),
        "mem_train_acc": float(mem.train_acc.mean()),
        "gen_test_acc": float(gen.test_acc.mean()),
        "gen_only_criterion_met": bool((gen.gen_share > GEN_ONLY_SHARE).all()),
    }
    from circuits.plots import plot_reference_circuits

    result = ExperimentResult(table, plot_reference_circuits(table, chance), summary)
    return write_result(result, out, "reference")


def critical_dataset_size(
    out: str | Path,
    sizes: Sequence[int],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] = 3,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """D_crit: where the memorising circuit's converged norm overtakes the generalising one's.

    For each training-set size D in ``sizes`` and each seed, two networks train to the base
    config's last epoch under its weight decay: one on random labels (memorisation only) and
    one on real labels (a generalisation-only candidate, kept when its key-frequency share of
    the logit norm exceeds 0.95, Varma et al.'s criterion; below D_crit it memorises instead and
    is flagged ``gen_only = False``). Per seed, D_crit is the D where the memorisation norm,
    interpolated in log D, crosses the mean norm of that seed's generalisation-only networks;
    the summary gives the mean and spread over seeds, and the same crossing of efficiencies
    (the scale-free efficiency of :func:`circuits.measures.circuit_efficiency`) as a
    cross-check. The table has one row per network.
    """
    base = base or preset("nanda")
    grid = check_grid("dataset size", sizes)
    for d in grid:
        _check_size(base, d, "dataset")
    members = []
    for s in _seeds(seeds):
        for d in grid:
            members.append(Member(f"mem-d{d}-s{s}", _seeded(base, s, random_labels=True, train_size=d),
                                  (("circuit", "mem"), ("dataset_size", d), ("seed", s))))
            members.append(Member(f"gen-d{d}-s{s}", _seeded(base, s, random_labels=False, train_size=d),
                                  (("circuit", "gen"), ("dataset_size", d), ("seed", s))))
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    gen_ok = (table.circuit == "gen") & (table.gen_share > GEN_ONLY_SHARE)
    table["gen_only"] = np.where(table.circuit == "gen", gen_ok, False)
    per_seed: dict[int, dict[str, float | None]] = {}
    for s, part in table.groupby("seed"):
        mem = part[part.circuit == "mem"].sort_values("dataset_size")
        gen = part[(part.circuit == "gen") & part.gen_only]
        if not len(gen):
            per_seed[int(s)] = {"d_crit": None, "d_crit_efficiency": None, "gen_norm": None}
            continue
        per_seed[int(s)] = {
            "d_crit": crossing(mem.dataset_size, mem.weight_norm, float(gen.weight_norm.mean())),
            "d_crit_efficiency": crossing(mem.dataset_size, mem.efficiency, float(gen.efficiency.mean())),
            "gen_norm": float(gen.weight_norm.mean()),
        }
    found = [v["d_crit"] for v in per_seed.values() if v["d_crit"] is not None]
    mem_means = table[table.circuit == "mem"].groupby("dataset_size").weight_norm.mean()
    d_mean, d_half, _ = mean_ci(found)
    summary = {
        "p": base.task.p,
        "sizes": grid,
        "d_crit_mean": float(np.mean(found)) if found else None,
        "d_crit_std": float(np.std(found)) if len(found) > 1 else None,
        "d_crit_ci95": d_half if len(found) > 1 else None,
        "d_crit_reached": f"{len(found)} of {len(per_seed)} seeds",
        "mem_norm_by_size_ci": interval_by(table[table.circuit == "mem"], "dataset_size", "weight_norm"),
        "gen_norm_by_size_ci": interval_by(table[table.gen_only], "dataset_size", "weight_norm"),
        "d_crit_per_seed": {str(k): v["d_crit"] for k, v in per_seed.items()},
        "d_crit_efficiency_per_seed": {str(k): v["d_crit_efficiency"] for k, v in per_seed.items()},
        "gen_norm_per_seed": {str(k): v["gen_norm"] for k, v in per_seed.items()},
        "mem_norm_by_size": {str(int(k)): float(v) for k, v in mem_means.items()},
        "mem_norm_increases": bool(np.all(np.diff(mem_means.to_numpy()) > 0)),
        "gen_only_runs": int(gen_ok.sum()),
    }
    from circuits.plots import plot_efficiency_vs_dataset_size

    shown = table[(table.circuit == "mem") | table.gen_only]
    result = ExperimentResult(table, plot_efficiency_vs_dataset_size(shown, value="weight_norm"), summary)
    return write_result(result, out, "critical_dataset_size")
