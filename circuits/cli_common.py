"""What the ``circuits`` commands share: the user-error type and the base-config flags.

Every config field becomes a flag (``--weight-decay``), so ``circuits train`` and every
``circuits experiment`` protocol take a base config the same way.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

import typer

from circuits.config import FIELD_OWNER, PRESETS, RunConfig, field_doc, field_type, preset

__all__ = ["UserError", "build_config", "config_parameters", "set_signature", "config_from_kwargs", "with_loggers"]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_config(
    preset_name: str, config_file: Path | None, overrides: dict[str, Any]
) -> RunConfig:
    """Resolve a preset (or a JSON config file) plus flag overrides into a RunConfig."""
    if config_file is not None:
        try:
            text = config_file.read_text()
        except OSError as e:
            raise UserError(f"cannot read --config {config_file}: {e.strerror}") from None
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(
                f"--config {config_file} is not valid JSON ({e.msg} at line {e.lineno}, column "
                f"{e.colno}); fix the file"
            ) from None
        # Accept a run folder's config.json (which wraps the config with versions) too.
        if isinstance(data, dict) and "config" in data and "format" in data:
            data = data["config"]
        base = RunConfig.from_dict(data)
    else:
        base = preset(preset_name)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "frac" in given and "train_size" in given:
        raise UserError("--frac and --train-size exclude each other; give one")
    return base.replace(**given)


def config_parameters(default_preset: str = "quick") -> list[inspect.Parameter]:
    """Typer parameters for a base config: --preset, --config and one flag per config field."""
    params = [
        inspect.Parameter(
            "preset", inspect.Parameter.KEYWORD_ONLY, annotation=str,
            default=typer.Option(default_preset, "--preset", help=f"Starting config: {', '.join(PRESETS)}."),
        ),
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(
                None, "--config", help="JSON run config (or a run's config.json) instead of a preset."
            ),
        ),
    ]
    for name, owner in FIELD_OWNER.items():
        base = field_type(owner, name)
        decls = [_flag(name)]
        if base is bool:
            decls = [f"{_flag(name)}/--no-{name.replace('_', '-')}"]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[base],
                default=typer.Option(None, *decls, help=field_doc(owner, name), show_default=False),
            )
        )
    return params


def set_signature(func: Any, params: list[inspect.Parameter]) -> None:
    """Give ``func`` a typer-readable signature built at import time."""
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}


def config_from_kwargs(kwargs: dict[str, Any]) -> RunConfig:
    """Pop --preset/--config and the field flags out of ``kwargs`` and resolve the config."""
    preset_name = kwargs.pop("preset")
    config_file = kwargs.pop("config")
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in FIELD_OWNER}
    return build_config(preset_name, config_file, fields)


def with_loggers(on_step: Any, log_to: str | None, config: RunConfig, path: Path) -> Any:
    """The progress callback chained with the ``--log-to`` loggers (TensorBoard event files in
    ``<path>/tensorboard``, a sub-folder per member in a protocol's ensembles; a W&B run named
    after the folder). ``circuits train`` and ``circuits experiment`` share it."""
    if not log_to:
        return on_step
    from circuits.loggers import LOGGERS, chain, tensorboard_logger, wandb_logger

    names = [n.strip() for n in log_to.split(",") if n.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad or not names:
        raise UserError(f"--log-to {log_to!r}: choose from {', '.join(LOGGERS)} (comma-separated)")
    loggers = []
    try:
        for name in names:
            if name == "tensorboard":
                loggers.append(tensorboard_logger(path / "tensorboard"))
            else:
                loggers.append(wandb_logger(config=config, name=path.name))
    except ImportError as e:
        raise UserError(str(e)) from None
    return chain(on_step, *loggers)
