"""Memorisation capacity and the four zones of Huang et al. (2024, §3 and Fig. 4).

Huang et al. place every (model size, training-set size) setting in one of four zones, set by
two sizes that depend on the model: its memorisation capacity D_mem (how many random-label
pairs it can fit) and its critical dataset size D_crit:

* **progression**: D > D_mem, the data cannot all be memorised, so train and test accuracy
  rise together;
* **ungrokking**: D < D_crit (and < D_mem): memorisation only, test accuracy stays near chance;
* **grokking**: D_crit < D <= D_mem: the training set is fit first, test accuracy reaches 1
  much later;
* **semi-grokking**: D near D_crit: test accuracy rises late to a middling plateau.

:func:`classify_zone` writes that down as a rule on a run's accuracy curves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from circuits.config import RunConfig, preset
from circuits.errors import ProtocolError
from circuits.experiments.efficiency import _check_size, _seeded, _seeds
from circuits.experiments.members import (
    ExperimentResult,
    interval_by,
    Member,
    check_grid,
    member_table,
    run_members,
    write_result,
)
from circuits.experiments.ungrokking import GROKKED_ACC, add_curve_events
from circuits.measures.norms import weight_norm_sq
from circuits.measures.phases import liu_phase
from circuits.run import Run
from circuits.trainer import StepInfo

__all__ = ["memorisation_capacity", "zones", "classify_zone", "width_config", "GROKKING_DELAY", "CHANCE_ACC",
           "ZONE_RULE"]

#: A run groks (rather than progresses) when its test accuracy rises at least this many times
#: later than it fits the training set.
GROKKING_DELAY = 2.0
#: Plateau test accuracy below which a run has not generalised at all.
CHANCE_ACC = 0.1
#: The zone rule in one line (written into the protocol's summary).
ZONE_RULE = (
    "plateau test acc >= 0.95: grokking if it rose >= 2x later than train acc reached 0.99, "
    "else progression when D exceeds the width's measured capacity D_mem (or it is unknown) "
    "and comprehension when it does not; plateau in [0.1, 0.95): semi-grokking if train acc reached 0.99, else "
    "progression; below 0.1: ungrokking if train acc reached 0.99, else confusion (plateau = "
    "median test acc over the last 20% of logged epochs)"
)


def classify_zone(
    events: dict[str, float | int | None], dataset_size: int | None = None, capacity: float | None = None
) -> str:
    """Huang et al.'s zone of one run from :func:`~circuits.experiments.ungrokking.curve_events`.

    The rule, in order: plateau test accuracy >= 0.95 is **grokking** when the test accuracy rose
    at least ``GROKKING_DELAY`` (2) times later than the training set was fit; otherwise the run
    generalised fast, which is Huang et al.'s **progression** only when the data exceed what the
    width can memorise (``dataset_size`` > ``capacity``, the width's measured D_mem from
    :func:`memorisation_capacity`) and Liu et al.'s **comprehension** when they do not; with the
    capacity unknown it stays **progression** (the two are then not told apart). A plateau in
    [0.1, 0.95) is **semi-grokking** when the training set was fit (train accuracy >= 0.99 at
    some epoch), else **progression** (capacity-bound: train and test rise together); below 0.1
    a run that fit its training set is **ungrokking** (memorisation only) and one that did not
    is **confusion** (neither fits nor generalises).
    """
    plateau = float(events["plateau_test_acc"])  # type: ignore[arg-type]
    if plateau >= GROKKED_ACC:
        delay = events.get("delay")
        fit = events.get("fit_epoch")
        if fit is not None and delay is not None and delay >= GROKKING_DELAY:
            return "grokking"
        if capacity is not None and dataset_size is not None and dataset_size <= capacity:
            return "comprehension"
        return "progression"
    fit = events.get("fit_epoch")
    fitted = fit is not None and fit == fit
    if plateau >= CHANCE_ACC:
        # A partial plateau after the training set was fit is semi-grokking; without a fit the
        # model is capacity-bound and learns train and test together: progression.
        return "semi-grokking" if fitted else "progression"
    return "ungrokking" if fitted else "confusion"


def width_config(base: RunConfig, width: int) -> RunConfig:
    """``base`` at residual width ``width``, the MLP scaled with it (d_mlp / d_model kept)."""
    if not isinstance(width, int) or width < 1:
        raise ProtocolError(f"widths must be positive integers, got {width!r}")
    if width % base.model.n_heads:
        raise ProtocolError(
            f"width {width} is not divisible by n_heads={base.model.n_heads}; use multiples of it"
        )
    ratio = base.model.d_mlp / base.model.d_model
    return base.replace(d_model=width, d_mlp=max(1, round(width * ratio)))


def memorisation_capacity(
    out: str | Path,
    widths: Sequence[int],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] = 3,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Capacity D_mem per width: train accuracy x pairs on the fully random-labelled table.

    Huang et al. (2024, Fig. 4): every pair of the table, labels drawn uniformly with (a, b) and
    (b, a) sharing one; a model of each width trains the base schedule; capacity = final train
    accuracy x the number of pairs.
    """
    base = base or preset("nanda")
    members = [
        Member(f"cap-w{w}-s{s}", _seeded(width_config(base, w), s, random_labels=True, frac=1.0),
               (("d_model", w), ("seed", s)))
        for s in _seeds(seeds) for w in check_grid("width", widths)
    ]
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    table["capacity"] = table.train_acc * base.task.n_pairs
    means = table.groupby("d_model").capacity.mean()
    summary = {
        "p": base.task.p,
        "pairs": base.task.n_pairs,
        "capacity_by_width": {str(int(k)): float(v) for k, v in means.items()},
        "capacity_by_width_ci": interval_by(table, "d_model", "capacity"),
        "capacity_increases": bool(np.all(np.diff(means.to_numpy()) >= 0)),
    }
    from circuits.plots import plot_capacity

    result = ExperimentResult(table, plot_capacity(table), summary)
    return write_result(result, out, "capacity")


def _norm_change(run: Run, fit_epoch: float | None) -> float | None:
    # Huang et al. App. A: the norm falls while a run groks and grows while it progresses.
    if fit_epoch is None or fit_epoch != fit_epoch:
        return None
    start = run.nearest_epoch(int(fit_epoch))
    end = run.epochs[-1]
    if end == start:
        return None
    return (weight_norm_sq(run.state_dict(end)) / weight_norm_sq(run.state_dict(start))) ** 0.5 - 1.0


def zones(
    out: str | Path,
    widths: Sequence[int],
    sizes: Sequence[int],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] = 2,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    capacity: Mapping[int, float] | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Classify every (width, training-set size) run into Huang et al.'s zones and map them.

    One real-label run per (width, size, seed) on the base schedule. Each row has the run's
    :func:`~circuits.experiments.ungrokking.curve_events`, ``norm_change`` (relative change of
    the parameter norm from the fit epoch to the end: negative while grokking, Huang et al.
    App. A), ``capacity`` (the width's D_mem when ``capacity`` gives it: width -> pairs, e.g.
    :func:`memorisation_capacity`'s ``summary["capacity_by_width"]``), ``zone`` by
    :func:`classify_zone`, and Liu et al.'s phase (:func:`circuits.measures.phases.liu_phase`,
    the paper's thresholds with the base schedule's epochs as the budget) in ``liu_phase``
    with ``liu_truncated``. The figure is the zone map (the most common zone over seeds per
    cell).
    """
    base = base or preset("nanda")
    size_grid = check_grid("dataset size", sizes)
    for d in size_grid:
        _check_size(base, d, "dataset")
    members = [
        Member(f"zone-w{w}-d{d}-s{s}", _seeded(width_config(base, w), s, random_labels=False, train_size=d),
               (("d_model", w), ("dataset_size", d), ("seed", s)))
        for s in _seeds(seeds) for w in check_grid("width", widths) for d in size_grid
    ]
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    events = add_curve_events(table, runs)
    table["norm_change"] = [_norm_change(r, ev["fit_epoch"]) for r, ev in zip(runs, events)]
    caps = {int(k): float(v) for k, v in (capacity or {}).items()}
    table["capacity"] = [caps.get(int(w), np.nan) for w in table.d_model]
    table["zone"] = [
        classify_zone(ev, int(d), caps.get(int(w))) for ev, d, w in zip(events, table.dataset_size, table.d_model)
    ]
    liu = [liu_phase(r.metrics.epoch, r.metrics.train_acc, r.metrics.test_acc, budget=base.train.epochs) for r in runs]
    table["liu_phase"] = [x["phase"] for x in liu]
    table["liu_truncated"] = [x["truncated"] for x in liu]
    summary = {
        "p": base.task.p,
        "widths": sorted(set(table.d_model.tolist())),
        "sizes": size_grid,
        "zone_counts": {str(k): int(v) for k, v in table.zone.value_counts().items()},
        "liu_phase_counts": {str(k): int(v) for k, v in table.liu_phase.value_counts().items()},
        "capacity_by_width": {str(k): v for k, v in sorted(caps.items())},
        "rule": ZONE_RULE,
    }
    from circuits.plots import plot_zone_map

    result = ExperimentResult(table, plot_zone_map(table, "dataset_size", "d_model"), summary)
    return write_result(result, out, "zones")
