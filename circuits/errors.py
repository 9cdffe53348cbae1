"""Errors a user can cause and fix, kept free of torch so the CLI can catch them cheaply."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RunFolderError", "CheckpointError", "ProtocolError", "require_run_dir"]


class RunFolderError(RuntimeError):
    """A run folder is missing, incomplete or holds something else; the message says which."""


class CheckpointError(RunFolderError):
    """A checkpoint file is missing, truncated or corrupted; ``path`` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"damaged checkpoint {self.path}: {problem}")


class ProtocolError(ValueError):
    """An experiment protocol got parameters it cannot run (an empty grid, a subset larger than
    its pool); the message names the parameter and the fix."""


def require_run_dir(path: Path) -> None:
    """Raise RunFolderError unless ``path`` is a folder with a run config (no torch needed).

    ``config.json`` is written last when a run is created, so its presence marks a run folder.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise RunFolderError(f"{path} is not a run folder: config.json is missing")
