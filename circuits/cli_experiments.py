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
    from circuits.trainer import TrainingInterrupted

    out, device, log_to = kw.pop("out"), kw.pop("device"), kw.pop("log_to")
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
                          **params, **extra)
    except TrainingInterrupted:
        typer.echo(f"interrupted; state saved under {out}. Rerun the same command to resume.", err=True)
        raise typer.Exit(130) from None
    from circuits.report import write_experiment_page

    page = write_experiment_page(result)
    typer.echo(f"{protocol}: {len(result.table)} rows in {out / (result.name + '.csv')}; figure {page}")
    for k, value in result.summary.items():
        if not isinstance(value, (dict, list)):
            typer.echo(f"  {k}: {value}")


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


def _command(name: str, doc: str, extra: list[inspect.Parameter]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(func: Callable[..., None]) -> Callable[..., None]:
        set_signature(func, [_OUT, *extra, _DEVICE, _LOG_TO, *config_parameters()])
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
