"""The training loop: full-batch AdamW with weight decay (Nanda et al. 2023).

It takes a config, a store and an ``on_step`` callback and prints nothing; the CLI owns the
terminal. (The module is ``trainer`` rather than ``train`` so that ``circuits.train``, the
library function, is never shadowed by a submodule of the same name.)

Determinism: no randomness is drawn after initialisation (full batch, no dropout), AdamW runs
its single-tensor path, and the resume point holds the weights, both moments and the step
count, so an interrupted run resumed on the same machine ends bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.deterministic
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine import fused
from circuits.engine.subnormal import flush_subnormals
from circuits.errors import TrainingDiverged
from circuits.lock import hold_run_folder
from circuits.model import Transformer, make_model
from circuits.resume import check_resume
from circuits.store import (
    SPLIT_FILE,
    RunFolderError,
    RunStore,
    file_sha256,
    is_buffer_key,
    read_safetensors,
    removed_if_not_started,
)
from circuits.tasks import Task, make_task, task_from_saved_split

__all__ = ["StepInfo", "TrainingInterrupted", "RunExistsError", "train_run", "evaluate", "loss_fn",
           "initial_model", "with_init_digest"]


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


def loss_fn(
    logits: Float[Tensor, "batch d_vocab_out"], labels: Int[Tensor, " batch"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy with the log-softmax in float64.

    Float32 log-softmax cannot represent losses below ~1e-7 and quantises them, which causes
    loss spikes late in grokking (Nanda et al. 2023, ``cross_entropy_high_precision``).
    """
    return F.cross_entropy(logits.to(torch.float64), labels)


def last_position_logits(
    model: Transformer, tokens: Int[Tensor, "batch pos"], engine: str = "fused"
) -> Float[Tensor, "batch d_vocab_out"]:
    """Last-position logits by the chosen engine (both compute the same function)."""
    if engine == "fused" and fused.supports(model):
        return fused.last_logits(model, tokens)
    return model(tokens)[:, -1]


@torch.no_grad()
def evaluate(model: Transformer, task: Task, engine: str = "fused") -> dict[str, float]:
    """Train/test loss (float64) and accuracy of the model on the full grid."""
    return split_metrics(last_position_logits(model, task.tokens, engine), task)


def split_metrics(logits: Float[Tensor, "pair d_vocab_out"], task: Task) -> dict[str, float]:
    """Train/test loss (float64) and accuracy of full-grid logits on the task's saved split."""
    out: dict[str, float] = {}
    for split, idx in (("train", task.train_idx), ("test", task.test_idx)):
        if len(idx) == 0:
            out[f"{split}_loss"], out[f"{split}_acc"] = float("nan"), float("nan")
            continue
        lg, y = logits[idx], task.labels[idx].to(logits.device)
        out[f"{split}_loss"] = loss_fn(lg, y).item()
        out[f"{split}_acc"] = (lg.argmax(-1) == y).to(torch.float64).mean().item()
    return out


def _make_optimizer(model: Transformer, config: RunConfig) -> torch.optim.AdamW:
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: one fixed kernel path, so the same run gives the same bits every time.
    return torch.optim.AdamW(
        params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
        foreach=False,
    )


def lr_at(config: RunConfig, update: int) -> float:
    """Learning rate of update number ``update`` (0-based): linear warm-up, then constant.

    As the official code's ``LambdaLR(min(step / warmup, 1))``: the first update has lr 0.
    """
    t = config.train
    if t.warmup_steps == 0:
        return t.lr
    return t.lr * min(update / t.warmup_steps, 1.0)


def _resume_tensors(model: Transformer, opt: torch.optim.AdamW) -> dict[str, Tensor]:
    tensors = {f"model.{k}": v for k, v in _weights(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            name = names[id(p)]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                tensors[f"opt.{name}.{key}"] = torch.as_tensor(state[key])
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def _load_resume(model: Transformer, opt: torch.optim.AdamW, tensors: dict[str, Tensor]) -> None:
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"opt.{name}.step"].clone(),
                "exp_avg": tensors[f"opt.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone(),
            }
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


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
        train_idx, test_idx = store.read_split()
        return task_from_saved_split(config.task, train_idx, test_idx, store.root / SPLIT_FILE)
    store.root.mkdir(parents=True, exist_ok=True)
    task = make_task(config.task)
    store.write_split(task.train_idx, task.test_idx)
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


def initial_model(config: RunConfig) -> Transformer:
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
    own = _weights(model)
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
    if path.parent.name == "checkpoints" and (root / "config.json").is_file():
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


def finished_model(config: RunConfig, store: RunStore) -> Transformer | None:
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
    train_idx, test_idx = store.read_split()
    task_from_saved_split(config.task, train_idx, test_idx, store.root / SPLIT_FILE)
    model = make_model(config)
    tensors, meta = resume
    check_resume(store, config, model, tensors, meta)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                          strict=False)
    return model


def train_run(
    config: RunConfig,
    store: RunStore,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
) -> Transformer:
    """Train ``config`` into ``store``, resuming from its last resume point if it has one.

    Saves a checkpoint (float32 safetensors) at every epoch of the schedule, logs metrics every
    ``log_every`` epochs and at every checkpoint, and replaces the resume point at each
    checkpoint. Ctrl-C saves the current state and raises :class:`TrainingInterrupted`.
    Returns the model after the last epoch. ``device`` (fused engine only): where the
    computation runs, e.g. ``"cuda"`` (default: the CPU).
    """
    config = with_init_digest(config)
    done = finished_model(config, store)
    if done is not None:
        return done
    if config.train.engine == "fused":
        # A fused run is an ensemble of one (circuits.engine.ensemble): one code path.
        from circuits.engine.ensemble import train_ensemble

        return train_ensemble([config], [store], on_step, device=device)[0]
    from circuits.engine.ensemble import resolve_device

    resolve_device(device, config.train.engine)
    with removed_if_not_started([store.root]):
        with hold_run_folder(store.root), deterministic():
            return _train_run(config, store, on_step)


def _train_run(
    config: RunConfig, store: RunStore, on_step: Callable[[StepInfo], None] | None
) -> Transformer:
    task = prepare_store(config, store)
    resume = store.read_resume()
    # A resumed run's weights come from its resume point: its init_from file may be gone.
    model = make_model(config) if resume is not None else initial_model(config)
    opt = _make_optimizer(model, config)
    start = 0
    if resume is not None:
        tensors, meta = resume
        start = check_resume(store, config, model, tensors, meta)
        _load_resume(model, opt, tensors)
        store.truncate_metrics(start)
    else:
        store.truncate_metrics(-1)
    t = config.train
    x_train, y_train = task.train_data()
    pending: list[dict[str, float | int]] = []

    def save(epoch: int, checkpoint: bool) -> None:
        if checkpoint:
            store.write_checkpoint(epoch, _weights(model))
        store.append_metrics(pending)
        pending.clear()
        store.write_resume(
            _resume_tensors(model, opt),
            {"epoch": epoch, "step": epoch, "engine": t.engine},
        )

    if start == 0:
        row = {"epoch": 0, **evaluate(model, task, t.engine)}
        pending.append(row)
        save(0, checkpoint=True)
        if on_step:
            on_step(StepInfo(0, t.epochs, row, 0))

    with sigint_flag() as interrupted:
        for epoch in range(start + 1, t.epochs + 1):
            for group in opt.param_groups:
                group["lr"] = lr_at(config, epoch - 1)
            loss = loss_fn(last_position_logits(model, x_train, t.engine), y_train)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            is_ckpt = t.is_checkpoint(epoch)
            row = None
            if is_ckpt or epoch % t.log_every == 0:
                row = {"epoch": epoch, **evaluate(model, task, t.engine)}
                if not math.isfinite(row["train_loss"]):
                    # Nothing of this epoch is saved: the folder keeps its last finite state.
                    raise TrainingDiverged({str(store.root): (epoch, resume_epoch(store))})
                pending.append(row)
            if is_ckpt:
                save(epoch, checkpoint=True)
            if on_step:
                on_step(StepInfo(epoch, t.epochs, row, start))
            if interrupted[0]:
                if not is_ckpt:
                    save(epoch, checkpoint=False)
                raise TrainingInterrupted(epoch)
    return model


def resume_epoch(store: RunStore) -> int:
    """The epoch of the folder's resume point (-1: none)."""
    resume = store.read_resume()
    return -1 if resume is None else int(resume[1]["epoch"])


def _weights(model: Transformer) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not is_buffer_key(k)}
