"""Errors a user can cause and fix, kept free of torch so the CLI can catch them cheaply."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RunFolderError", "CheckpointError", "AnalysisFolderError", "ProtocolError", "TrainingDiverged", "require_run_dir"]


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
    and resume point, and ``runs`` maps its folder to ``(epoch seen, epoch kept)``."""

    def __init__(self, runs: dict[str, tuple[int, int]]) -> None:
        self.runs = runs
        parts = [f"{path} at epoch {seen} (kept: epoch {kept})" for path, (seen, kept) in runs.items()]
        super().__init__(
            "training diverged, the train loss is not finite: " + "; ".join(parts)
            + ". The last finite checkpoint and its resume point are kept; try a smaller --lr"
        )


def require_run_dir(path: Path) -> None:
    """Raise RunFolderError unless ``path`` is a folder with a run config (no torch needed).

    ``config.json`` is written last when a run is created, so its presence marks a run folder.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise RunFolderError(f"{path} is not a run folder: config.json is missing")
