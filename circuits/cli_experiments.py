"""``circuits experiment PROTOCOL``: thin wrappers over :mod:`circuits.experiments`.

Each command takes the protocol's grid (``--sizes 100,200,400``), ``--seeds N`` and a base
config exactly as ``circuits train`` does (``--preset``, ``--config`` and every config field as
a flag), trains under ``--out`` (default ``checkpoints/<protocol>-<hash>``, so the same command
finds and resumes the same experiment), and prints where the table and figure went.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from circuits.cli_common import UserError, config_from_kwargs, config_parameters, set_signature, with_loggers

app = typer.Typer(
    help="Run a protocol of the grokking literature over many runs (Varma et al. 2023; Huang et al. 2024).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _ints(name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"--{name} takes comma-separated integers (e.g. 100,200,400), got {text!r}") from None
    return values


def _out(protocol: str, out: Path | None, config: Any, params: dict[str, Any]) -> Path:
    if out is not None:
        return out
    blob = json.dumps({"config": config.science_dict, **params}, sort_keys=True, default=str).encode()
    return Path("checkpoints") / f"{protocol}-{hashlib.sha256(blob).hexdigest()[:8]}"


class _Progress:
    """One bar per ensemble: members, epochs and the ETA of the ensemble in flight."""

    def __init__(self, protocol: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.protocol = protocol
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        self.task: Any = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def group(self, i: int, n: int, members: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[-1].total)
        self.task = self.bar.add_task(f"{self.protocol}: ensemble {i + 1}/{n} ({members} runs)", total=None)

    def step(self, info: Any) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=info.epoch, total=info.epochs)


def _launch(
    protocol: str,
    func: Callable[..., Any],
    kw: dict[str, Any],
    params: dict[str, Any],
    unhashed: tuple[str, ...] = (),
    from_base: Callable[[Any], dict[str, Any]] | None = None,
) -> None:
    """Build the base config from the remaining flags, pick the folder, run ``func`` with a progress
    bar and print where its table and figure went. ``params`` (less ``unhashed``) name the folder."""
    from circuits.engine.ensemble import resolve_device

    out, device, log_to = kw.pop("out"), kw.pop("device"), kw.pop("log_to")
    executor = _executor(kw.pop("backend"), kw.pop("address"), kw.pop("workers"), kw.pop("threads"))
    base = config_from_kwargs(kw)
    try:
        resolve_device(device, base.train.engine)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = _out(protocol, out, base, {k: v for k, v in params.items() if k not in unhashed})
    extra = from_base(base) if from_base is not None else {}
    try:
        with _Progress(protocol) as progress:
            on_step = with_loggers(progress.step, log_to, base, out)
            result = func(out, base=base, device=device, on_group=progress.group, on_step=on_step,
                          executor=executor, **params, **extra)
    except KeyboardInterrupt:  # TrainingInterrupted in this process, or Ctrl-C while workers train
        typer.echo(f"interrupted; state saved under {out}. Rerun the same command to resume.", err=True)
        raise typer.Exit(130) from None
    from circuits.report import write_experiment_page

    page = write_experiment_page(result)
    typer.echo(f"{protocol}: {len(result.table)} rows in {out / (result.name + '.csv')}; figure {page}")
    for k, value in result.summary.items():
        if not isinstance(value, (dict, list)):
            typer.echo(f"  {k}: {value}")


def _check_run_options(backend: str, **counts: int | None) -> None:
    """--backend names an executor; --workers, --threads (and the like) are at least 1."""
    from circuits.experiments.executors import BACKENDS

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _executor(backend: str, address: str | None, workers: int | None, threads: int | None) -> Any:
    """None (the protocol trains in this process) unless --backend ray or --workers asks otherwise."""
    from circuits.experiments.executors import make_executor

    _check_run_options(backend, workers=workers, threads=threads)
    if backend == "local" and workers is None and threads is None:
        return None
    return make_executor(backend, workers=workers or 1, address=address, threads=threads)


def _option(name: str, annotation: Any, default: Any, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, f"--{name.replace('_', '-')}", help=help))


_DEVICE = _option("device", Optional[str], None, "Where the ensembles compute: cpu (default) or cuda[:N].")
_LOG_TO = _option("log_to", Optional[str], None, "Also log every member's metrics to tensorboard "
                  "(OUT/tensorboard/<member>) and/or wandb (a run per ensemble), comma-separated.")
_OUT = _option("out", Optional[Path], None, "Experiment folder (default: checkpoints/<protocol>-<hash>).")
_SEEDS = _option("seeds", int, 2, "Seeds per setting (seed s moves the init and the split by s).")
_SIZES = _option("sizes", str, ..., "Training-set sizes D, comma-separated (e.g. 100,200,400).")
_WIDTHS = _option("widths", str, ..., "Model widths d_model, comma-separated (d_mlp scales with them).")


_BACKEND = _option("backend", str, "local", "Where stacks train: local (this machine) or ray (circuits[ray]).")
_ADDRESS = _option("address", Optional[str], None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray "
                   "started for the run).")
_WORKERS = _option("workers", Optional[int], None, "Local worker processes (default: the stacks train in this "
                   "process).")
_THREADS = _option("threads", Optional[int], None, "Torch threads per stack (default: the cores shared among the "
                   "workers, 1 on Ray; the same value gives the same bits on either backend).")


def _command(name: str, doc: str, extra: list[inspect.Parameter]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(func: Callable[..., None]) -> Callable[..., None]:
        set_signature(func, [_OUT, *extra, _DEVICE, _LOG_TO, _BACKEND, _ADDRESS, _WORKERS, _THREADS,
                             *config_parameters()])
        func.__doc__ = doc
        app.command(name)(func)
        return func
    return register


@_command("reference", "Memorisation-only (random labels) and generalisation-only (large data) "
          "networks, split into circuits (Varma et al. 2023, App. B).",
          [_SEEDS, _option("mem_size", Optional[int], None, "Random-label training pairs (default: the config's)."),
           _option("gen_frac", float, 0.9, "Fraction of pairs for the generalisation-only network.")])
def _reference(**kw: Any) -> None:
    from circuits.experiments import reference_circuits

    params = {"seeds": kw.pop("seeds"), "mem_size": kw.pop("mem_size"), "gen_frac": kw.pop("gen_frac")}
    _launch("reference", reference_circuits, kw, params)


@_command("dcrit", "Critical dataset size: converged parameter norm of memorisation-only and "
          "generalisation-only networks over D (Varma et al. 2023).", [_SIZES, _SEEDS])
def _dcrit(**kw: Any) -> None:
    from circuits.experiments import critical_dataset_size

    _launch("dcrit", critical_dataset_size, kw, {"seeds": kw.pop("seeds"), "sizes": _ints("sizes", kw.pop("sizes"))})


@_command("ungrok", "Ungrokking: continue a grokked network on random subsets of size D' of its "
          "training set (Varma et al. 2023, Fig. 7).",
          [_option("sizes", str, ..., "Subset sizes D', comma-separated."), _SEEDS,
           _option("parent", Optional[Path], None, "A grokked run folder (default: train one on --parent-frac of the pairs)."),
           _option("parent_frac", float, 0.9, "Training fraction of the parent when it is trained here."),
           _option("critical_size", Optional[float], None, "D_crit to mark on the figure.")])
def _ungrok(**kw: Any) -> None:
    from circuits.store import require_run_dir
    from circuits.experiments import ungrokking

    params = {"seeds": kw.pop("seeds"), "sizes": _ints("sizes", kw.pop("sizes")), "parent": kw.pop("parent"),
              "parent_frac": kw.pop("parent_frac"), "critical_size": kw.pop("critical_size")}
    if params["parent"] is not None:
        require_run_dir(params["parent"])
    # The children train the base schedule's epochs (--epochs), also after a given parent.
    _launch("ungrok", ungrokking, kw, params, unhashed=("critical_size",),
            from_base=lambda base: {"epochs": base.train.epochs})


@_command("semigrok", "Semi-grokking: long runs with D near D_crit; delayed rise to a partial "
          "test-accuracy plateau (Varma et al. 2023).", [_SIZES, _SEEDS])
def _semigrok(**kw: Any) -> None:
    from circuits.experiments import semi_grokking

    _launch("semigrok", semi_grokking, kw, {"seeds": kw.pop("seeds"), "sizes": _ints("sizes", kw.pop("sizes"))})


@_command("capacity", "Memorisation capacity per model width on the fully random-labelled table "
          "(Huang et al. 2024).", [_WIDTHS, _SEEDS])
def _capacity(**kw: Any) -> None:
    from circuits.experiments import memorisation_capacity

    _launch("capacity", memorisation_capacity, kw, {"seeds": kw.pop("seeds"), "widths": _ints("widths", kw.pop("widths"))})


@_command("emergence", "Emergence in a multi-task mixture (Huang et al. 2024, §5): the operation's best "
          "test accuracy over model widths, alone and with memorisation pairs mixed in (reference engine).",
          [_WIDTHS, _option("mem_sizes", str, "0,3000", "Memorisation pairs mixed in, comma-separated (0: the "
                            "operation alone)."), _SEEDS,
           _option("threshold", float, 0.9, "Best test accuracy that counts as generalised (the emergence size).")])
def _emergence(**kw: Any) -> None:
    from circuits.experiments import emergence

    # --split-mlp (a config field) applies to the mixtures only, so it is the protocol's to set:
    # the base config, which has no mixture, must not carry it.
    params = {"seeds": kw.pop("seeds"), "widths": _ints("widths", kw.pop("widths")),
              "mem_sizes": _ints("mem-sizes", kw.pop("mem_sizes")), "split_mlp": bool(kw.pop("split_mlp")),
              "threshold": kw.pop("threshold")}
    _launch("emergence", emergence, kw, params, unhashed=("threshold",))


@_command("zones", "Huang et al.'s zone map over model width x training-set size: progression, "
          "comprehension, ungrokking, grokking, semi-grokking; and Liu et al.'s phases.",
          [_WIDTHS, _SIZES, _SEEDS,
           _option("capacity", Optional[Path], None, "capacity.json of `circuits experiment capacity`: the "
                   "widths' memorisation capacity, which tells progression (D above it) from comprehension.")])
def _zones(**kw: Any) -> None:
    from circuits.experiments import zones

    params = {"seeds": kw.pop("seeds"), "widths": _ints("widths", kw.pop("widths")),
              "sizes": _ints("sizes", kw.pop("sizes")), "capacity": _capacity_file(kw.pop("capacity"))}
    # The capacity only classifies: the same runs (and folder) serve with and without it.
    _launch("zones", zones, kw, params, unhashed=("capacity",))


def _capacity_file(path: Path | None) -> dict[int, float] | None:
    """The ``capacity_by_width`` of a capacity protocol's summary, checked (UserError otherwise)."""
    if path is None:
        return None
    import json

    try:
        data = json.loads(Path(path).read_text())
        caps = {int(k): float(v) for k, v in data["capacity_by_width"].items()}
    except FileNotFoundError:
        raise UserError(f"--capacity {path}: no such file; run `circuits experiment capacity` first") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"--capacity {path} is not a capacity.json written by `circuits experiment capacity` "
                        "(it needs a capacity_by_width object of width: pairs)") from None
    return caps


def _grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["weight-decay=0.3,1", "train_size=500,1000"]`` -> typed values per config field."""
    from circuits.config import FIELD_OWNER, field_type

    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise UserError(f"--grid takes FIELD=V1,V2,... (e.g. weight_decay=0.3,1), got {spec!r}")
        if name not in FIELD_OWNER:
            raise UserError(f"--grid: unknown config field {name!r}; use a `circuits train` flag name")
        kind = field_type(FIELD_OWNER[name], name)
        parse = {bool: lambda v: v.lower() in ("1", "true", "yes"), int: int, float: float, str: str}[kind]
        try:
            grid[name] = [parse(v) for v in values.replace(" ", "").split(",") if v]
        except ValueError:
            raise UserError(f"--grid {name}: values must be {kind.__name__}s, got {values!r}") from None
    return grid


@_command("phases", "Phase diagram over any config fields: --grid FIELD=V1,V2 (twice or more) x "
          "seeds; zone map and maps of final test accuracy and grokking epoch.",
          [_option("grid", list[str], ..., "FIELD=V1,V2,... (repeat: the first two are the axes)."),
           _option("seeds", int, 1, "Seeds per grid point.")])
def _phases(**kw: Any) -> None:
    from circuits.experiments import phase_diagram

    _launch("phases", phase_diagram, kw, {"seeds": kw.pop("seeds"), "grid": _grid(kw.pop("grid"))})


def _grid_file(path: Path) -> tuple[Any, Any]:
    """A sweep file: TOML or JSON with ``[grid]`` (field = [values]) or ``points`` (a list of
    field = value tables), and optionally ``seeds`` (a count or a list)."""
    import tomllib

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--grid-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--grid-file {path}: cannot read it ({e})") from None
    try:
        data = json.loads(text) if Path(path).suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"--grid-file {path} is not valid {'JSON' if Path(path).suffix.lower() == '.json' else 'TOML'}: "
                        f"{e}") from None
    if not isinstance(data, dict) or ("grid" in data) == ("points" in data):
        raise UserError(f"--grid-file {path} needs exactly one of `grid` (field = [values]) or `points` "
                        "(a list of field = value tables)")
    unknown = set(data) - {"grid", "points", "seeds"}
    if unknown:
        raise UserError(f"--grid-file {path}: unknown key(s) {', '.join(sorted(unknown))}; use grid, points, seeds")
    grid = data.get("grid", data.get("points"))
    if "grid" in data and not (isinstance(grid, dict) and all(isinstance(v, list) for v in grid.values())):
        raise UserError(f"--grid-file {path}: `grid` must map each field to a list of values")
    if "points" in data and not (isinstance(grid, list) and all(isinstance(p, dict) for p in grid)):
        raise UserError(f"--grid-file {path}: `points` must be a list of field = value tables")
    seeds = data.get("seeds")
    if seeds is not None and not (isinstance(seeds, int) and seeds > 0
                                  or isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
        raise UserError(f"--grid-file {path}: `seeds` must be a positive count or a list of integers")
    return grid, seeds


class _SweepProgress:
    """One bar for the sweep as a whole: members finished of all, running, failed, ETA."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
                            TimeElapsedColumn())
        self.task: Any = None

    def __enter__(self) -> _SweepProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("sweep", total=None, state="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, p: Any) -> None:
        eta = "" if p.eta_s is None else f" eta {int(p.eta_s // 60)}:{int(p.eta_s % 60):02d}"
        self.bar.update(self.task, completed=p.done, total=p.total,
                        state=f"{p.running} running, {p.failed} failed{eta}")


def sweep_command(**kw: Any) -> None:
    """Train a grid of config fields x seeds as run folders under one sweep folder, with an index
    table; rerun the same command to finish what a stop left."""
    from circuits.experiments.sweeps import INDEX_FILE, sweep

    specs, grid_file = kw.pop("grid"), kw.pop("grid_file")
    seeds, backend = kw.pop("seeds"), kw.pop("backend")
    _check_run_options(backend, workers=kw["workers"], threads=kw["threads"], max_ensemble=kw["max_ensemble"])
    if grid_file is not None and specs:
        raise UserError("give the grid by --grid flags or by --grid-file, not both")
    if grid_file is not None:
        grid, file_seeds = _grid_file(grid_file)
        if seeds is None:
            seeds = file_seeds
    elif specs:
        grid = _grid(specs)
    else:
        raise UserError("a sweep needs a grid: --grid FIELD=V1,V2 (repeatable) or --grid-file FILE.toml")
    if seeds is not None and isinstance(seeds, int) and seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    out, device = kw.pop("out"), kw.pop("device")
    options = {k: kw.pop(k) for k in ("workers", "threads", "address", "max_ensemble", "analyze")}
    base = config_from_kwargs(kw)
    out = _out("sweep", out, base, {"grid": grid, "seeds": seeds})
    try:
        with _SweepProgress() as progress:
            result = sweep(out, grid, base=base, seeds=seeds, backend=backend, device=device,
                           on_progress=progress.update, **options)
    except KeyboardInterrupt:  # TrainingInterrupted in this process, or Ctrl-C while workers train
        typer.echo(f"interrupted; state saved under {out}. Rerun the same command to resume.", err=True)
        raise typer.Exit(130) from None
    from circuits.report import write_experiment_page

    page = write_experiment_page(result)
    s = result.summary
    typer.echo(f"sweep: {s['done']} of {s['members']} members done in {s['stacks']} stack(s) this call; index "
               f"{out / INDEX_FILE}; maps {page}")
    for key in ("zone_counts", "liu_phase_counts"):
        if s.get(key):
            typer.echo(f"  {key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in s[key].items()))
    bad = s["failed"] + s["diverged"]
    if bad:
        table = result.table
        for _, row in table[table.status.isin(["failed", "diverged"])].iterrows():
            typer.echo(f"  {row['name']}: {row['status']}: {row['error']}", err=True)
        typer.echo(f"circuits: {bad} member(s) failed or diverged (the others finished); see {out / INDEX_FILE}", err=True)
        raise typer.Exit(1)


SWEEP_OPTIONS = [
    _option("out", Optional[Path], None, "Sweep folder (default: checkpoints/sweep-<hash>)."),
    _option("grid", list[str], [], "FIELD=V1,V2,... (repeatable; the product is swept; the first two are the map's axes)."),
    _option("grid_file", Optional[Path], None, "A TOML or JSON file with [grid] (field = [values]) or points "
            "(a list of field = value tables), and optionally seeds."),
    _option("seeds", Optional[int], None, "Replicate seeds per grid point (seed s moves the init and the split by s)."),
    _BACKEND,
    _ADDRESS,
    _option("workers", Optional[int], None, "Local worker processes (default: stacked ensembles in this process, reference-engine "
            "members in one worker per core)."),
    _option("threads", Optional[int], None, "Torch threads per stack (default: the cores shared among the workers, 1 on Ray; "
            "the same value gives the same bits on either backend)."),
    _option("max_ensemble", int, 64, "Members per stacked ensemble at most."),
    _option("analyze", bool, False, "Also analyse every finished member and record its phase boundaries."),
    _DEVICE,
]
set_signature(sweep_command, [*SWEEP_OPTIONS, *config_parameters()])
