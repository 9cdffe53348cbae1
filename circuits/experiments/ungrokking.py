"""Ungrokking and semi-grokking (Varma et al. 2023, §5.2-5.3 and App. A).

* **Ungrokking.** A network that has grokked on a large training set keeps training on random
  subsets of size D' of that set (nothing new is added). Below D_crit the memorising circuit is
  now the more efficient one and the network forgets the general solution: test accuracy
  collapses while train accuracy stays at 1. Above D_crit it stays grokked.
* **Semi-grokking.** Trained from scratch with D close to D_crit, where the two circuits are about
  equally efficient, a network generalises late and only partly: test accuracy rises, long
  after the training set is fit, to a middling plateau.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from circuits.config import RunConfig, preset
from circuits.errors import ProtocolError
from circuits.experiments.efficiency import _check_size, _seeded, _seeds, crossing
from circuits.stats import wilson
from circuits.experiments.members import (
    ExperimentResult,
    interval_by,
    Member,
    check_grid,
    member_table,
    run_members,
    write_result,
)
from circuits.run import Run, load_run
from circuits.trainer import StepInfo

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ungrokking", "semi_grokking", "curve_events", "add_curve_events", "GROKKED_ACC", "FIT_ACC"]

#: Test accuracy that counts as generalised (a grokked parent; the "grokking" zone).
GROKKED_ACC = 0.95
#: Train accuracy that counts as having fit the training set.
FIT_ACC = 0.99


def ungrokking(
    out: str | Path,
    sizes: Sequence[int],
    parent: str | Path | Run | None = None,
    base: RunConfig | None = None,
    parent_frac: float = 0.9,
    epochs: int | None = None,
    seeds: int | Sequence[int] = 3,
    critical_size: float | None = None,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Continue a grokked network on random subsets of its training set (Varma et al. 2023, Fig. 7).

    ``parent``: a grokked run folder; without one, the protocol first trains ``base`` with real
    labels on ``parent_frac`` of the pairs into ``<out>/runs/parent``. Each child starts from the
    parent's last checkpoint (fresh AdamW moments) and trains ``epochs`` more updates (default:
    the base schedule) on ``size`` pairs drawn, per seed, from the parent's training pairs; its
    test set is every other pair. Returns one row per child with its final test and train
    accuracy; the summary's ``threshold`` is the D' where the mean test accuracy crosses 0.5.
    """
    base = base or preset("nanda")
    grid = check_grid("subset size (D')", sizes)
    seed_list = _seeds(seeds)
    out = Path(out)
    parent_run = None if parent is None else (parent if isinstance(parent, Run) else load_run(parent))
    if parent_run is None:
        parent_config = base.replace(random_labels=False, frac=parent_frac)
        pool = parent_config.task.n_train
    else:
        pool = len(parent_run.task.train_idx)
    # Check every size before any training, so a bad grid fails at once.
    for d in grid:
        if not isinstance(d, int) or d < 1:
            raise ProtocolError(f"subset sizes must be positive integers, got {d!r}")
        if d > pool:
            raise ProtocolError(
                f"subset size D'={d} is larger than the parent's training set ({pool} pairs); "
                f"use sizes up to {pool}"
            )
    if parent_run is None:
        parent_run = run_members([Member("parent", parent_config)], out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)[0]
    if not parent_run.epochs:
        raise ProtocolError(f"parent run {parent_run.path} has no checkpoints yet")
    pc = parent_run.config
    last = parent_run.epochs[-1]
    final = parent_run.metrics.iloc[-1]
    # A parent trained on every pair (Varma et al.) has no test set: its train accuracy is all there is.
    parent_acc = final.test_acc if final.test_acc == final.test_acc else final.train_acc
    if not parent_acc >= GROKKED_ACC:
        raise ProtocolError(
            f"the parent {parent_run.path} has test accuracy {parent_acc:.3f} at epoch {last}, "
            f"below {GROKKED_ACC}: it has not grokked; train it longer or on more data"
        )
    if pc.task.pool_size is not None or pc.task.random_labels:
        raise ProtocolError("the parent must be an ordinary real-label run (no pool_size, no random labels)")
    train = base.train if parent is None else pc.train
    n_epochs = train.epochs if epochs is None else epochs
    init = str(parent_run.store.checkpoint_path(last).resolve())
    members = []
    for s in seed_list:
        for d in grid:
            cfg = pc.replace(
                train_size=d, pool_size=pool, subset_seed=s, init_from=init, epochs=n_epochs,
                checkpoint_every=train.checkpoint_every, checkpoint_early_every=train.checkpoint_early_every,
                checkpoint_early_until=train.checkpoint_early_until, log_every=train.log_every,
                preset="ungrok",
            )
            members.append(Member(f"ungrok-d{d}-s{s}", cfg, (("dataset_size", d), ("seed", s))))
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    mean = table.groupby("dataset_size").test_acc.mean()
    summary = {
        "p": pc.task.p,
        "parent": str(parent_run.path),
        "parent_epoch": last,
        "parent_train_size": pool,
        "parent_test_acc": float(parent_acc),
        "epochs": n_epochs,
        "sizes": grid,
        "threshold": crossing(mean.index, mean.values, 0.5),
        "test_acc_by_size": {str(int(k)): float(v) for k, v in mean.items()},
        "test_acc_by_size_ci": interval_by(table, "dataset_size", "test_acc"),
        "min_train_acc": float(table.train_acc.min()),
    }
    from circuits.plots import plot_ungrokking

    result = ExperimentResult(table, plot_ungrokking(table, critical_size), summary)
    return write_result(result, out, "ungrokking")


def curve_events(epochs: ArrayLike, train_acc: ArrayLike, test_acc: ArrayLike,
                 tail: float = 0.2) -> dict[str, float | int | None]:
    """When a run fits its training set, when its test accuracy rises, and where it plateaus.

    ``fit_epoch``: the first logged epoch with train accuracy >= 0.99. ``plateau_test_acc``: the
    median test accuracy over the last ``tail`` of the logged epochs. ``rise_epoch``: the first
    epoch at which test accuracy reaches half-way from its value at ``fit_epoch`` to the plateau
    (None when the plateau is not above that value). ``delay``: rise_epoch / fit_epoch.
    """
    e = np.asarray(epochs, dtype=float)
    tr, te = np.asarray(train_acc, dtype=float), np.asarray(test_acc, dtype=float)
    fit = np.nonzero(tr >= FIT_ACC)[0]
    fit_i = int(fit[0]) if len(fit) else None
    n_tail = max(1, int(math.ceil(tail * len(e))))
    plateau = float(np.median(te[-n_tail:]))
    rise = None
    if fit_i is not None:
        start = te[fit_i]
        if plateau > start + 0.05:
            half = start + 0.5 * (plateau - start)
            above = np.nonzero(te[fit_i:] >= half)[0]
            rise = int(e[fit_i + int(above[0])]) if len(above) else None
    fit_epoch = int(e[fit_i]) if fit_i is not None else None
    return {
        "fit_epoch": fit_epoch,
        "rise_epoch": rise,
        "delay": (rise / max(fit_epoch, 1)) if rise is not None and fit_epoch is not None else None,
        "plateau_test_acc": plateau,
        "final_test_acc": float(te[-1]),
        "final_train_acc": float(tr[-1]),
    }


def add_curve_events(table: pd.DataFrame, runs: Sequence[Run]) -> list[dict[str, float | int | None]]:
    """Add :func:`curve_events` of each run's logged accuracy to ``table`` as float columns
    (None becomes NaN), one row per run in order; returns the events."""
    events = [curve_events(r.metrics.epoch, r.metrics.train_acc, r.metrics.test_acc) for r in runs]
    for key in events[0]:
        table[key] = np.array([np.nan if ev[key] is None else ev[key] for ev in events], dtype=float)
    return events


def semi_grokking(
    out: str | Path,
    sizes: Sequence[int],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] = 3,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Train from scratch near D_crit for a long time and record partial, delayed generalisation.

    One run per (size, seed), real labels, the base schedule (make it long: Varma et al. ran up to
    3x10^7 epochs at p = 113). Each row has :func:`curve_events` of the run's logged accuracy
    (fit epoch, rise epoch, plateau) and ``semi_grokked``: the plateau lies between chance-level
    accuracy (< 0.1) and full generalisation (>= 0.95) and the rise came after the fit. The
    figure overlays the runs' test accuracy curves.
    """
    base = base or preset("nanda")
    grid = check_grid("dataset size", sizes)
    for d in grid:
        _check_size(base, d, "dataset")
    members = [
        Member(f"semi-d{d}-s{s}", _seeded(base, s, random_labels=False, train_size=d), (("dataset_size", d), ("seed", s)))
        for s in _seeds(seeds) for d in grid
    ]
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    events = add_curve_events(table, runs)
    table["semi_grokked"] = [
        bool(0.1 <= ev["plateau_test_acc"] < GROKKED_ACC and ev["rise_epoch"] is not None) for ev in events
    ]
    summary = {
        "p": base.task.p,
        "sizes": grid,
        "epochs": base.train.epochs,
        "semi_grokked_runs": int(table.semi_grokked.sum()),
        "semi_grokked_share_wilson95": list(wilson(int(table.semi_grokked.sum()), len(table))),
        "plateau_by_size_ci": interval_by(table, "dataset_size", "plateau_test_acc"),
        "plateau_by_size": {str(int(k)): float(v) for k, v in table.groupby("dataset_size").plateau_test_acc.mean().items()},
        "rise_epoch_by_size": {
            str(int(k)): (float(v) if v == v else None)
            for k, v in table.groupby("dataset_size").rise_epoch.mean().items()
        },
    }
    from circuits.plots import plot_comparison

    curves = {f"D={m.label_dict()['dataset_size']} s{m.label_dict()['seed']}": r.metrics for m, r in zip(members, runs)}
    fig = plot_comparison(curves, ["test_acc", "train_acc"], "Semi-grokking: accuracy near D_crit", "accuracy",
                          percent=True)
    result = ExperimentResult(table, fig, summary)
    return write_result(result, out, "semi_grokking")
