"""Sweeps: any grid of config fields x seeds, as ordinary run folders under one sweep folder.

Grokking is a property of regions of hyperparameter space (Power et al. 2022 map the training
fraction, Liu et al. 2022 weight decay x learning rate, Huang et al. 2024 model width x data
size, 11 seeds a cell). :func:`sweep` trains every member of such a grid, in stacks
(:func:`circuits.experiments.executors.plan_stacks`) on a local or a Ray executor, and keeps

* ``<out>/runs/<member>/``: an ordinary run folder per member (``circuits analyze`` and the
  dashboards read it as any run);
* ``<out>/index.csv``: one row per member (its grid values, ``status`` pending / running / done
  / diverged / failed / interrupted, ``error``, and the outcome metrics), rewritten atomically whenever a stack
  starts or finishes, with no timing or host columns, so two executors write the same table;
* ``<out>/spec.json``: what was swept (base config, grid, seeds), so a rerun of the same command
  resumes (finished members are kept, unfinished ones continue from their last checkpoint, failed
  ones are tried again) and a different sweep aimed at the same folder is refused;
* ``<out>/sweep.json``: the headline numbers; the CLI draws the maps into ``<out>/sweep.html``.

A member that fails (a grid point that is not a valid config, a combination the engine refuses,
a diverged loss) is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits.config import FIELD_OWNER, ConfigError, RunConfig, preset
from circuits.errors import ProtocolError
from circuits.experiments.efficiency import _seeded
from circuits.experiments.executors import (
    MemberOutcome,
    StackJob,
    _cores,
    analysis_phases,
    diverged_error,
    make_executor,
    plan_stacks,
    torch_threads,
)
from circuits.experiments.members import (
    MAX_ENSEMBLE,
    RUNS_DIR,
    ExperimentResult,
    final_measures,
)
from circuits.experiments.ungrokking import curve_events
from circuits.experiments.zones import classify_zone
from circuits.measures.phases import liu_phase
from circuits.store import atomic_write_bytes, safe_name_part
from circuits.trainer import with_init_digest

__all__ = ["sweep", "load_sweep", "Sweep", "sweep_points", "SweepProgress", "INDEX_FILE", "SPEC_FILE", "SUMMARY_FILE", "OUTCOME_LEVELS"]

#: The member table of a sweep folder.
INDEX_FILE = "index.csv"
#: What the sweep folder holds (base config, grid, seeds): a rerun must ask for the same.
SPEC_FILE = "spec.json"
#: The sweep's headline numbers (members done, failed, zone counts, ...).
SUMMARY_FILE = "sweep.json"
#: Accuracy levels of the ``epochs_to_{train,test}_{90,95,99}`` outcome columns.
OUTCOME_LEVELS = (0.9, 0.95, 0.99)
_SPEC_FORMAT = 1


@dataclass(frozen=True)
class SweepProgress:
    """The sweep as a whole, after each change: members ``done`` (finished, diverged or failed
    in this call or before), ``running``, ``failed`` (of those done, diverged included), the
    ``total``, and the estimated seconds left (None until a stack has finished in this call)."""

    done: int
    running: int
    failed: int
    total: int
    eta_s: float | None


@dataclass
class _Point:
    name: str
    values: dict[str, Any]
    config: RunConfig | None
    error: str | None = None


def _axis_values(name: str, values: Any) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = [values]
    out: list[Any] = []
    for v in values:
        if v not in out:  # repeats would train one folder twice
            out.append(v)
    if not out:
        raise ProtocolError(f"the {name} grid is empty; give at least one value")
    return out


def sweep_points(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    base: RunConfig,
    seeds: int | Sequence[int] | None = None,
) -> list[_Point]:
    """The sweep's members in order: the product of ``grid``'s axes (a mapping field -> values,
    the last axis fastest) or the listed points (a sequence of mappings), times the replicate
    seeds (``seeds``: a count or offsets; seed s moves the model and data seeds by s, as every
    protocol). A point that is not a valid config is kept, with its error."""
    if isinstance(grid, Mapping):
        axes = {str(k).replace("-", "_"): _axis_values(str(k), v) for k, v in grid.items()}
        points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    else:
        points = [{str(k).replace("-", "_"): v for k, v in p.items()} for p in grid]
        if not points:
            raise ProtocolError("the sweep's list of points is empty")
    for p in points:
        for name in p:
            if name not in FIELD_OWNER:
                raise ProtocolError(f"unknown config field {name!r} in the sweep; use a `circuits train` flag name")
    reps = None if seeds is None else (list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(seeds)))
    if reps is not None and not reps:
        raise ProtocolError("seeds must name at least one replicate")
    rep = "replicate" if any("seed" in p for p in points) else "seed"
    out: list[_Point] = []
    for p in points:
        for s in reps if reps is not None else [None]:
            name = "-".join(f"{a}{safe_name_part(v)}" for a, v in p.items()) or "base"
            values = dict(p)
            if s is not None:
                name += f"-s{s}"
                values[rep] = s
            try:
                config = _seeded(base, s, **p) if s is not None else base.replace(**p)
                out.append(_Point(name, values, config))
            except ConfigError as e:
                out.append(_Point(name, values, None, f"ConfigError: {e}"))
    names = [pt.name for pt in out]
    if len(set(names)) != len(names):
        raise ProtocolError("two sweep points spell the same folder name (values that differ only in "
                            "characters a folder name cannot hold); give distinct values")
    return out


def _spec(base: RunConfig, grid: Any, seeds: Any) -> dict[str, Any]:
    grid_json = ({str(k).replace("-", "_"): list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v]
                  for k, v in grid.items()} if isinstance(grid, Mapping) else [dict(p) for p in grid])
    return {"format": _SPEC_FORMAT, "base": base.science_dict, "grid": grid_json,
            "seeds": list(seeds) if isinstance(seeds, Sequence) else seeds}


def _check_spec(out: Path, spec: dict[str, Any], members: set[str]) -> None:
    path = out / SPEC_FILE
    blob = (json.dumps(spec, indent=2, sort_keys=True, default=str) + "\n").encode()
    if path.is_file():
        try:
            old = json.loads(path.read_bytes())
        except (OSError, ValueError):
            raise ProtocolError(f"{path} is damaged or not a sweep file; move it away or choose another --out") from None
        if old != json.loads(blob):
            raise ProtocolError(f"{out} holds a different sweep (its {SPEC_FILE} names another base config, grid or "
                                "seeds); choose another --out, or rerun the command that made it")
        return
    runs = out / RUNS_DIR
    strangers = sorted(p.name for p in runs.iterdir() if p.name not in members) if runs.is_dir() else []
    if strangers or (out / INDEX_FILE).exists():
        # Run folders of this sweep's members alone (a protocol's folder from before sweeps kept a
        # spec) are taken over: each is checked against its member's config before it is used.
        raise ProtocolError(f"{out} holds runs but no {SPEC_FILE} ({', '.join(strangers[:3]) or INDEX_FILE}): not a "
                            "folder of this sweep; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)


def _outcome_row(run: Any) -> dict[str, Any]:
    """The outcome metrics of a finished (or diverged) member's run (on one torch thread: the
    same bits whichever executor ran the member, and no spinning OpenMP threads beside the
    workers)."""
    m = run.metrics
    row: dict[str, Any] = {"epochs_trained": int(run.epochs[-1])}
    with torch_threads(1):
        final = final_measures(run)
    for key in ("train_loss", "test_loss", "train_acc", "test_acc", "weight_norm"):
        row[key] = final.get(key)
    for split in ("train", "test"):
        for level in OUTCOME_LEVELS:
            hit = run.first_epoch(f"{split}_acc", level)
            row[f"epochs_to_{split}_{round(level * 100)}"] = math.nan if hit is None else float(hit)
    events = curve_events(m.epoch, m.train_acc, m.test_acc)
    row["zone"] = classify_zone(events)
    liu = liu_phase(m.epoch, m.train_acc, m.test_acc, budget=run.config.train.epochs)
    row["liu_phase"] = liu["phase"]
    return row


_PHASE_COLUMNS = ("memorisation_end", "circuit_formation_end", "cleanup_end")


def sweep(
    out: str | Path,
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    max_ensemble: int = MAX_ENSEMBLE,
    analyze: bool = False,
    device: str | None = None,
    on_progress: Callable[[SweepProgress], None] | None = None,
    on_step: Callable[[Any], None] | None = None,
    on_group: Callable[[int, int, int], None] | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Train every member of ``grid`` x ``seeds`` under ``out``; the index as a pandas table.

    ``grid``: config field -> values (their product; ``weight_decay`` or ``weight-decay``), or a
    list of points (field -> value mappings). ``base``: the config every member starts from
    (default the ``quick`` preset). ``seeds``: replicate seeds (a count or offsets; None: the
    base's seeds, or the grid's own ``seed`` axis). ``backend``: ``local`` (this machine;
    ``workers`` processes; default: the stacked ensembles in this process, and members the fused
    engine cannot stack in one worker process per core) or ``ray``
    (``address`` of a cluster, else ``RAY_ADDRESS``, else a local one started for the sweep).
    ``threads``: torch threads per stack (default: the cores divided among the workers; 1 on
    Ray); the same value gives the same bits on either backend. ``analyze``: also analyse each finished
    member (default measures) and record its phase boundaries. ``on_progress`` gets a
    :class:`SweepProgress` after every change; ``on_step`` every update (this process's stacks
    only: the in-process local executor); ``on_group(i, n_stacks, n_members)`` as stack ``i``
    starts. ``executor``: an executor already made
    (:func:`circuits.experiments.executors.make_executor`), in place of ``backend``, ``workers``
    and ``address``; its ``threads`` unless ``threads`` is given.

    Returns an :class:`ExperimentResult` whose table is the index (``<out>/index.csv``) and whose
    figures map the outcome over the first two axes (zone, Liu phase, test accuracy, epochs to 99%
    test accuracy) and draw the epochs to 95% test accuracy against each axis.
    """
    out = Path(out)
    base = base or preset("quick")
    points = sweep_points(grid, base, seeds)
    from circuits.lock import hold_run_folder
    from circuits.run import load_run

    with hold_run_folder(out, "sweeping into"):
        _check_spec(out, _spec(base, grid, seeds), {pt.name for pt in points})
        rows: list[dict[str, Any]] = []
        for pt in points:
            rows.append({"name": pt.name, **pt.values, "status": "pending", "error": None})
        paths = {pt.name: out / RUNS_DIR / pt.name for pt in points}
        todo: list[_Point] = []
        for pt, row in zip(points, rows):
            if pt.config is None:
                row.update(status="failed", error=pt.error)
                continue
            pt.config = with_init_digest(pt.config)
            run = _existing_run(paths[pt.name], pt.config)
            mark = None if run is None else run.store.diverged()
            if mark is not None:
                row.update(status="diverged", error=f"{diverged_error(mark)} in an earlier call; move its folder away "
                           "to train it again", **_outcome_row(run))
            elif run is not None and run.is_complete:
                row.update(status="done", **_outcome_row(run))
                if analyze:  # finished in an earlier call: its analysis is reused where it exists
                    phases = analysis_phases(run)
                    row.update({k: phases.get(k) for k in _PHASE_COLUMNS})
            else:
                todo.append(pt)
        stacks = plan_stacks([pt.config for pt in todo], max_ensemble)
        # Default: stacked ensembles in this process on every core (measured faster than worker
        # processes for them, docs/benchmarks.md); members that cannot stack (the reference
        # engine) in worker processes, one per core.
        alone = sum(todo[idx[0]].config.train.engine != "fused" for idx in stacks)
        n_workers = workers if workers is not None else (min(alone, _cores()) if alone >= 2 else 1)
        if executor is not None:
            n_threads, ray_cores = (threads if threads is not None else executor.threads), None
        elif backend == "ray":
            # Many one-CPU tasks spread over a cluster's nodes; a local Ray gets this machine's cores.
            n_threads, ray_cores = (threads if threads is not None else 1), _cores()
        else:
            n_threads = threads if threads is not None else max(1, _cores() // n_workers)
            ray_cores = None
            busy = min(n_workers, len(stacks)) * n_threads
            if busy > _cores() and len(stacks) > 1:  # oversubscribed torch threads slow every run 5x or more
                raise ProtocolError(f"{min(n_workers, len(stacks))} workers x {n_threads} threads would run {busy} "
                                    f"torch threads on {_cores()} cores; lower --workers or --threads")
        jobs = [StackJob(tuple(todo[i].config for i in idx), tuple(str(paths[todo[i].name]) for i in idx),
                         n_threads, device, analyze) for idx in stacks]
        by_name = {row["name"]: row for row in rows}
        index_path = out / INDEX_FILE
        started = time.monotonic()
        finished_members = 0
        running: set[int] = set()

        def write_index() -> None:
            atomic_write_bytes(index_path, _index_frame(rows).to_csv(index=False).encode())

        def report() -> None:
            if on_progress is None:
                return
            done = sum(r["status"] in ("done", "failed", "diverged") for r in rows)
            failed = sum(r["status"] in ("failed", "diverged") for r in rows)
            n_running = sum(len(jobs[i].paths) for i in running)
            eta = None
            if finished_members:
                left = len(rows) - done
                eta = (time.monotonic() - started) / finished_members * left
            on_progress(SweepProgress(done, n_running, failed, len(rows), eta))

        def on_start(i: int) -> None:
            if on_group is not None:
                on_group(i, len(jobs), len(jobs[i].paths))
            running.add(i)
            for p in jobs[i].paths:
                by_name[Path(p).name]["status"] = "running"
            write_index()
            report()

        def on_done(i: int, outcomes: list[MemberOutcome]) -> None:
            nonlocal finished_members
            running.discard(i)
            for o in outcomes:
                row = by_name[Path(o.path).name]
                row.update(status=o.status, error=o.error)
                if o.status in ("done", "diverged"):
                    try:
                        row.update(_outcome_row(load_run(o.path)))
                    except Exception as e:  # noqa: BLE001 - a member whose folder cannot be read back
                        row.update(status="failed", error=f"{type(e).__name__}: {e}")
                if analyze and o.status == "done":
                    for key in _PHASE_COLUMNS:
                        row[key] = o.phases.get(key)
                finished_members += 1
            write_index()
            report()

        write_index()
        report()
        if executor is None:
            executor = make_executor(backend, workers=n_workers, address=address, cores=ray_cores)
        backend = executor.name
        try:
            executor.run(jobs, on_done, on_start=on_start, on_step=on_step)
        except KeyboardInterrupt:
            # The members in flight saved their state (a Ctrl-C stops a run that way): the index
            # says so, and a rerun resumes them.
            for row in rows:
                if row["status"] == "running":
                    row.update(status="interrupted", error="interrupted; rerun to resume")
            write_index()
            raise
        table = _index_frame(rows)
        write_index()
        if (table.status == "interrupted").any():
            # Ctrl-C stopped workers (their state is saved): the sweep stops as this process would.
            raise KeyboardInterrupt(f"sweep interrupted; rerun the same call to resume ({out / INDEX_FILE})")
    axes = list(dict.fromkeys(k for pt in points for k in pt.values))
    summary = {
        "members": len(rows),
        "done": int((table.status == "done").sum()),
        "failed": int((table.status == "failed").sum()),
        "diverged": int((table.status == "diverged").sum()),
        "axes": axes,
        "backend": backend,
        "stacks": len(stacks),
    }
    if "zone" in table:
        summary["zone_counts"] = {str(k): int(v) for k, v in table.zone.dropna().value_counts().items()}
    if "liu_phase" in table:
        summary["liu_phase_counts"] = {str(k): int(v) for k, v in table.liu_phase.dropna().value_counts().items()}
    summary["epochs_to_test_95_by_axis"] = _time_by_axis(table, axes)
    figures = _figures(table, axes)
    # The index is the table (written above); the summary goes beside it.
    atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    return ExperimentResult(table, figures[0], summary, path=out, name="sweep", extra_figures=tuple(figures[1:]))


@dataclass
class Sweep:
    """A sweep folder read back (:func:`load_sweep`): its index as a pandas table, what was swept,
    its summary, and its members' runs."""

    path: Path
    table: Any
    spec: dict[str, Any]
    summary: dict[str, Any]

    def run(self, name: str) -> Any:
        """The member ``name``'s run (:func:`circuits.load_run`)."""
        from circuits.run import load_run

        if name not in set(self.table["name"]):
            raise KeyError(f"no member {name!r} in {self.path}; its members are in the table's name column")
        return load_run(self.path / RUNS_DIR / name)

    def runs(self, status: str = "done") -> dict[str, Any]:
        """Every member with that ``status`` (``done``, ``diverged``, ...) as name -> run."""
        return {n: self.run(n) for n in self.table.loc[self.table.status == status, "name"]}

    @property
    def axes(self) -> list[str]:
        """The swept fields in the grid's order, then the replicate column if any."""
        # The summary keeps the grid's order (the spec's JSON sorts its keys); a sweep stopped
        # before its summary was written falls back on the spec.
        return self.summary.get("axes") or _axes_of(self.spec)

    def figures(self) -> list[Any]:
        """The maps and curves of the sweep page, drawn from the index."""
        return _figures(self.table, self.axes)


def _axes_of(spec: dict[str, Any]) -> list[str]:
    grid = spec.get("grid")
    axes = list(grid) if isinstance(grid, dict) else list(dict.fromkeys(k for p in grid or [] for k in p))
    if spec.get("seeds") is not None:
        axes.append("replicate" if "seed" in axes else "seed")
    return axes


def load_sweep(path: str | Path) -> Sweep:
    """A sweep folder written by :func:`sweep` (or ``circuits sweep``), for a notebook: the index
    (one row per member), the spec, the summary and the members' runs. A folder without a sweep's
    files is named in the error."""
    import pandas as pd

    path = Path(path)
    missing = [f for f in (SPEC_FILE, INDEX_FILE) if not (path / f).is_file()]
    if missing:
        raise ProtocolError(f"{path} is not a sweep folder (no {' or '.join(missing)}); give the --out of a sweep")
    try:
        spec = json.loads((path / SPEC_FILE).read_text())
        summary = json.loads((path / SUMMARY_FILE).read_text()) if (path / SUMMARY_FILE).is_file() else {}
        table = pd.read_csv(path / INDEX_FILE)
    except (OSError, ValueError) as e:
        raise ProtocolError(f"{path}: a sweep file is damaged ({e}); rerun the sweep's command to rewrite it") from None
    return Sweep(path, table, spec, summary)


def _time_by_axis(table: Any, axes: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per grid axis and value: the finished members, how many reached 95% test accuracy, and the
    mean epoch they did with its Student-t 95% interval (the curves' numbers)."""
    from circuits.stats import interval

    out: dict[str, dict[str, dict[str, Any]]] = {}
    if "epochs_to_test_95" not in table:
        return out
    done = table[table.status == "done"]
    for a in axes:
        per: dict[str, dict[str, Any]] = {}
        for value, part in done.groupby(a, sort=True):
            hits = [float(v) for v in part.epochs_to_test_95 if v == v]
            per[f"{value:g}" if isinstance(value, float) else str(value)] = {
                "members": int(len(part)), "reached": len(hits), **interval(hits)}
        out[a] = per
    return out


def _existing_run(path: Path, config: RunConfig) -> Any:
    """The run already in a member's folder (None when there is none yet); a run of another
    config there is refused."""
    from circuits.run import load_run
    from circuits.store import CONFIG_FILE

    if not (path / CONFIG_FILE).is_file():
        return None
    run = load_run(path)
    if run.store.diverged() is None and run.config.science_dict != config.science_dict:
        raise ProtocolError(f"{path} holds a run of another config; move it away or choose another --out")
    return run


def _index_frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if "epochs_trained" in frame:  # whole epochs, blank where a member has none (not 40.0)
        frame["epochs_trained"] = frame["epochs_trained"].astype("Int64")
    return frame


def _figures(table: Any, axes: list[str]) -> list[Any]:
    from circuits.plots import plot_phase_diagram, plot_sweep_curve, plot_zone_map

    done = table[table.status.isin(["done", "diverged"])] if "status" in table else table
    figures = []
    grid_axes = [a for a in axes if a not in ("seed", "replicate")] or axes
    if len(grid_axes) >= 2 and len(done) and "zone" in done:
        x, y = grid_axes[0], grid_axes[1]
        figures.append(plot_zone_map(done, x, y))
        figures.append(plot_zone_map(done, x, y, zone="liu_phase", title="Liu et al.'s phase"))
        figures.append(plot_phase_diagram(done, "test_acc", x, y))
        if done.epochs_to_test_99.notna().any():
            # Every cell of the grid, blank where no run reached 99%: the mean over those that did.
            figures.append(plot_phase_diagram(done, "epochs_to_test_99", x, y, log_color=True,
                                              title="Epochs to 99% test accuracy (mean over the runs that got there)"))
    if len(done) and "epochs_to_test_95" in done:
        for a in grid_axes:
            figures.append(plot_sweep_curve(done, a, "epochs_to_test_95"))
    if not figures:
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.update_layout(title="Sweep: no finished member yet")
        figures.append(fig)
    return figures
