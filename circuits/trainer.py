"""The training loop: full-batch AdamW with weight decay (Nanda et al. 2023).

One loop for every run: it drives a *step* over a stack of members (a single run is a stack of
one), the fused stack (:class:`circuits.engine.ensemble.FusedStack`) or the hooked reference
model (:class:`circuits.engine.hooked.HookedStep`), and owns everything around the update:
opening and checking each member's folder, the resume codec (:func:`resume_tensors`,
:func:`_open_member`), saving, logging, Ctrl-C and divergence. A stateful training option is
saved and restored here once, for both engines. It takes configs, stores and an ``on_step``
callback and prints nothing; the CLI owns the terminal. (The module is ``trainer`` rather than
``train`` so that ``circuits.train``, the library function, is never shadowed.)

Crash safety: each member's folder gets its checkpoint, metrics and resume point at every
checkpoint epoch. A kill between two members' writes leaves them one checkpoint apart; on
resume the members that lag train alone until they catch up, then all go on together.

Determinism: no randomness is drawn after initialisation (full batch, no dropout), AdamW runs
its single-tensor path, and the resume point holds the weights, both moments and the step
count, so an interrupted run resumed on the same machine ends bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.deterministic
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine.ensemble import FusedStack, resolve_device
from circuits.engine.hooked import HookedStep, evaluate, last_position_logits, model_weights
from circuits.engine.loss import loss_fn, split_metrics
from circuits.engine.memory import keep_freed_memory
from circuits.engine.stacked import check_stackable, warmup_lr
from circuits.engine.subnormal import flush_subnormals
from circuits.errors import TrainingDiverged
from circuits.lock import hold_run_folders
from circuits.model import Model, make_model
from circuits.resume import check_resume
from circuits.store import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    SOURCE_FILE,
    RunFolderError,
    RunStore,
    file_sha256,
    read_safetensors,
    removed_if_not_started,
)
from circuits.tasks import Task, make_task, saved_task

__all__ = ["StepInfo", "TrainingInterrupted", "RunExistsError", "train_run", "train_stack", "evaluate",
           "loss_fn", "split_metrics", "last_position_logits", "lr_at", "initial_model", "with_init_digest",
           "resume_tensors", "resume_weights"]


class RunExistsError(RunFolderError):
    """The output folder already holds a run with a different config."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training after the state was saved; rerun to resume."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        super().__init__(f"interrupted at epoch {epoch}; state saved")


@dataclass(frozen=True)
class StepInfo:
    """What ``on_step`` receives after each update: the epoch reached and fresh metrics, if any."""

    epoch: int
    epochs: int
    metrics: dict[str, float | int] | None
    start_epoch: int
    member_metrics: tuple[dict[str, float | int], ...] | None = None
    """In an ensemble: every member's fresh metrics (``metrics`` is the first member's)."""
    member_names: tuple[str, ...] | None = None
    """The run folders' names of the members being trained, in the order of ``member_metrics``
    (loggers file each member's metrics under its name)."""


def lr_at(config: RunConfig, update: int) -> float:
    """Learning rate of update number ``update`` (0-based): linear warm-up, then constant.

    As the official code's ``LambdaLR(min(step / warmup, 1))``: the first update has lr 0. The
    schedule is :func:`circuits.engine.stacked.warmup_lr`, the one both engines run.
    """
    f64 = torch.float64
    t = config.train
    return float(warmup_lr(torch.tensor(t.lr, dtype=f64), torch.tensor(float(t.warmup_steps), dtype=f64),
                           torch.tensor(float(update), dtype=f64)))


def resume_tensors(weights: dict[str, Tensor], optimizer: dict[str, Tensor]) -> dict[str, Tensor]:
    """A member's resume point in the run folder's layout: ``model.<param>``, the optimizer's
    ``opt.<param>.<moment|step|grokfast state>`` (circuits.engine.optim.state_names), the norm
    target of a constrained run and the torch RNG state (``rng.torch``).

    Read back by :func:`_open_member`; the one codec of both engines.
    """
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors.update(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def resume_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's weights of a resume point written by :func:`resume_tensors`."""
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


@contextmanager
def callers_rng() -> Iterator[None]:
    """The caller's torch generator state again after training (the run's own state is seeded
    from its config and saved in its resume file; a notebook's draws are not moved by it)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


@contextmanager
def deterministic(flush: bool = True) -> Iterator[None]:
    """Deterministic kernels for the duration of training, then the caller's setting again.

    On a multi-core CPU the backward of an embedding lookup (``index_put_`` with accumulate)
    adds rows from several threads in a racy order, so two runs of the same config differed in
    the last bits of W_E and W_pos after one step and visibly after a few hundred (measured).
    Deterministic mode serialises it at no measurable cost for these sizes.

    With ``flush`` (as training runs), float32 subnormals are flushed to zero on every
    computing thread too (:func:`circuits.engine.subnormal.flush_subnormals`): after
    memorisation they made each step several times slower on CPUs that take a slow path for
    them, and flushing on every thread keeps the bits thread-invariant.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # Deterministic mode also fills every torch.empty with NaN, a debugging aid for reads of
    # uninitialised memory: one extra kernel per allocation, which no result here depends on.
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with flush_subnormals() if flush else nullcontext():
            yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@contextmanager
def sigint_flag() -> Iterator[list[bool]]:
    """Turn Ctrl-C into a flag checked between epochs, so the saved state is never half-updated."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_store(config: RunConfig, store: RunStore) -> Task:
    """Create the run folder (config, split) or check that it holds this same config."""
    if store.exists():
        store.remove_orphan_temps()  # under the lock: no other write is in flight
        existing = store.read_config()
        if existing.science_dict != config.science_dict:
            diff = _config_diff(existing, config)
            raise RunExistsError(
                f"{store.root} holds a run with a different config ({diff}); "
                "use another --out, or --force to overwrite it"
            )
        return saved_task(config.task, store)
    store.root.mkdir(parents=True, exist_ok=True)
    task = make_task(config.task)
    store.write_split(task.train_idx, task.test_idx, task.noisy_idx)
    # The config is written last: a folder with config.json is a run with a split.
    store.write_config(config)
    return task


def with_init_digest(config: RunConfig) -> RunConfig:
    """``config`` with ``train.init_sha256`` filled in from its ``init_from`` file.

    Unchanged when there is no ``init_from``, when the digest is already known, or when the file
    is not there to read (a resumed run does not need it; a fresh one reports it missing).
    """
    t = config.train
    if t.init_from is None or t.init_sha256 is not None or not Path(t.init_from).is_file():
        return config
    return config.replace(init_sha256=file_sha256(Path(t.init_from)))


def initial_model(config: RunConfig) -> Model:
    """The model at epoch 0: the seeded initialisation, or the weights of ``train.init_from``.

    A checkpoint inside a run folder is read through that run's manifest, so a damaged parent
    is named rather than silently continued from (Varma et al. 2023 continue a grokked network
    on a smaller training set: ungrokking). With ``train.init_sha256`` set, a file whose bytes
    have another digest (the parent was retrained or replaced) is refused by name.
    """
    model = make_model(config)
    source = config.train.init_from
    if source is None:
        return model
    want = config.train.init_sha256
    if want is not None and Path(source).is_file() and file_sha256(Path(source)) != want:
        raise RunFolderError(
            f"init_from {source} is not the checkpoint this run started from (sha256 {want[:12]}...); "
            "restore that file, or train a new run from this one"
        )
    weights = read_weights_file(Path(source))
    own = model_weights(model)
    missing = sorted(set(own) - set(weights))
    if missing:
        raise RunFolderError(f"init_from {source} lacks {missing[0]}; is it a checkpoint of this model?")
    for key, value in own.items():
        if weights[key].shape != value.shape:
            raise RunFolderError(
                f"init_from {source}: {key} has shape {tuple(weights[key].shape)}, this config needs "
                f"{tuple(value.shape)}; use a checkpoint of a run with the same p and widths"
            )
    model.load_state_dict({k: weights[k] for k in own}, strict=False)
    return model


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """A checkpoint file's weights, checked against its run's manifest when it lives in one."""
    if not path.is_file():
        raise RunFolderError(f"checkpoint {path} does not exist; give init_from a checkpoint file")
    root = path.parent.parent
    if path.parent.name == CHECKPOINT_DIR and (root / CONFIG_FILE).is_file():
        store = RunStore(root)
        epoch = next((e for e in store.checkpoint_epochs() if store.checkpoint_path(e).name == path.name), None)
        if epoch is not None:
            return store.read_checkpoint(epoch)
    return read_safetensors(path, "checkpoint")


def _config_diff(a: RunConfig, b: RunConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    diffs = []
    for section in ("task", "model", "train"):
        for key in da[section]:
            if key == "init_from" and None not in (da["train"]["init_sha256"], db["train"]["init_sha256"]):
                continue  # the digests identify the weights; the paths may differ
            if da[section][key] != db[section][key]:
                diffs.append(f"{key}: {da[section][key]!r} there, {db[section][key]!r} here")
    return "; ".join(diffs) or "different"


def finished_model(config: RunConfig, store: RunStore) -> Model | None:
    """The final model of a run in ``store`` that has already finished ``config``, or None.

    Checked as a resume is (the config, the split, the resume point against the checkpoints and
    the metrics), and nothing is written: a rerun of a finished run leaves its folder as it is,
    and works on a folder that is read-only (issue 19, item 11). A run that does not pass the
    checks is left to the trainer, which refuses it by name under the lock.
    """
    if not store.exists() or store.read_config().science_dict != config.science_dict:
        return None
    resume = store.read_resume()
    if resume is None or resume[1].get("epoch") != config.train.epochs:
        return None
    saved_task(config.task, store)
    model = make_model(config)
    tensors, meta = resume
    check_resume(store, config, model, tensors, meta)
    model.load_state_dict(resume_weights(tensors), strict=False)
    return model



def train_run(
    config: RunConfig,
    store: RunStore,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
) -> Model:
    """Train ``config`` into ``store``, resuming from its last resume point if it has one.

    Saves a checkpoint (float32 safetensors) at every epoch of the schedule, logs metrics every
    ``log_every`` epochs and at every checkpoint, and replaces the resume point at each
    checkpoint. Ctrl-C saves the current state and raises :class:`TrainingInterrupted`.
    Returns the model after the last epoch. ``device`` (fused engine only): where the
    computation runs, e.g. ``"cuda"`` (default: the CPU). A stack of one: :func:`train_stack`.
    """
    return train_stack([config], [store], on_step, device)[0]


@dataclass
class _Member:
    config: RunConfig
    store: RunStore
    task: Task
    model: Model
    opt_tensors: dict[str, Tensor]
    epoch: int
    diverged: int | None = None
    """The logged epoch whose train loss was not finite: the member trains no further, and its
    folder keeps its last finite checkpoint and resume point."""


def train_stack(
    configs: Sequence[RunConfig],
    stores: Sequence[RunStore],
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | torch.device | None = None,
) -> list[Model]:
    """Train (or resume) every config into its store, all members in one step; returns the
    members' models after the last epoch.

    Fused members (``engine = "fused"``) share one stacked computation; they must share shapes
    and the schedule (:func:`circuits.engine.stacked.check_stackable`). The reference engine
    trains one run at a time. ``on_step`` gets a :class:`StepInfo` after each update whose
    ``metrics`` are the first member's and ``member_metrics`` everyone's. ``device`` (fused
    only; default CPU) is where the step computes; the run folders are written from CPU copies,
    so they are the same files either way.

    A member whose train loss becomes non-finite stops at its last finite checkpoint and is
    marked diverged in its ``resume.json``; the others go on, and :class:`TrainingDiverged` is
    raised once they have finished. A rerun does not train a marked member again: it raises
    again, until the folder is replaced with ``--force`` (design.md, "Divergence").
    """
    if len(configs) != len(stores):
        raise ValueError(f"{len(configs)} configs but {len(stores)} run folders")
    configs = [with_init_digest(c) for c in configs]
    engine = configs[0].train.engine
    if engine == "fused":
        check_stackable(configs)
    elif len(configs) != 1:
        raise ValueError("the reference engine trains one run at a time; use the fused engine for a stack")
    dev = resolve_device(device, engine)
    keep_freed_memory()
    for s in stores:
        if (s.root / SOURCE_FILE).exists():
            raise RunFolderError(f"{s.root} is an imported run ({SOURCE_FILE}): it analyses but does not "
                                 "train; train into another --out")
    if len({s.root.resolve() for s in stores}) != len(stores):
        raise ValueError("two members share one run folder; give each member its own")
    done = [finished_model(c, s) for c, s in zip(configs, stores)]
    if all(m is not None for m in done):  # a rerun of finished runs writes nothing
        return done  # type: ignore[return-value]
    lost = {i: _diverged_before(c, s) for i, (c, s) in enumerate(zip(configs, stores))}
    lost = {i: mark for i, mark in lost.items() if mark is not None}
    open_ = [i for i, m in enumerate(done) if m is None and i not in lost]  # finished: not touched
    # One trainer per folder: a second is refused, naming the first (circuits.lock).
    # enable_grad: a notebook's usual first line, torch.set_grad_enabled(False), must not
    # break training (it did, leaving a folder with epoch 0 only).
    with removed_if_not_started([stores[i].root for i in open_]), \
            hold_run_folders([stores[i].root for i in open_]), deterministic(), torch.enable_grad(), \
            callers_rng():
        members = [_open_member(configs[i], stores[i]) for i in open_]
        epochs = configs[0].train.epochs
        try:
            with sigint_flag() as interrupted:
                while True:
                    todo = [m for m in members if m.epoch < epochs and m.diverged is None]
                    if not todo:
                        break
                    lo = min(m.epoch for m in todo)
                    group = [m for m in todo if m.epoch == lo]
                    ahead = [m.epoch for m in todo if m.epoch > lo]
                    _train_segment(group, lo, min(ahead, default=epochs), on_step, interrupted, dev)
        finally:  # also when Ctrl-C stops the others after a member diverged
            for m in members:
                if m.diverged is not None:
                    m.store.mark_diverged(m.diverged, m.config.train.lr)
    runs = {str(stores[i].root): (mark["epoch"], resume_epoch(stores[i])) for i, mark in lost.items()}
    lrs = {str(stores[i].root): float(mark["lr"]) for i, mark in lost.items()}
    for m in members:
        if m.diverged is not None:
            runs[str(m.store.root)] = (m.diverged, m.epoch)
            lrs[str(m.store.root)] = m.config.train.lr
    if runs:  # raised once every other member has finished
        raise TrainingDiverged(runs, lrs)
    models = list(done)
    for i, m in zip(open_, members):
        models[i] = m.model
    return models  # type: ignore[return-value]


def _diverged_before(config: RunConfig, store: RunStore) -> dict | None:
    """The divergence mark of a folder that holds this same run, or None (train it)."""
    if not store.exists() or store.read_config().science_dict != config.science_dict:
        return None  # a folder of another config is refused by name when it is opened
    return store.diverged()


def _open_member(config: RunConfig, store: RunStore) -> _Member:
    """Create or check the member's folder and read its resume point (the codec's reader)."""
    task = prepare_store(config, store)
    resume = store.read_resume()
    # A resumed member's weights come from its resume point: its init_from file may be gone.
    model = make_model(config) if resume is not None else initial_model(config)
    epoch, opt_tensors = 0, {}
    if resume is not None:
        tensors, meta = resume
        check_resume(store, config, model, tensors, meta)
        model.load_state_dict(resume_weights(tensors), strict=False)
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("opt.")}
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        epoch = int(meta["epoch"])
        store.truncate_metrics(epoch)
    else:
        store.truncate_metrics(-1)
        # What training draws from torch's generator (dropout) starts from the run's seed, so
        # the same config gives the same weights; a resume point restores it (rng.torch).
        torch.manual_seed(config.model.seed)
    return _Member(config, store, task, model, opt_tensors, epoch)


def _make_step(members: list[_Member], device: torch.device) -> FusedStack | HookedStep:
    if members[0].config.train.engine == "fused":
        return FusedStack([m.model for m in members], [m.config for m in members],
                          [m.opt_tensors for m in members], [m.task for m in members], device)
    (m,) = members
    return HookedStep(m.model, m.config, m.task, m.opt_tensors, updates=m.epoch)


def _train_segment(
    members: list[_Member],
    start: int,
    stop: int,
    on_step: Callable[[StepInfo], None] | None,
    interrupted: list[bool],
    device: torch.device,
) -> None:
    """Train ``members``, all at epoch ``start``, up to epoch ``stop`` (or an interrupt)."""
    train = members[0].config.train
    step = _make_step(members, device)
    pending: list[list[dict[str, float | int]]] = [[] for _ in members]
    names = tuple(m.store.root.name for m in members)

    def save(epoch: int, checkpoint: bool) -> None:
        for i, m in enumerate(members):
            if m.diverged is not None:
                continue
            weights = step.weights(i)
            if checkpoint:
                m.store.write_checkpoint(epoch, weights)
            m.store.append_metrics(pending[i])
            pending[i].clear()
            m.store.write_resume(
                resume_tensors(weights, step.optimizer_state(i)),
                {"epoch": epoch, "step": epoch, "engine": m.config.train.engine},
            )
            m.epoch = epoch

    def sync_back(epoch: int) -> None:
        for i, m in enumerate(members):
            if m.diverged is not None:
                continue
            m.model.load_state_dict(step.weights(i), strict=False)
            m.opt_tensors = step.optimizer_state(i)
            m.epoch = epoch

    def log(epoch: int) -> list[dict[str, float | int]]:
        rows = [{"epoch": epoch, **r} for r in step.evaluate()]
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
            on_step(StepInfo(0, train.epochs, rows[0], 0, tuple(rows), names))

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
                             tuple(rows) if rows else None, names))
        if interrupted[0]:
            if not is_ckpt:
                save(epoch, checkpoint=False)
            sync_back(epoch)
            raise TrainingInterrupted(epoch)
        if all(m.diverged is not None for m in members):
            return
    sync_back(stop)


def resume_epoch(store: RunStore) -> int:
    """The epoch of the folder's resume point (-1: none)."""
    resume = store.read_resume()
    return -1 if resume is None else int(resume[1]["epoch"])
