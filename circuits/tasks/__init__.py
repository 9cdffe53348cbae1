"""Tasks: the tables the network learns, behind one interface (:class:`Task`).

``base`` is the interface and the seeded split every task shares; ``modular`` holds the binary
operations over Z_p, ``permutation`` those over S5 (Power et al. 2022) and ``mixture`` an operation
with a memorisation task mixed in (Huang et al. 2024). A new task is a module here: its table, its layout
properties in :class:`circuits.config.TaskConfig`, and (where it has one) its Fourier basis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from circuits.config import S5_OPS, TaskConfig
from circuits.errors import RunFolderError
from circuits.tasks.base import (
    FourierView,
    SplitError,
    Task,
    ViewTable,
    corrupt_labels,
    make_split,
    split_problem,
)
from circuits.tasks.modular import OPERATIONS, ModularTask, primitive_root
from circuits.tasks.modular import make_grid as modular_grid
from circuits.tasks.mixture import MixtureTask, mixture_grid
from circuits.tasks.permutation import PermutationTask, permutation_grid

__all__ = [
    "Task",
    "ModularTask",
    "PermutationTask",
    "MixtureTask",
    "FourierView",
    "ViewTable",
    "fourier_view",
    "as_view",
    "TaskLike",
    "primitive_root",
    "make_task",
    "make_grid",
    "make_split",
    "OPERATIONS",
    "SplitError",
    "split_problem",
    "task_from_saved_split",
    "saved_task",
    "task_class",
]


def task_class(config: TaskConfig) -> type[Task]:
    """The :class:`Task` subclass that :func:`make_task` builds for ``config`` (its class
    attributes and class methods, such as :meth:`Task.view_of`, are known before the table is
    built)."""
    if config.mix_mem:
        return MixtureTask
    return PermutationTask if config.op in S5_OPS else ModularTask


def make_grid(config: TaskConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens ``[pairs, n_ctx]``, labels and validity of the task over its canonical grid (no
    split), whatever the task."""
    if config.mix_mem:
        return mixture_grid(config)
    return permutation_grid(config) if config.op in S5_OPS else modular_grid(config)


TaskLike = Union[int, Task, TaskConfig, FourierView]
"""What a measure function takes for its task: a :class:`Task`, its config, its
:class:`FourierView`, or for modular addition its p (``p=`` kept from 0.1)."""


def as_view(task: TaskLike) -> FourierView:
    """The Fourier view the measure functions read for ``task``; a ValueError naming the
    reason when the task has none."""
    if isinstance(task, FourierView):
        return task
    if isinstance(task, bool) or not isinstance(task, (int, Task, TaskConfig)):
        raise TypeError(f"expected a task, its config, its FourierView or p, got {type(task).__name__}")
    if isinstance(task, int):
        return FourierView.cyclic(task)
    config = task.config if isinstance(task, Task) else task
    view = fourier_view(config)
    if view is None:
        raise ValueError(f"no Fourier measure applies: {task_class(config).no_view_reason(config)}")
    return view


def fourier_view(config: TaskConfig) -> FourierView | None:
    """The Fourier view of the task ``config`` describes (None: the Fourier measures do not
    apply, :meth:`Task.no_view_reason` says why)."""
    return task_class(config).view_of(config)


def make_task(
    config: TaskConfig,
    train_idx: Tensor | None = None,
    test_idx: Tensor | None = None,
) -> Task:
    """Build the task of ``config``; pass saved split indices to reuse them rather than
    re-derive them (a split that does not fit raises :class:`SplitError`)."""
    tokens, labels, valid = make_grid(config)
    if train_idx is None or test_idx is None:
        train_idx, test_idx = make_split(config, valid)
    else:
        problem = split_problem(config, valid, train_idx, test_idx)
        if problem is not None:
            raise SplitError(problem)
    noisy, noisy_idx = corrupt_labels(config, labels, train_idx, config.n_classes)
    return task_class(config)(config, tokens, noisy, valid, train_idx, test_idx, noisy_idx, labels)


def saved_task(config: TaskConfig, store: Any) -> Task:
    """The task of a run folder (a :class:`circuits.store.RunStore`) with its saved split and
    corrupted-label pairs, never re-derived; RunFolderError names the split file when they do
    not fit ``config``."""
    train_idx, test_idx = store.read_split()
    return task_from_saved_split(config, train_idx, test_idx, store.split_path, store.read_noisy())


def task_from_saved_split(
    config: TaskConfig, train_idx: Tensor, test_idx: Tensor, path: Path, noisy_idx: Tensor | None = None
) -> Task:
    """:func:`make_task` with a run's saved split; RunFolderError names ``path`` when it does
    not fit ``config`` (including saved corrupted-label indices that the config would not
    corrupt)."""
    try:
        task = make_task(config, train_idx, test_idx)
        saved = noisy_idx if noisy_idx is not None else torch.zeros(0, dtype=torch.long)
        if not torch.equal(saved, task.noisy_idx):
            raise SplitError(f"its {len(saved)} corrupted-label pairs are not the {len(task.noisy_idx)} "
                             f"that label_noise = {config.label_noise} corrupts")
        return task
    except SplitError as e:
        raise RunFolderError(
            f"split file {path} does not fit the run's config: {e}; restore the run's own split "
            "file, or retrain with --force"
        ) from None
