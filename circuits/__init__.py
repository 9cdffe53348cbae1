"""circuits: watch a network grok, and see why.

A mechanistic-interpretability toolkit for grokking on modular arithmetic (Nanda et al. 2023;
Varma et al. 2023). Import cost is kept low: heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

__all__ = [
    "RunConfig",
    "TaskConfig",
    "ModelConfig",
    "TrainConfig",
    "preset",
    "train",
    "train_ensemble",
    "load_run",
    "Run",
    "Transformer",
    "make_model",
    "make_task",
    "analyze",
    "load_analysis",
    "Analysis",
    "report",
    "progress_bar",
    "import_run",
    "sweep",
    "load_sweep",
]

_LAZY = {
    "RunConfig": "circuits.config",
    "TaskConfig": "circuits.config",
    "ModelConfig": "circuits.config",
    "TrainConfig": "circuits.config",
    "preset": "circuits.config",
    "train": "circuits.run",
    "train_ensemble": "circuits.run",
    "load_run": "circuits.run",
    "Run": "circuits.run",
    "Transformer": "circuits.model",
    "make_model": "circuits.model",
    "make_task": "circuits.tasks",
    "analyze": "circuits.analysis",
    "load_analysis": "circuits.analysis",
    "Analysis": "circuits.analysis",
    "report": "circuits.report",
    "progress_bar": "circuits.progress",
    "import_run": "circuits.importer",
    "sweep": "circuits.experiments.sweeps",
    "load_sweep": "circuits.experiments.sweeps",
}

if TYPE_CHECKING:
    from circuits.analysis import Analysis, analyze, load_analysis
    from circuits.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, preset
    from circuits.model import Transformer, make_model
    from circuits.report import report
    from circuits.run import Run, load_run, train, train_ensemble
    from circuits.tasks import make_task
    from circuits.progress import progress_bar
    from circuits.importer import import_run
    from circuits.experiments.sweeps import load_sweep, sweep


#: Submodules reachable as attributes (``circuits.fourier``, ``circuits.measures``, ...),
#: imported on first use.
SUBMODULES = (
    "analysis", "config", "errors", "experiments", "fourier", "grid", "measures", "model", "plots",
    "report", "run", "stats", "store", "tasks", "trainer", "dashboard", "engine", "progress", "importer",
)


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import circuits` (and the CLI's --help) free of torch's import time.
    import importlib

    if name in SUBMODULES:
        return importlib.import_module(f"circuits.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'circuits' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    # Tab completion in a notebook offers the public API and the submodules.
    return sorted({*globals(), *__all__, *SUBMODULES})
