"""The resume point is checked completely before a run goes on from it (issue 19, item 3).

A resume file that does not fit used to be loaded anyway (``strict=False``, moments optional):
a checkpoint copied over it made a stopped run restart from the initialisation and exit 0 with
other weights, and a tensor of the wrong shape gave a traceback. :func:`check_resume` refuses by
name, with the fix, anything that does not fit the run: its names, shapes and dtypes against the
model and the optimiser, its epoch and engine against the config, its place against the
checkpoints the manifest records and the metrics table, and its weights against the checkpoint
of the same epoch when there is one. Both engines' loops call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine.optim import NORM_TARGET_KEY, moment_names, state_names
from circuits.errors import RunFolderError
from circuits.model import Model
from circuits.model import is_buffer_key
from circuits.store import RESUME_FILE, RESUME_META_FILE, RunStore, checkpoint_epoch

__all__ = ["check_resume"]

def _refuse(store: RunStore, problem: str) -> RunFolderError:
    return RunFolderError(
        f"resume file {store.root / RESUME_FILE} does not fit this run: {problem}; delete "
        f"{RESUME_FILE} and {RESUME_META_FILE} to train again from the last state that fits "
        "(epoch 0), or use --force"
    )


def _check_tensor(store: RunStore, key: str, got: Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
    if got.shape != shape or got.dtype != dtype:
        raise _refuse(store, f"{key} is {got.dtype} {tuple(got.shape)}, the run needs {dtype} {tuple(shape)}")


def check_resume(
    store: RunStore, config: RunConfig, model: Model,
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
) -> int:
    """Validate a resume point against the run; return its epoch. Raises RunFolderError."""
    epoch = meta.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= config.train.epochs:
        raise _refuse(store, f"its epoch {epoch!r} is not one of this run's 0..{config.train.epochs}")
    if meta.get("engine", config.train.engine) != config.train.engine:
        raise _refuse(store, f"it was written by the {meta['engine']!r} engine, the run uses "
                             f"{config.train.engine!r}")
    weights = {k: v for k, v in model.state_dict().items() if not is_buffer_key(k)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moments = moment_names(config.train)
    states = {f"opt.{n}.{m}" for n in trainable for m in state_names(config.train)}
    expected = {f"model.{k}" for k in weights} | {"rng.torch"}
    if epoch > 0:
        expected |= states
        if config.train.constrain_norm:
            expected.add(NORM_TARGET_KEY)
    optional = states | {NORM_TARGET_KEY}
    missing = sorted(expected - set(tensors))
    unknown = sorted(set(tensors) - expected - optional)
    if missing or unknown:
        what = [f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"] if missing else []
        what += [f"unknown {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}"] if unknown else []
        raise _refuse(store, "; ".join(what))
    for k, v in weights.items():
        _check_tensor(store, f"model.{k}", tensors[f"model.{k}"], v.shape, v.dtype)
    for n in trainable:
        p = weights[n]
        for m in moments:
            if f"opt.{n}.{m}" in tensors:
                _check_tensor(store, f"opt.{n}.{m}", tensors[f"opt.{n}.{m}"], p.shape, p.dtype)
        if f"opt.{n}.grokfast_ema" in tensors:
            _check_tensor(store, f"opt.{n}.grokfast_ema", tensors[f"opt.{n}.grokfast_ema"], p.shape, p.dtype)
        if f"opt.{n}.grokfast_ma" in tensors:
            # Up to ``window`` gradients, oldest first: as many as updates taken.
            kept = min(epoch, config.train.grokfast_window)
            _check_tensor(store, f"opt.{n}.grokfast_ma", tensors[f"opt.{n}.grokfast_ma"],
                          torch.Size((kept, *p.shape)), p.dtype)
        step = tensors.get(f"opt.{n}.step")
        if step is not None and (step.numel() != 1 or not step.is_floating_point() or float(step) != epoch):
            raise _refuse(store, f"opt.{n}.step is {step.tolist()}, not the resume epoch {epoch}")
    target = tensors.get(NORM_TARGET_KEY)
    if target is not None and (target.numel() != 1 or target.dtype != torch.float64 or not float(target) > 0):
        raise _refuse(store, f"{NORM_TARGET_KEY} is not a positive float64 norm")
    if tensors["rng.torch"].dtype != torch.uint8 or tensors["rng.torch"].dim() != 1:
        raise _refuse(store, "rng.torch is not a torch RNG state")
    _check_place(store, config, epoch, tensors)
    return epoch


def _check_place(store: RunStore, config: RunConfig, epoch: int, tensors: Mapping[str, Tensor]) -> None:
    """The resume point against the checkpoints and the metrics that a save writes with it."""
    schedule = config.train.checkpoint_epochs
    # A save writes the checkpoint, then the metrics, then the resume point: a kill in between
    # leaves at most the next scheduled checkpoint after the resume point.
    after = [e for e in schedule if e > epoch]
    limit = after[0] if after else epoch
    # A checkpoint file the manifest does not list at or before the resume point is not the
    # trace of a kill (that leaves at most the next scheduled one): the manifest was deleted or
    # damaged, and training on would index only the new checkpoints.
    store.read_manifest()  # a damaged manifest is named as such (before its files look unlisted)
    lost = [f.name for f in store.unindexed() if (checkpoint_epoch(f.name) or 0) <= epoch]
    if lost:
        raise RunFolderError(
            f"{store.root} holds checkpoint files its manifest does not list ({', '.join(lost[:3])}"
            f"{' ...' if len(lost) > 3 else ''}); run `circuits reindex {store.root}` to index them, "
            "then rerun"
        )
    # Checkpoints recorded and present (a recorded file that is gone is damage for `info`).
    recorded = [e for e in store.checkpoint_epochs() if store.checkpoint_path(e).is_file()]
    if recorded and recorded[-1] > limit:
        raise _refuse(store, f"it is at epoch {epoch} but the folder has a checkpoint at epoch "
                             f"{recorded[-1]}: it is an older resume file than the checkpoints")
    if epoch in recorded:
        saved = store.read_checkpoint(epoch)
        for k, v in saved.items():
            if not torch.equal(tensors[f"model.{k}"], v):
                raise _refuse(store, f"its weights differ from checkpoint {epoch}'s ({k})")
    log_every = config.train.log_every
    last_logged = next(e for e in range(epoch, -1, -1) if config.train.is_checkpoint(e) or e % log_every == 0)
    rows = {int(r["epoch"]) for r in store.read_metrics_rows(strict=True)}
    if last_logged not in rows:
        raise _refuse(store, f"it is at epoch {epoch} but metrics.csv has no row for epoch "
                             f"{last_logged}, which was logged before it")
