"""Errors a user can cause and fix, kept free of torch so the CLI can catch them cheaply."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RunFolderError", "CheckpointError"]


class RunFolderError(RuntimeError):
    """A run folder is missing, incomplete or holds something else; the message says which."""


class CheckpointError(RunFolderError):
    """A checkpoint file is missing, truncated or corrupted; ``path`` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"damaged checkpoint {self.path}: {problem}")
