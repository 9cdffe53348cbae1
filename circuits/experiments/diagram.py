"""Phase diagrams: any grid of config fields x seeds, one row per run, a map per outcome.

The grokking literature draws its phase diagrams over training-set size, model size and
weight decay (Liu et al. 2022, Omnigrok; Huang et al. 2024). :func:`phase_diagram` trains the
full product of a grid of config fields (any field of :class:`~circuits.config.RunConfig`),
several seeds each, as stacked ensembles, and tabulates each run's final measures, its
accuracy events (:func:`~circuits.experiments.ungrokking.curve_events`), the epoch its test
accuracy first reached 0.99 (``grok_epoch``) and its zone (:func:`~circuits.experiments.zones.classify_zone`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


from circuits.config import FIELD_OWNER, RunConfig, preset
from circuits.errors import ProtocolError
from circuits.experiments.efficiency import _seeds
from circuits.experiments.members import RUNS_DIR, ExperimentResult, Member, check_grid, member_table, write_result
from circuits.experiments.sweeps import sweep, sweep_points
from circuits.run import load_run
from circuits.experiments.ungrokking import add_curve_events
from circuits.experiments.zones import classify_zone
from circuits.trainer import StepInfo

__all__ = ["phase_diagram"]


def _grok_epoch(metrics: Any, level: float = 0.99) -> float:
    hit = metrics.epoch[metrics.test_acc >= level]
    return float(hit.iloc[0]) if len(hit) else float("nan")


def phase_diagram(
    out: str | Path,
    grid: Mapping[str, Sequence[Any]],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] = 1,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Train every combination of ``grid`` (config field -> values) x seeds; map the outcomes.

    ``grid`` needs at least two fields; the figures use the first two as x and y (mean, or most
    common zone, over seeds and any further fields). Returns one row per run: the grid values,
    ``seed`` (the replicate; ``replicate`` when the grid sweeps ``seed`` itself), the final measures, ``fit_epoch``, ``rise_epoch``, ``plateau_test_acc``,
    ``grok_epoch`` and ``zone``.
    """
    base = base or preset("nanda")
    if len(grid) < 2:
        raise ProtocolError("a phase diagram needs at least two grid fields (e.g. weight_decay and train_size)")
    axes = [str(a).replace("-", "_") for a in grid]
    for name in axes:
        if name not in FIELD_OWNER:
            raise ProtocolError(f"unknown config field {name!r} in the grid; use a `circuits train` flag name")
    values = {a: check_grid(a, v) for a, v in zip(axes, grid.values())}
    reps = _seeds(seeds)
    # The seeds outermost, as phase diagrams always ordered their rows.
    points = [pt for s in reps for pt in sweep_points(values, base, [s])]
    bad = [pt for pt in points if pt.config is None]
    if bad:  # a protocol refuses a bad grid before it trains anything
        raise ProtocolError(f"grid point {bad[0].values} is not a valid config: {bad[0].error.split(': ', 1)[1]}")
    # The runs train through the sweep machinery (the same stacks, index.csv, resumption).
    swept = sweep(out, values, base=base, seeds=reps, device=device, on_step=on_step, on_group=on_group,
                  executor=executor)
    failed = swept.table[swept.table.status != "done"]
    if len(failed):
        row = failed.iloc[0]
        raise ProtocolError(f"phase diagram member {row['name']} {row['status']}: {row['error']}")
    rep = "replicate" if "seed" in axes else "seed"
    members = [Member(pt.name, pt.config, tuple((k, pt.values[k]) for k in [*axes, rep])) for pt in points]
    runs = [load_run(Path(out) / RUNS_DIR / m.name) for m in members]
    table = member_table(members, runs)
    events = add_curve_events(table, runs)
    table["grok_epoch"] = [_grok_epoch(r.metrics) for r in runs]
    table["zone"] = [classify_zone(ev) for ev in events]
    x, y = axes[0], axes[1]
    summary = {
        "axes": axes,
        "runs": len(table),
        "zone_counts": {str(k): int(v) for k, v in table.zone.value_counts().items()},
        "grokked_runs": int(table.grok_epoch.notna().sum()),
    }
    from circuits.plots import plot_phase_diagram, plot_zone_map

    figures = [plot_zone_map(table, x, y), plot_phase_diagram(table, "test_acc", x, y)]
    if table.grok_epoch.notna().any():
        figures.append(plot_phase_diagram(table.dropna(subset=["grok_epoch"]), "grok_epoch", x, y, log_color=True))
    result = ExperimentResult(table, figures[0], summary)
    result = write_result(result, out, "phase_diagram", extra_figures=figures[1:])
    return result
