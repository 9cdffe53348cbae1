"""Train many runs as one stacked computation; each member writes its own ordinary run folder.

Members share shapes (p and the model widths) and the schedule (epochs, checkpoints, logging)
and may differ in everything else: seeds, split, training-set size, operation, random labels,
learning rate, weight decay, betas, warm-up. Each member's batch is padded to the largest
training set with zero-weight rows, and its loss is its own mean cross-entropy (float64
log-softmax), so no member's gradient depends on another's. A single fused run is an
ensemble of one: ``circuits train`` goes through this same loop.

Crash safety is the single run's: each member's folder gets its checkpoint, metrics and resume
point at every checkpoint epoch. A kill between two members' writes leaves them one checkpoint
apart; on resume the members that lag train alone until they catch up, then all go on together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine.fused import stacked_last_logits
from circuits.engine.loss import stacked_loss
from circuits.engine.memory import keep_freed_memory
from circuits.engine.stacked import StackedAdamW, check_stackable, member_state, stack_models
from circuits.engine.step import TrainStep
from circuits.errors import TrainingDiverged
from circuits.lock import hold_run_folders
from circuits.model import Transformer, make_model
from circuits.resume import check_resume
from circuits.store import RunStore, is_buffer_key, removed_if_not_started
from circuits.tasks import Task
from circuits.trainer import (
    StepInfo,
    TrainingInterrupted,
    deterministic,
    finished_model,
    initial_model,
    prepare_store,
    sigint_flag,
    split_metrics,
    with_init_digest,
)

__all__ = ["train_ensemble", "stacked_loss", "evaluate_stack", "resolve_device"]

#: Bytes of MLP activations one evaluation chunk may hold; members are evaluated in chunks.
EVAL_CHUNK_BYTES = 256 * 2**20


@dataclass
class _Member:
    config: RunConfig
    store: RunStore
    task: Task
    model: Transformer
    opt_tensors: dict[str, Tensor]
    epoch: int
    diverged: int | None = None
    """The logged epoch whose train loss was not finite: the member trains no further, and its
    folder keeps its last finite checkpoint and resume point."""


def resolve_device(device: str | torch.device | None, engine: str = "fused") -> torch.device:
    """The torch device to train on (default CPU); a clear error when it is not available, or
    when it is not the CPU and ``engine`` is not the fused one (the hooked model trains on CPU).

    On CUDA, deterministic mode needs cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG), set
    here when the user has not chosen one, before the first cuBLAS call reads it.
    """
    try:
        dev = torch.device("cpu" if device is None else device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use cpu or cuda[:N]") from None
    if dev.type != "cpu" and engine != "fused":
        raise ValueError(f"device {str(dev)!r} needs the fused engine; the reference engine runs on the CPU")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} requested but this torch build sees no CUDA GPU; "
                             "use --device cpu")
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(dev)!r} is not supported; use cpu or cuda[:N]")
    return dev


@torch.no_grad()
def evaluate_stack(
    params: dict[str, Tensor], tasks: Sequence[Task], act_fn: str
) -> list[dict[str, float]]:
    """Each member's train/test loss (float64) and accuracy over its own split of the full grid."""
    grid = tasks[0].tokens.to(next(iter(params.values())).device)
    d_mlp = params["blocks.0.mlp.W_in"].shape[-1]
    chunk = max(1, EVAL_CHUNK_BYTES // (grid.shape[0] * d_mlp * 4))
    out: list[dict[str, float]] = []
    for lo in range(0, len(tasks), chunk):
        sub = {k: v[lo : lo + chunk] for k, v in params.items()}
        n = next(iter(sub.values())).shape[0]
        logits = stacked_last_logits(sub, grid.expand(n, -1, -1), act_fn)
        out += [split_metrics(logits[i], tasks[lo + i]) for i in range(n)]
    return out


def train_ensemble(
    configs: Sequence[RunConfig],
    stores: Sequence[RunStore],
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | torch.device | None = None,
) -> list[Transformer]:
    """Train (or resume) every config into its store as one stacked computation.

    Returns the members' models after the last epoch. ``on_step`` gets a :class:`StepInfo` after
    each update whose ``metrics`` are the first member's and ``member_metrics`` everyone's.
    ``device`` (default CPU) is where the stacked weights, optimizer state and batches live;
    the run folders are written from CPU copies, so they are the same files either way.
    """
    if len(configs) != len(stores):
        raise ValueError(f"{len(configs)} configs but {len(stores)} run folders")
    configs = [with_init_digest(c) for c in configs]
    check_stackable(configs)
    dev = resolve_device(device)
    keep_freed_memory()
    if len({s.root.resolve() for s in stores}) != len(stores):
        raise ValueError("two members share one run folder; give each member its own")
    done = [finished_model(c, s) for c, s in zip(configs, stores)]
    if all(m is not None for m in done):  # a rerun of finished runs writes nothing
        return done  # type: ignore[return-value]
    # One trainer per folder: a second is refused, naming the first (circuits.lock).
    with removed_if_not_started([s.root for s in stores]), \
            hold_run_folders([s.root for s in stores]), deterministic():
        members = [_open_member(c, s) for c, s in zip(configs, stores)]
        epochs = configs[0].train.epochs
        with sigint_flag() as interrupted:
            while True:
                todo = [m for m in members if m.epoch < epochs and m.diverged is None]
                if not todo:
                    break
                lo = min(m.epoch for m in todo)
                group = [m for m in todo if m.epoch == lo]
                ahead = [m.epoch for m in todo if m.epoch > lo]
                _train_segment(group, lo, min(ahead, default=epochs), on_step, interrupted, dev)
    lost = {str(m.store.root): (m.diverged, m.epoch) for m in members if m.diverged is not None}
    if lost:  # raised once every other member has finished
        raise TrainingDiverged(lost)
    return [m.model for m in members]


def _open_member(config: RunConfig, store: RunStore) -> _Member:
    task = prepare_store(config, store)
    resume = store.read_resume()
    # A resumed member's weights come from its resume point: its init_from file may be gone.
    model = make_model(config) if resume is not None else initial_model(config)
    epoch, opt_tensors = 0, {}
    if resume is not None:
        tensors, meta = resume
        check_resume(store, config, model, tensors, meta)
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(weights, strict=False)
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("opt.")}
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        epoch = int(meta["epoch"])
        store.truncate_metrics(epoch)
    else:
        store.truncate_metrics(-1)
    return _Member(config, store, task, model, opt_tensors, epoch)


def _batches(members: Sequence[_Member]) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked training inputs, labels and loss weights, padded to the largest training set."""
    n_max = max(len(m.task.train_idx) for m in members)
    xs, ys, ws = [], [], []
    for m in members:
        x, y = m.task.train_data()
        pad = n_max - len(y)
        xs.append(torch.cat([x, x[:1].expand(pad, -1)]))
        ys.append(torch.cat([y, y[:1].expand(pad)]))
        w = torch.full((n_max,), 1.0 / len(y), dtype=torch.float64)
        w[len(y) :] = 0.0
        ws.append(w)
    return torch.stack(xs), torch.stack(ys), torch.stack(ws)


def _train_segment(
    members: list[_Member],
    start: int,
    stop: int,
    on_step: Callable[[StepInfo], None] | None,
    interrupted: list[bool],
    device: torch.device,
) -> None:
    configs = [m.config for m in members]
    act_fn = configs[0].model.act_fn
    train = configs[0].train
    params = stack_models([m.model for m in members], device)
    opt = StackedAdamW(params, configs)
    for i, m in enumerate(members):
        opt.load_member(i, m.opt_tensors)
    x, y, w = (t.to(device) for t in _batches(members))
    tasks = [m.task for m in members]
    pending: list[list[dict[str, float | int]]] = [[] for _ in members]

    def save(epoch: int, checkpoint: bool) -> None:
        for i, m in enumerate(members):
            if m.diverged is not None:
                continue
            weights = member_state(params, i)
            if checkpoint:
                m.store.write_checkpoint(epoch, weights)
            m.store.append_metrics(pending[i])
            pending[i].clear()
            resume = {f"model.{k}": v for k, v in weights.items() if not is_buffer_key(k)}
            resume.update(opt.member_tensors(i))
            resume["rng.torch"] = torch.get_rng_state()
            m.store.write_resume(resume, {"epoch": epoch, "step": epoch, "engine": "fused"})
            m.epoch = epoch

    def sync_back(epoch: int) -> None:
        for i, m in enumerate(members):
            if m.diverged is not None:
                continue
            m.model.load_state_dict(member_state(params, i), strict=False)
            m.opt_tensors = opt.member_tensors(i)
            m.epoch = epoch

    def log(epoch: int) -> list[dict[str, float | int]]:
        rows = [{"epoch": epoch, **r} for r in evaluate_stack(params, tasks, act_fn)]
        for i, row in enumerate(rows):
            if members[i].diverged is None and not math.isfinite(row["train_loss"]):
                # Its rows since the last save are dropped with it: the folder stays at the
                # resume point. The others go on (a NaN member leaves their arithmetic alone).
                members[i].diverged = epoch
                pending[i].clear()
            if members[i].diverged is None:
                pending[i].append(row)
        return rows

    if start == 0:
        rows = log(0)
        save(0, checkpoint=True)
        if on_step:
            on_step(StepInfo(0, train.epochs, rows[0], 0, tuple(rows)))

    step = TrainStep(params, opt, x, y, w, act_fn)  # a CUDA graph on a GPU
    for epoch in range(start + 1, stop + 1):
        step()
        is_ckpt = train.is_checkpoint(epoch)
        rows = None
        if is_ckpt or epoch % train.log_every == 0:
            rows = log(epoch)
        if is_ckpt:
            save(epoch, checkpoint=True)
        if on_step:
            on_step(StepInfo(epoch, train.epochs, rows[0] if rows else None, start,
                             tuple(rows) if rows else None))
        if interrupted[0]:
            if not is_ckpt:
                save(epoch, checkpoint=False)
            sync_back(epoch)
            raise TrainingInterrupted(epoch)
        if all(m.diverged is not None for m in members):
            return
    sync_back(stop)
