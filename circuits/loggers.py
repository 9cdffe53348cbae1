"""Metric logging to TensorBoard or Weights & Biases, as ``on_step`` callbacks (off by default).

``circuits.train(config, on_step=tensorboard_logger("tb/quick"))`` writes the train/test loss
and accuracy at every logged epoch as scalars ``train/loss``, ``test/loss``, ``train/acc``,
``test/acc`` with the epoch as the step; :func:`wandb_logger` logs the same to a W&B run (its
``mode="offline"`` writes locally). ``circuits train --log-to tensorboard,wandb`` does it from
the command line. Each needs its extra (``pip install -e ".[tensorboard]"`` / ``".[wandb]"``);
a missing one is named with the install command. :func:`chain` runs several callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["tensorboard_logger", "wandb_logger", "chain", "LOGGERS"]

_NAMES = {"train_loss": "train/loss", "test_loss": "test/loss", "train_acc": "train/acc", "test_acc": "test/acc"}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {_NAMES[k]: float(v) for k, v in metrics.items() if k in _NAMES}


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

    state: dict[str, Any] = {"writer": None}

    def on_step(info: Any) -> None:
        if state["writer"] is None:
            state["writer"] = SummaryWriter(log_dir=str(log_dir))
        writer = state["writer"]
        if info.metrics:
            for name, value in _scalars(info.metrics).items():
                writer.add_scalar(name, value, global_step=info.epoch)
        if info.epoch >= info.epochs:
            writer.close()

    return on_step


def wandb_logger(project: str = "circuits", config: Any = None, **init_kwargs: Any) -> Callable[[Any], None]:
    """An ``on_step`` callback logging the fresh metrics to a Weights & Biases run, started on
    the first step with ``wandb.init(project=..., config=<the run config as a dict>, **init_kwargs)``
    (``mode="offline"`` to write locally only) and finished at the last epoch."""
    wandb = _need("wandb", "wandb")
    state: dict[str, Any] = {"run": None}

    def on_step(info: Any) -> None:
        if state["run"] is None:
            cfg = config.to_dict() if hasattr(config, "to_dict") else config
            state["run"] = wandb.init(project=project, config=cfg, **init_kwargs)
        if info.metrics:
            state["run"].log(_scalars(info.metrics), step=info.epoch)
        if info.epoch >= info.epochs:
            state["run"].finish()

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
