"""Errors a user can cause and fix, kept free of torch so the CLI can catch them cheaply."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RunFolderError", "CheckpointError", "AnalysisFolderError", "ProtocolError", "TrainingDiverged",
           "MissingExtra"]


class RunFolderError(RuntimeError):
    """A run folder is missing, incomplete or holds something else; the message says which."""


class CheckpointError(RunFolderError):
    """A checkpoint file is missing, truncated or corrupted; ``path`` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"damaged checkpoint {self.path}: {problem}")


class AnalysisFolderError(RunFolderError):
    """An analysis folder is damaged, foreign or changed after circuits wrote it; the message
    names the file and the fix (``circuits analyze`` recomputes what it cannot trust)."""


class ProtocolError(ValueError):
    """An experiment protocol got parameters it cannot run (an empty grid, a subset larger than
    its pool); the message names the parameter and the fix."""


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite; each diverged run keeps its last finite checkpoint
    and resume point, and ``runs`` maps its folder to ``(epoch seen, epoch kept)``, ``lrs`` to
    its learning rate. The folder is marked diverged: a rerun raises this again until the run is
    replaced (``--force``)."""

    def __init__(self, runs: dict[str, tuple[int, int]], lrs: dict[str, float] | None = None) -> None:
        self.runs, self.lrs = runs, lrs or {}
        parts = [
            f"{path} at epoch {seen}" + (f" with lr {self.lrs[path]:g}" if path in self.lrs else "")
            + f" (kept: epoch {kept})"
            for path, (seen, kept) in runs.items()
        ]
        super().__init__(
            "training diverged, the train loss is not finite: " + "; ".join(parts)
            + ". The last finite checkpoint and its resume point are kept; train it again with a "
            "smaller --lr and --force"
        )


class MissingExtra(ImportError):
    """An optional feature's package is not installed; the message names the extra to install
    (``pip install -e '.[llc]'``)."""
