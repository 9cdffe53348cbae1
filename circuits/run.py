"""A run as a notebook sees it: ``load_run(path)`` and ``train(config)`` return a :class:`Run`.

>>> run = circuits.load_run("checkpoints/quick-9b4c2266")
>>> run.metrics.tail()                   # pandas DataFrame
>>> model = run.model(1500)              # nearest checkpoint's weights in a hooked model
>>> logits, cache = model.run_with_cache(run.task.tokens)
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.config import ConfigError, RunConfig
from circuits.errors import CheckpointError, RunFolderError
from circuits.lock import hold_run_folder, hold_run_folders
from circuits.store import RunStore, clear_run_folder, is_safe_name, require_run_dir

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import Tensor

    from circuits.model import Model
    from circuits.tasks import Task
    from circuits.trainer import StepInfo

__all__ = ["Run", "load_run", "train", "train_ensemble", "default_run_dir", "DEFAULT_RUNS_DIR"]

DEFAULT_RUNS_DIR = Path("checkpoints")


class Run:
    """One run folder: its config, task and split, checkpoints and metrics."""

    def __init__(self, path: str | Path) -> None:
        self.store = RunStore(Path(path))
        self.config: RunConfig = self.store.read_config()

    def __repr__(self) -> str:
        epochs = self.epochs
        last = epochs[-1] if epochs else None
        return (
            f"Run({str(self.path)!r}, p={self.config.task.p}, op={self.config.task.op!r}, "
            f"checkpoints={len(epochs)}, last_epoch={last})"
        )

    @property
    def path(self) -> Path:
        """The run folder."""
        return self.store.root

    @property
    def name(self) -> str:
        """The folder's name."""
        return self.path.name

    @cached_property
    def task(self) -> Task:
        """The task with the split saved in the run (never re-derived)."""
        from circuits.tasks import saved_task

        return saved_task(self.config.task, self.store)

    @property
    def epochs(self) -> list[int]:
        """Epochs that have a checkpoint, ascending (re-read: a run may still be training)."""
        return self.store.checkpoint_epochs()

    @property
    def metrics(self) -> pd.DataFrame:
        """Train/test loss and accuracy per logged epoch."""
        import pandas as pd

        from circuits.store import METRIC_COLUMNS

        return pd.DataFrame(self.store.read_metrics_rows(), columns=list(METRIC_COLUMNS))

    def first_epoch(self, column: str, level: float, below: bool = False) -> int | None:
        """The first logged epoch at which the metric ``column`` reaches ``level`` (``>=``; with
        ``below``, ``<=``), or None if it never does: ``run.first_epoch("test_acc", 0.99)`` is
        when a run groks, ``run.first_epoch("train_loss", 1e-3, below=True)`` when it fits."""
        m = self.metrics
        if column not in m.columns or column == "epoch":
            raise ValueError(f"no metric {column!r}; choose from {', '.join(c for c in m.columns if c != 'epoch')}")
        hit = m.epoch[m[column] <= level] if below else m.epoch[m[column] >= level]
        return int(hit.iloc[0]) if len(hit) else None

    @property
    def is_complete(self) -> bool:
        """Whether training reached its last epoch."""
        epochs = self.epochs
        return bool(epochs) and epochs[-1] == self.config.train.epochs

    def nearest_epoch(self, epoch: int) -> int:
        """The checkpoint epoch closest to ``epoch`` (the earlier one on a tie)."""
        epochs = self.epochs
        if not epochs:
            raise RunFolderError(f"{self.path} has no checkpoints yet")
        i = bisect.bisect_left(epochs, epoch)
        candidates = epochs[max(0, i - 1) : i + 1]
        return min(candidates, key=lambda e: (abs(e - epoch), e))

    def state_dict(self, epoch: int) -> dict[str, Tensor]:
        """Weights (float32, classic TransformerLens names) after exactly ``epoch`` updates.

        The file is checked against the manifest (size, sha256) and its tensors against the
        run's config (names, shapes, dtypes): CheckpointError names a file that does not fit.
        """
        tensors = self.store.read_checkpoint(epoch)
        problem = self._misfit(tensors)
        if problem is not None:
            raise CheckpointError(self.store.checkpoint_path(epoch), f"does not fit the run's config: {problem}")
        return tensors

    @cached_property
    def _expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        import torch

        from circuits.model import make_model

        with torch.device("meta"):  # shapes only: no weights drawn
            model = make_model(self.config)
        return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

    def _misfit(self, tensors: dict[str, Tensor]) -> str | None:
        import torch

        from circuits.model import is_buffer_key

        expected = self._expected
        missing = sorted(k for k in expected if k not in tensors and not is_buffer_key(k))
        unknown = sorted(k for k in tensors if k not in expected and not is_buffer_key(k))
        if missing or unknown:
            what = [f"lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []
            what += [f"holds unknown {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}"] if unknown else []
            return "; ".join(what)
        for k, v in tensors.items():
            if is_buffer_key(k):  # rebuilt by the model; ignored when loading
                continue
            shape, dtype = expected[k]
            if tuple(v.shape) != shape or v.dtype != torch.float32:
                return f"{k} is {v.dtype} {tuple(v.shape)}, the run's model needs float32 {shape}"
        return None

    def checkpoint_epoch(self, epoch: int | None = None, exact: bool = False) -> int:
        """The checkpoint epoch that ``model(epoch)`` loads: the last for None, the k-th from the
        end for -k (as a Python index), else ``epoch`` itself or (without ``exact``) the
        nearest checkpoint, with a warning naming both; ``exact`` makes a missing epoch a
        KeyError naming the nearest."""
        epochs = self.epochs
        if not epochs:
            raise RunFolderError(f"{self.path} has no checkpoints yet")
        if epoch is None:
            return epochs[-1]
        if epoch < 0:
            if -epoch > len(epochs):
                raise IndexError(f"{self.path} has {len(epochs)} checkpoints; {epoch} counts past the first")
            return epochs[epoch]
        if epoch in set(epochs):
            return epoch
        near = self.nearest_epoch(epoch)
        if exact:
            raise KeyError(
                f"no checkpoint at epoch {epoch} in {self.path}; nearest is {near} "
                "(call model(epoch) without exact=True to use it)"
            )
        warnings.warn(f"no checkpoint at epoch {epoch}; using the nearest, epoch {near} (model.epoch says "
                      "which; exact=True raises instead)", stacklevel=3)
        return near

    def model(self, epoch: int | None = None, exact: bool = False) -> Model:
        """The hooked model at ``epoch`` (default: the last checkpoint; -k: the k-th from the
        end). An epoch without a checkpoint loads the nearest one with a warning, or raises
        ``KeyError`` with ``exact``; ``model.epoch`` is the epoch loaded."""
        from circuits.model import make_model

        epoch = self.checkpoint_epoch(epoch, exact)
        model = make_model(self.config)
        model.load_state_dict(self.state_dict(epoch))
        model.epoch = epoch
        model.eval()
        return model

    def models(self, epochs: Iterable[int] | None = None) -> Iterator[Model]:
        """The model at each checkpoint (default: all, in order), one module reused: its weights
        are replaced in place between steps, so hold on to ``state_dict()`` copies, not to the
        yielded model, to keep one. ``model.epoch`` says which checkpoint it holds."""
        import torch

        from circuits.model import make_model

        model: Model | None = None
        # The run's own epochs need no lookup (each would re-read the manifest).
        for e in self.epochs if epochs is None else [self.checkpoint_epoch(e) for e in epochs]:
            if model is None:
                model = make_model(self.config)
                model.eval()
            with torch.no_grad():
                model.load_state_dict(self.state_dict(e))
            model.epoch = e
            yield model

    def verify(self) -> list[CheckpointError]:
        """Every damaged checkpoint of the run (empty when all are intact): files that differ
        from the manifest, and files whose tensors do not fit the config."""
        problems = []
        for epoch in self.epochs:
            try:
                self.state_dict(epoch)
            except CheckpointError as e:
                problems.append(e)
        return problems

    def check_split(self) -> str | None:
        """What is wrong with the split file against the config, or None (``circuits info``)."""
        from circuits.tasks import saved_task

        try:
            saved_task(self.config.task, self.store)
        except RunFolderError as e:
            return str(e)
        return None

    def check_metrics(self) -> str | None:
        """What is wrong with ``metrics.csv`` (a row that does not parse, epochs out of order),
        or None. A partial last line from a kill is not damage: the next train rewrites it."""
        try:
            self.store.read_metrics_rows(strict=True)
        except RunFolderError as e:
            return str(e)
        return None

    def check_resume(self) -> str | None:
        """What is wrong with the resume point (unreadable, or not fitting the run: the checks
        a resume makes before it trains on), or None; a run without one has nothing to check."""
        import torch

        from circuits.model import make_model
        from circuits.resume import check_resume

        try:
            point = self.store.read_resume()
            if point is None:
                return None
            with torch.device("meta"):
                model = make_model(self.config)
            check_resume(self.store, self.config, model, *point)
        except RunFolderError as e:
            return str(e)
        return None

    def unindexed(self) -> list[Path]:
        """Checkpoint files the manifest does not list (``circuits reindex`` indexes them)."""
        return self.store.unindexed()

    def reindex(self) -> tuple[list[int], list[str]]:
        """Index the checkpoint files the manifest lacks, holding the run's lock; returns the
        epochs added and a message per file left out (see :meth:`RunStore.reindex`)."""
        with hold_run_folder(self.path, doing="reindexing"):
            return self.store.reindex(check=self._misfit)


def load_run(path: str | Path) -> Run:
    """Open a run folder written by ``circuits train`` or :func:`train`."""
    path = Path(path)
    require_run_dir(path)
    return Run(path)


def default_run_dir(config: RunConfig, root: Path = DEFAULT_RUNS_DIR) -> Path:
    """``checkpoints/<preset>-<config hash>``: the same command finds the same run again.

    The preset's name becomes part of a path, so one that is not a plain folder name (a
    ``"preset": "../../X"`` in a config file) is refused with ConfigError.
    """
    if not is_safe_name(config.preset):
        raise ConfigError(
            f"preset {config.preset!r} cannot name a run folder (letters, digits and ._=+- only, "
            "no '/' or '..'); fix \"preset\" in the config or pass --out"
        )
    return Path(root) / f"{config.preset}-{config.short_hash()}"


def train(
    config: RunConfig,
    out: str | Path | None = None,
    force: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
) -> Run:
    """Train ``config`` (or resume it) into a run folder and return the :class:`Run`.

    ``device``: where the fused engine computes (``"cuda"``; default the CPU).

    ``out`` defaults to :func:`default_run_dir`. A folder holding a different config is
    refused (:class:`~circuits.trainer.RunExistsError`) unless ``force``, which first deletes
    the run's own files there (:func:`circuits.store.clear_run_folder`: never a folder that is
    not a run, never files the run-folder contract does not name).
    """
    from circuits.trainer import train_run, with_init_digest

    config = with_init_digest(config)  # the folder name hashes the weights started from, not a path
    path = Path(out) if out is not None else default_run_dir(config)
    if force:
        clear_run_folder(path, check_only=True)  # before the lock creates anything there
        with hold_run_folder(path):  # no other trainer may be using what is cleared
            clear_run_folder(path)
            train_run(config, RunStore(path), on_step=on_step, device=device)
    else:
        train_run(config, RunStore(path), on_step=on_step, device=device)
    return Run(path)


def train_ensemble(
    configs: Sequence[RunConfig],
    outs: Sequence[str | Path] | None = None,
    force: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
) -> list[Run]:
    """Train several runs as one stacked computation (or resume them); one run folder each.

    The members must share p, the model widths and the schedule; seeds, splits, training-set
    sizes, learning rates, weight decays and the rest may differ (see
    :mod:`circuits.trainer`). ``outs`` defaults to :func:`default_run_dir` per member.
    Each folder is an ordinary run: :func:`load_run`, ``circuits analyze`` and the dashboards
    read it as they read a single run.
    """
    from circuits.trainer import train_stack as _train
    from circuits.trainer import with_init_digest

    configs = [with_init_digest(c) for c in configs]
    paths = [Path(o) for o in outs] if outs is not None else [default_run_dir(c) for c in configs]
    if len(paths) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(paths)} output folders")
    if force:
        for path in paths:  # each checked before any is cleared: a refusal deletes nothing
            clear_run_folder(path, check_only=True)
        with hold_run_folders(paths):
            for path in paths:
                clear_run_folder(path)
            _train(configs, [RunStore(p) for p in paths], on_step=on_step, device=device)
    else:
        _train(configs, [RunStore(p) for p in paths], on_step=on_step, device=device)
    return [Run(p) for p in paths]

