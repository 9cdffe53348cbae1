"""Metric logging to TensorBoard or Weights & Biases, as ``on_step`` callbacks (off by default).

``circuits.train(config, on_step=tensorboard_logger("tb/quick"))`` writes the train/test loss
and accuracy at every logged epoch as scalars ``train/loss``, ``test/loss``, ``train/acc``,
``test/acc`` with the epoch as the step; :func:`wandb_logger` logs the same to a W&B run (its
``mode="offline"`` writes locally). ``circuits train --log-to tensorboard,wandb`` does it from
the command line, and ``circuits experiment ... --log-to`` for a protocol, whose ensembles log
every member under its run folder's name (TensorBoard: one sub-folder each; W&B: one run per
ensemble, keys prefixed ``<member>/``). Each needs its extra (``pip install -e
".[tensorboard]"`` / ``".[wandb]"``); a missing one is named with the install command.
:func:`chain` runs several callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["tensorboard_logger", "wandb_logger", "chain", "LOGGERS"]

_NAMES = {"train_loss": "train/loss", "test_loss": "test/loss", "train_acc": "train/acc", "test_acc": "test/acc"}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {_NAMES[k]: float(v) for k, v in metrics.items() if k in _NAMES}


def _per_member(info: Any) -> list[tuple[str | None, dict[str, Any]]]:
    """(member name, metrics) for each member with fresh metrics; one unnamed entry for a single run."""
    names, rows = getattr(info, "member_names", None), getattr(info, "member_metrics", None)
    if names and rows and len(names) > 1:
        return list(zip(names, rows))
    return [(None, info.metrics)] if info.metrics else []


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"logging to {extra} needs its package: pip install -e '.[{extra}]'") from None


def tensorboard_logger(log_dir: str | Path) -> Callable[[Any], None]:
    """An ``on_step`` callback writing the fresh metrics to TensorBoard event files in ``log_dir``."""
    _need("tensorboard", "tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writers: dict[str | None, Any] = {}

    def on_step(info: Any) -> None:
        for member, metrics in _per_member(info):
            if member not in writers:
                writers[member] = SummaryWriter(log_dir=str(Path(log_dir) / member if member else log_dir))
            for name, value in _scalars(metrics).items():
                writers[member].add_scalar(name, value, global_step=info.epoch)
        if info.epoch >= info.epochs:
            for writer in writers.values():
                writer.close()
            writers.clear()

    return on_step


def wandb_logger(project: str = "circuits", config: Any = None, **init_kwargs: Any) -> Callable[[Any], None]:
    """An ``on_step`` callback logging the fresh metrics to a Weights & Biases run, started on
    the first step with ``wandb.init(project=..., config=<the run config as a dict>, **init_kwargs)``
    (``mode="offline"`` to write locally only) and finished at the last epoch; in a protocol,
    each ensemble it trains is a W&B run of its own, with every member's keys under its name."""
    wandb = _need("wandb", "wandb")
    state: dict[str, Any] = {"run": None}

    def on_step(info: Any) -> None:
        if state["run"] is None:
            cfg = config.to_dict() if hasattr(config, "to_dict") else config
            names = getattr(info, "member_names", None)
            kwargs = dict(init_kwargs)
            if names and len(names) > 1 and "name" in kwargs:
                kwargs["name"] = f"{kwargs['name']}-{names[0]}"
            state["run"] = wandb.init(project=project, config=cfg, **kwargs)
        logged = {f"{member}/{k}" if member else k: v for member, metrics in _per_member(info)
                  for k, v in _scalars(metrics).items()}
        if logged:
            state["run"].log(logged, step=info.epoch)
        if info.epoch >= info.epochs:
            state["run"].finish()
            state["run"] = None  # the next ensemble of a protocol starts a run of its own

    return on_step


def chain(*callbacks: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """One ``on_step`` callback calling each of ``callbacks`` (None entries skipped) in order."""
    live = [c for c in callbacks if c is not None]

    def on_step(info: Any) -> None:
        for c in live:
            c(info)

    return on_step


#: The names ``circuits train --log-to`` accepts.
LOGGERS = ("tensorboard", "wandb")
