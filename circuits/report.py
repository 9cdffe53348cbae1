"""One call for what ``circuits analyze`` gives: the tables, then the run's dashboard beside them.

Analysis computes and writes tables only (:func:`circuits.analysis.analyze`); drawing is the
caller's, so analysis never imports the dashboard (design.md, "Outputs"). This is that caller
for the CLI and for notebooks that want both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from typing import TYPE_CHECKING, Any

from circuits.analysis import Analysis, analyze
from circuits.dashboard import DASHBOARD_FILE, write_figure_page, write_run_dashboard
from circuits.lock import hold_run_folder
from circuits.run import Run, load_run

if TYPE_CHECKING:
    from circuits.experiments.members import ExperimentResult

__all__ = ["report", "write_experiment_page"]


def report(
    run: Run | str | Path,
    out: str | Path | None = None,
    batch_size: int = 2,
    key_freqs: list[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    measures: Sequence[str] | None = None,
    options: Mapping[str, Any] | Sequence[str] | None = None,
) -> Analysis:
    """:func:`~circuits.analysis.analyze` ``run`` into ``out``, then write its dashboard there
    (``dashboard.html`` beside ``measures.csv``, holding the analysis folder's lock); returns the
    analysis. The arguments are :func:`~circuits.analysis.analyze`'s."""
    if not isinstance(run, Run):
        run = load_run(run)
    analysis = analyze(run, out=out, batch_size=batch_size, key_freqs=key_freqs, on_progress=on_progress,
                       measures=measures, options=options)
    with hold_run_folder(analysis.path, doing="analysing into"):
        write_run_dashboard(analysis, out=analysis.path / DASHBOARD_FILE, run=run)
    return analysis


def write_experiment_page(result: ExperimentResult) -> Path:
    """Write a protocol's figures as ``<path>/<name>.html`` beside its table (one self-contained
    page); the result must have been written (:func:`circuits.experiments.members.write_result`)."""
    if result.path is None:
        raise ValueError("the experiment result has not been written yet; it has no folder")
    page = result.path / f"{result.name}.html"
    write_figure_page(page, [result.figure, *result.extra_figures], title=result.name.replace("_", " "))
    return page
