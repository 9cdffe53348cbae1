"""The ``circuits`` command line: thin wrappers over the library (design.md, principle 1).

Heavy imports (torch, TransformerLens) happen inside the commands, so ``circuits --help`` and
flag errors answer at once. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from circuits import cli_experiments
from circuits.cli_common import (
    UserError,
    config_from_kwargs,
    config_parameters,
    set_signature,
    with_loggers,
)
from circuits.config import ConfigError, RunConfig
from circuits.store import CONFIG_FILE, SUMMARY_FILE, require_run_dir

app = typer.Typer(
    name="circuits",
    help="Watch a network grok, and see why.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _train(**kwargs: Any) -> None:
    out = kwargs.pop("out")
    force = kwargs.pop("force")
    device = kwargs.pop("device")
    log_to = kwargs.pop("log_to")
    config = config_from_kwargs(kwargs)

    from circuits.engine.ensemble import resolve_device
    from circuits.run import default_run_dir, train
    from circuits.trainer import TrainingInterrupted

    try:
        resolve_device(device, config.train.engine)
    except ValueError as e:
        raise UserError(str(e)) from None

    path = Path(out) if out is not None else default_run_dir(config)
    progress = _TrainProgress(config, path)
    on_step = with_loggers(progress.update, log_to, config, path)
    try:
        with progress:
            run = train(config, out=path, force=force, on_step=on_step, device=device)
    except TrainingInterrupted as e:
        typer.echo(
            f"interrupted at epoch {e.epoch}; state saved in {path}. "
            "Rerun the same command to resume.",
            err=True,
        )
        raise typer.Exit(130) from None
    metrics = run.metrics
    last = metrics.iloc[-1] if len(metrics) else None
    typer.echo(f"run: {run.path}  ({len(run.epochs)} checkpoints)")
    if last is not None:
        typer.echo(
            f"epoch {int(last.epoch)}: train loss {last.train_loss:.3g} acc {last.train_acc:.3f}"
            f" | test loss {last.test_loss:.3g} acc {last.test_acc:.3f}"
        )
    if progress.steps:
        typer.echo(f"{progress.ms_per_step:.1f} ms per epoch, {progress.elapsed:.1f} s in all")


class _TrainProgress:
    """A rich progress bar with live train/test loss and accuracy and an ETA."""

    def __init__(self, config: RunConfig, path: Path) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.config = config
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task_id = self.progress.add_task(
            f"train {path.name}", total=config.train.epochs, stats=""
        )
        self.t0 = time.perf_counter()
        self.first_epoch: int | None = None
        self.steps = 0

    def __enter__(self) -> _TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, info: Any) -> None:
        if self.first_epoch is None:
            self.first_epoch = info.epoch
            self.t0 = time.perf_counter()
        else:
            self.steps = info.epoch - self.first_epoch
        fields: dict[str, Any] = {}
        if info.metrics is not None:
            m = info.metrics
            fields["stats"] = (
                f"train {m['train_loss']:.2e} ({m['train_acc']:.0%}) "
                f"test {m['test_loss']:.2e} ({m['test_acc']:.0%})"
            )
        self.progress.update(self.task_id, completed=info.epoch, **fields)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.elapsed / max(self.steps, 1)


def _train_signature() -> None:
    params = config_parameters()
    params[1:1] = [
        inspect.Parameter(
            "out", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(
                None, "--out", help="Run folder (default: checkpoints/<preset>-<config hash>)."
            ),
        ),
        inspect.Parameter(
            "force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(
                False, "--force", help="Delete a run with a different config in --out first."
            ),
        ),
        inspect.Parameter(
            "device", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(
                None, "--device", help="Where the fused engine computes: cpu (default) or cuda[:N]."
            ),
        ),
        inspect.Parameter(
            "log_to", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(
                None, "--log-to", help="Also log the metrics to tensorboard (RUN/tensorboard) and/or wandb, "
                "comma-separated (needs the extra of each)."
            ),
        ),
    ]
    set_signature(_train, params)
    _train.__doc__ = (
        "Train a model on modular arithmetic with full-batch AdamW, saving dense checkpoints.\n\n"
        "Every config field is a flag; rerunning the same command resumes a killed run."
    )


_train_signature()
app.command("train")(_train)


@app.command("info")
def info(run_dir: Path = typer.Argument(..., help="A run folder (or a sweep's or a protocol's folder).")) -> None:
    """Print a run's config, checkpoints and final metrics, and check every file of the run.

    Exit 1 when anything is damaged (each problem on a line of its own, with the fix). Given a
    sweep's folder, print its members by status instead (and the failed ones' errors); given a
    protocol's folder (``circuits experiment ... --out``), its members by status and its result.
    """
    from circuits.experiments.sweeps import INDEX_FILE, SPEC_FILE
    from circuits.store import CONFIG_FILE, RUNS_DIR

    if (run_dir / SPEC_FILE).is_file() and (run_dir / INDEX_FILE).is_file():
        _sweep_info(run_dir)
        return
    if not (run_dir / CONFIG_FILE).exists() and (run_dir / RUNS_DIR).is_dir():
        _protocol_info(run_dir)
        return
    require_run_dir(run_dir)
    from circuits.errors import RunFolderError
    from circuits.run import load_run

    run = load_run(run_dir)
    cfg = run.config
    problems: list[str] = []
    typer.echo(f"run       {run.path}")
    typer.echo(f"preset    {cfg.preset}   hash {cfg.short_hash()}   engine {cfg.train.engine}")
    for section, values in cfg.science_dict.items():
        typer.echo(f"{section:<9} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    try:
        epochs = run.epochs
    except RunFolderError as e:
        problems.append(f"DAMAGED   {e}")
        epochs = []
    size = sum(f.stat().st_size for f in run.store.checkpoint_dir.glob("*.safetensors"))
    status = "complete" if epochs and epochs[-1] == cfg.train.epochs else "in progress / stopped"
    if epochs:
        typer.echo(
            f"checkpoints {len(epochs)} (epochs {epochs[0]}..{epochs[-1]} of "
            f"{cfg.train.epochs}, {status}), {size / 2**20:.1f} MiB"
        )
    else:
        typer.echo("checkpoints none yet" if not problems else "checkpoints unknown (manifest damaged)")
    for err in run.verify() if epochs else []:
        problems.append(f"DAMAGED   {err.path.name}: {err.problem}")
    unindexed = run.unindexed()
    if unindexed:
        names = ", ".join(f.name for f in unindexed[:3]) + (" ..." if len(unindexed) > 3 else "")
        problems.append(
            f"UNINDEXED {len(unindexed)} checkpoint file(s) the manifest does not list ({names}); "
            f"run `circuits reindex {run.path}` to index them"
        )
    from circuits.importer import imported_source

    source = imported_source(run.path)
    if source is not None:
        typer.echo(f"imported  from {source.get('source')} (sha256 {str(source.get('sha256'))[:16]}...); "
                   "it analyses but does not train")
    mark = run.store.diverged()
    if mark is not None:
        typer.echo(f"DIVERGED  at epoch {mark.get('epoch')} (lr {mark.get('lr')}): a rerun refuses until "
                   "--force; try a lower --lr")
    checks = (run.check_split, run.check_metrics) if source is not None else (
        run.check_split, run.check_metrics, run.check_resume)
    for check in checks:
        problem = check()
        if problem is not None:
            problems.append(f"DAMAGED   {problem}")
    metrics = run.metrics  # what parses (check_metrics named what does not)
    if len(metrics):
        last = metrics.iloc[-1]
        typer.echo(
            f"epoch {int(last.epoch)}: train loss {last.train_loss:.3g} acc {last.train_acc:.3f}"
            f" | test loss {last.test_loss:.3g} acc {last.test_acc:.3f}"
        )
        hit = metrics[metrics.train_acc >= 1.0]
        typer.echo("train acc 100% at epoch " + (str(int(hit.epoch.iloc[0])) if len(hit) else "(not yet)"))
        hit = metrics[metrics.test_acc >= 0.99]
        typer.echo(
            "test acc >= 99% at epoch " + (str(int(hit.epoch.iloc[0])) if len(hit) else "(not yet)")
        )
    for line in problems:
        typer.echo(line)
    if problems:
        raise typer.Exit(1)


def _sweep_info(path: Path) -> None:
    from circuits.experiments.sweeps import INDEX_FILE, load_sweep
    from circuits.store import RUNS_DIR

    sw = load_sweep(path)
    t = sw.table
    counts = t.status.value_counts()
    typer.echo(f"sweep     {path}   {len(t)} members over {', '.join(sw.axes)}")
    typer.echo("status    " + ", ".join(f"{k} {int(v)}" for k, v in counts.items()))
    for key in ("zone", "liu_phase"):
        if key in t and t[key].notna().any():
            typer.echo(f"{key:<9} " + ", ".join(f"{k} {int(v)}" for k, v in t[key].value_counts().items()))
    for _, row in t[t.status.isin(["failed", "diverged", "interrupted"])].iterrows():
        typer.echo(f"  {row['name']}: {row['status']}: {row['error']}")
    typer.echo(f"index     {path / INDEX_FILE}   (a member: circuits info {path / RUNS_DIR / t.name.iloc[0]})")


def _protocol_info(path: Path) -> None:
    """A protocol's folder: its run folders by status, and the result it wrote when it finished."""
    import json

    from circuits.errors import RunFolderError
    from circuits.run import load_run
    from circuits.store import member_run_folders

    counts: dict[str, int] = {}
    members = member_run_folders(path)
    for d in members:
        try:
            run = load_run(d)
            status = ("diverged" if run.store.diverged() is not None else
                      "complete" if run.is_complete else "stopped" if run.epochs else "not started")
        except (RunFolderError, ValueError, OSError) as e:
            status = "damaged"
            typer.echo(f"  {d.name}: damaged: {e}")
        counts[status] = counts.get(status, 0) + 1
    results = sorted(j for j in path.glob("*.json") if j.with_suffix(".csv").is_file())
    name = results[0].stem if results else "?"
    typer.echo(f"protocol  {path}   {name}, {len(members)} member run folder(s)")
    typer.echo("status    " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "no members yet"))
    if not results:
        typer.echo("result    none yet: the protocol has not finished; rerun its command to resume it")
    for j in results:
        try:
            summary = json.loads(j.read_text())
        except (OSError, ValueError) as e:
            typer.echo(f"result    {j} cannot be read ({e}); rerun the protocol's command to rewrite it")
            continue
        typer.echo(f"result    {j.with_suffix('.csv')}   (summary {j.name})")
        for k, v in summary.items():
            if isinstance(v, dict) and v and all(isinstance(x, (int, float, str, bool)) for x in v.values()):
                v = ", ".join(f"{a} {_short(b)}" for a, b in v.items())  # counts, values by width, ...
            elif not (isinstance(v, (int, float, str, bool)) or v is None):
                continue  # nested tables: in the .json
            typer.echo(f"  {k}: {_short(v)}")
    if members:
        typer.echo(f"a member: circuits info {members[0]}")


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command("reindex")
def reindex_cmd(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Index checkpoint files the manifest does not list (after manifest.json was deleted or
    damaged). A file is indexed only when it reads whole and fits the run's config; entries
    already in a readable manifest are kept, so a changed file is still reported as damaged."""
    require_run_dir(run_dir)
    from circuits.run import load_run

    run = load_run(run_dir)
    added, skipped = run.reindex()
    typer.echo(f"indexed {len(added)} checkpoint(s)" + (f" (epochs {added[0]}..{added[-1]})" if added else ""))
    for message in skipped:
        typer.echo(f"left out {message}", err=True)
    if skipped:
        raise typer.Exit(1)


@app.command("import")
def import_cmd(
    source: Path = typer.Argument(..., help="A TransformerLens Grokking demo save (torch.save of a dict with "
                                  "config, checkpoints, checkpoint_epochs, train_indices, test_indices), or "
                                  "Nanda et al.'s full_run_data.pth (state_dicts, config, losses)."),
    out: Path = typer.Option(..., "--out", help="New or empty run folder to create."),
    op: Optional[str] = typer.Option(None, "--op", help="The operation the run was trained on, where the file "
                                     "does not say (default add)."),
) -> None:
    """Import a saved run as a run folder, never executing code from the file: a restricted
    unpickler builds tensors, containers, numbers and strings only. The run analyses and draws
    dashboards like any other; it does not train."""
    from circuits.importer import ImportRefused, import_run

    try:
        run = import_run(source, out, op=op)
    except ImportRefused as e:
        raise UserError(str(e)) from None
    typer.echo(f"imported {len(run.epochs)} checkpoints (epochs {run.epochs[0]}..{run.epochs[-1]}) into {run.path}")


@app.command("analyze")
def analyze_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="A run folder (it may still be training)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Analysis folder (default: analyses/<run path under checkpoints/>; for a run "
        "elsewhere analyses/<name>-<hash of its path>). Must be new, empty or an analysis folder."
    ),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Checkpoints per batch."),
    measures: Optional[str] = typer.Option(
        None, "--measures", help="Comma-separated measure families to compute (default: the default "
        "families; `default,rqi` adds an opt-in lens, `all` computes every one; "
        "`circuits analyze --list-measures` names them)."
    ),
    option: Optional[list[str]] = typer.Option(
        None, "--option", help="A measure family's setting, FAMILY.NAME=VALUE (repeatable): "
        "`--option oinfo.every=10`. --list-measures shows each family's settings."
    ),
    list_measures: bool = typer.Option(False, "--list-measures", help="List the measure families and exit."),
) -> None:
    """Run every progress measure over every checkpoint (incremental; damaged files skipped)."""
    if list_measures:
        from circuits.measures import families

        for f in families():
            tag = "" if f.default else " (opt-in)"
            settings = "".join(f" --option {f.name}.{k}={v}" for k, v in f.options.items())
            typer.echo(f"{f.name:16} {f.doc}{tag}  [{', '.join(c.name for c in f.columns) or 'arrays only'}]"
                       f"{settings}")
        return
    if run_dir is None:
        raise UserError("give a run folder to analyse: circuits analyze RUN_DIR")
    require_run_dir(run_dir)
    chosen = None
    if measures is not None:
        from circuits.measures.registry import family

        chosen = [m.strip() for m in measures.split(",") if m.strip()]
        if not chosen:
            raise UserError("--measures is empty; name at least one measure family (--list-measures)")
        for name in chosen:
            try:
                if name not in ("default", "all"):
                    family(name)
            except ValueError as e:
                raise UserError(f"--measures: {e}") from None
    if option:
        from circuits.measures.registry import parse_options

        try:
            parse_options(option)
        except ValueError as e:
            raise UserError(f"--option: {e}") from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from circuits.report import report

    with Progress(
        TextColumn("[bold]analyze"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task_id = bar.add_task("analyze", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        result = report(run_dir, out=out, batch_size=batch_size, on_progress=on_progress, measures=chosen,
                        options=option)
    s = result.summary
    typer.echo(f"analysis: {result.path}  ({s['n_checkpoints']} checkpoints)")
    for name, reason in s.get("skipped_measures", {}).items():
        typer.echo(f"skipped the {name} measures: {reason}", err=True)
    typer.echo(
        f"key frequencies: {s['key_frequencies']} (from epoch {s['key_frequencies_epoch']})"
    )
    if s["phases"]:
        ph = s["phases"]
        typer.echo(
            f"phases: memorisation ends {ph['memorisation_end']}, circuit formation ends "
            f"{ph['circuit_formation_end']}, cleanup ends {ph['cleanup_end']}"
        )
    for message in result.damaged:
        typer.echo(f"skipped {message}", err=True)


def _dashboard_source(path: Path) -> str:
    """'analysis' for an analysis folder (summary.json), 'run' for a run folder (config.json)."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / SUMMARY_FILE).is_file():
        return "analysis"
    if (path / CONFIG_FILE).is_file():
        return "run"
    raise UserError(f"{path} is neither a run folder (config.json) nor an analysis folder (summary.json)")


@app.command("dashboard")
def dashboard_cmd(
    paths: list[Path] = typer.Argument(
        ..., help="Run folders or analysis folders; one gives a run dashboard, several a comparison."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="HTML file (default: dashboard.html in the analysis folder; for several "
        "runs analyses/comparison-<hash>.html)."
    ),
) -> None:
    """Write a self-contained HTML dashboard (plotly.js inside: opens from file://, no network).

    A run folder is analysed first (incremental, as `circuits analyze`); an analysis folder is
    read as it is.
    """
    kinds = [_dashboard_source(p) for p in paths]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from circuits.analysis import DEFAULT_ANALYSES_DIR, load_analysis
    from circuits.report import report
    from circuits.dashboard import (
        DASHBOARD_FILE,
        comparison_name,
        write_comparison_dashboard,
        write_run_dashboard,
    )

    analyses = []
    for path, kind in zip(paths, kinds):
        if kind == "analysis":
            analyses.append(load_analysis(path))
            continue
        with Progress(
            TextColumn(f"[bold]analyze {path.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        ) as bar:
            task_id = bar.add_task("analyze", total=None)
            # report() writes dashboard.html beside measures.csv too.
            analyses.append(report(path, on_progress=lambda d, t: bar.update(task_id, completed=d, total=t)))
    if len(analyses) == 1:
        target = out if out is not None else analyses[0].path / DASHBOARD_FILE
        if kinds[0] == "analysis" or target.resolve() != (analyses[0].path / DASHBOARD_FILE).resolve():
            write_run_dashboard(analyses[0], out=target)
    else:
        target = out if out is not None else DEFAULT_ANALYSES_DIR / comparison_name(paths)
        write_comparison_dashboard(analyses, target)
    typer.echo(f"dashboard: {target}  ({target.stat().st_size / 1e6:.1f} MB); open it in a browser")


app.add_typer(cli_experiments.app, name="experiment")
app.command("sweep")(cli_experiments.sweep_command)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts) of whichever click typer runs on (vendored since 0.2x)."""
    usage: list[type] = []
    exits: list[type] = [typer.Exit]
    aborts: list[type] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        for attr, bucket in (("Exit", exits), ("Abort", aborts)):
            if hasattr(mod, attr):
                bucket.append(getattr(mod, attr))
    return tuple(usage), tuple(exits), tuple(aborts)


def _os_error(e: OSError) -> str:
    """One line for an OS error: what failed, on which file, and what to do."""
    import errno

    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"the disk is full (writing{where}); free some space and rerun the same command: "
                "a run resumes from its last save")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {e.strerror}; choose a folder you can write (--out)"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{e.filename or 'a path'} is a file where a folder is needed; choose another --out"
    return f"{e.strerror or e}{':' + where if where else ''}"


def _out_of_memory(e: RuntimeError) -> str | None:
    """One line for torch's allocation failures (a RuntimeError, not MemoryError), else None."""
    import re

    import torch

    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    m = re.search(r"tried to allocate (\d+) bytes", text)
    need = f" ({int(m.group(1)) / 1e9:.1f} GB at once)" if m else ""
    return f"out of memory{need}; choose a smaller p, model or ensemble"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    from circuits.errors import MissingExtra, ProtocolError, RunFolderError, TrainingDiverged

    usage_errors, exits, aborts = _click_exceptions()
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    try:
        result = command.main(args=args, prog_name="circuits", standalone_mode=False)
    except (UserError, ConfigError, RunFolderError, ProtocolError, TrainingDiverged, MissingExtra) as e:
        typer.echo(f"circuits: error: {e}", err=True)
        return 2
    except OSError as e:
        typer.echo(f"circuits: error: {_os_error(e)}", err=True)
        return 2
    except MemoryError:
        typer.echo("circuits: error: out of memory; choose a smaller p, model or ensemble", err=True)
        return 2
    except RuntimeError as e:
        line = _out_of_memory(e)
        if line is None:
            raise
        typer.echo(f"circuits: error: {line}", err=True)
        return 2
    except exits as e:
        return int(e.exit_code)
    except aborts:
        typer.echo("circuits: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("circuits: interrupted", err=True)
        return 130
    except usage_errors as e:
        message = e.format_message().strip().splitlines()  # type: ignore[attr-defined]
        typer.echo(f"circuits: error: {message[0] if message else e}", err=True)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
