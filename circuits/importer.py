"""Import the community's saved grokking runs as run folders (``circuits import``).

The TransformerLens Grokking demo saves its training with ``torch.save`` as one dict:
``model`` (the final state dict), ``config`` (its ``HookedTransformerConfig``), ``checkpoints``
(a state dict every ``checkpoint_every`` epochs), ``checkpoint_epochs``, ``train_losses`` /
``test_losses`` (one float per epoch) and ``train_indices`` / ``test_indices`` (into the p^2
pairs in canonical order a*p + b). :func:`import_run` makes that an ordinary run folder:
safetensors checkpoints under the epochs the file gives, the manifest, the split, a
``metrics.csv`` evaluated from each checkpoint on that split (float64 loss, accuracy: the
toolkit's own definition), and ``source.json`` with the source file's sha256. Every measure
and dashboard then works on it; it does not train (a run folder with ``source.json`` is refused
by ``circuits train``).

A file from someone else is never executed: it is read by a restricted unpickler
(:func:`read_restricted`) that builds tensors, containers, numbers, strings, torch dtypes and
devices only; a ``HookedTransformerConfig`` becomes an inert dict of its fields, never
constructed; any other object is refused by name before anything is written (design.md,
"Import").
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from circuits.config import ConfigError, RunConfig, preset
from circuits.errors import RunFolderError
from circuits.model import is_buffer_key, make_model
from circuits.run import Run, load_run
from circuits.lock import hold_run_folder
from circuits.store import CONFIG_FILE, SOURCE_FILE, SPLIT_FILE, RunStore, atomic_write_bytes, clear_run_folder
from circuits.tasks import split_problem
from circuits.tasks.modular import make_grid

__all__ = ["import_run", "read_restricted", "ImportRefused", "InertConfig"]


class ImportRefused(ValueError):
    """A file that is not a run circuits can read, or that holds objects it will not build."""


class InertConfig(dict):
    """The fields of a pickled ``HookedTransformerConfig``, as a plain dict (never constructed:
    unpickling only fills it with the saved state)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ImportRefused("the saved HookedTransformerConfig is not a dict of fields")
        self.update(state)


_CONFIG_CLASSES = {
    ("transformer_lens.HookedTransformerConfig", "HookedTransformerConfig"),
    ("transformer_lens.config.HookedTransformerConfig", "HookedTransformerConfig"),
    ("transformer_lens.config", "HookedTransformerConfig"),
    ("transformer_lens", "HookedTransformerConfig"),
}
_TENSOR_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in _TENSOR_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name == "device":
            return torch.device
        if module == "builtins" and name in ("set", "frozenset", "complex"):
            return {"set": set, "frozenset": frozenset, "complex": complex}[name]
        if (module, name) in _CONFIG_CLASSES:
            return InertConfig
        raise ImportRefused(f"the file holds a {module}.{name} object, which circuits does not build from a "
                            "file it received (only tensors, containers, numbers, strings, torch dtypes "
                            "and a HookedTransformerConfig's fields)")


class _RestrictedPickle:
    """The ``pickle_module`` torch.load is given: its Unpickler refuses every other global."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "circuits_restricted_pickle"


def read_restricted(path: str | Path) -> Any:
    """The object a ``torch.save`` file holds, built by the restricted unpickler (tensors on
    the CPU); ImportRefused names any object it will not build."""
    data = Path(path).read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                          pickle_module=_RestrictedPickle)  # type: ignore[arg-type]
    except ImportRefused:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError) as e:
        raise ImportRefused(f"{path} is not a torch.save file circuits can read ({type(e).__name__}: {e})") from None


def _config_of(cfg: dict, train_size: int, last_epoch: int, op: str) -> RunConfig:
    """The RunConfig of a TransformerLens demo run from its config's fields."""
    def need(key: str) -> Any:
        if key not in cfg:
            raise ImportRefused(f"the saved config lacks {key!r}")
        return cfg[key]

    if need("n_ctx") != 3 or cfg.get("normalization_type") is not None or cfg.get("attn_only", False):
        raise ImportRefused("only one-hot [a, b, =] models without LayerNorm import (n_ctx 3, "
                            f"normalization_type None); this one has n_ctx {cfg.get('n_ctx')}, "
                            f"normalization_type {cfg.get('normalization_type')!r}")
    p = int(need("d_vocab_out"))
    if int(need("d_vocab")) != p + 1:
        raise ImportRefused(f"d_vocab {cfg['d_vocab']} is not d_vocab_out + 1 = {p + 1} ([a, b, =] with '=' = p)")
    if int(need("d_head")) * int(need("n_heads")) != int(need("d_model")):
        raise ImportRefused("d_head x n_heads != d_model")
    seed = cfg.get("seed")
    try:
        return preset("nanda").replace(
            p=p, op=op, train_size=train_size, d_model=int(cfg["d_model"]), n_heads=int(cfg["n_heads"]),
            d_mlp=int(need("d_mlp")), n_layers=int(need("n_layers")), act_fn=str(need("act_fn")),
            seed=int(seed) if seed is not None else 0, epochs=max(1, last_epoch), preset="imported",
        )
    except ConfigError as e:
        raise ImportRefused(f"the saved config does not fit a circuits run: {e}") from None


def import_run(source: str | Path, out: str | Path, op: str = "add") -> Run:
    """A TransformerLens Grokking demo file (see the module docstring) as a run folder at
    ``out`` (new or empty); ``op`` names the task it was trained on (the file does not say;
    the demo's is addition). Returns the :class:`Run`; ImportRefused (nothing written) when
    the file does not fit."""
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise ImportRefused(f"{source}: no such file")
    if out.exists() and any(out.iterdir()):
        raise ImportRefused(f"{out} exists and is not empty; choose a new --out")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    data = read_restricted(source)
    if not isinstance(data, dict) or not {"config", "checkpoints", "checkpoint_epochs"} <= set(data):
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ImportRefused(f"{source} is not a TransformerLens Grokking demo save (needs config, checkpoints, "
                            f"checkpoint_epochs, train_indices, test_indices; has {keys})")
    cfg, ckpts, epochs = data["config"], list(data["checkpoints"]), [int(e) for e in data["checkpoint_epochs"]]
    if not isinstance(cfg, dict):
        raise ImportRefused("the saved config is not a HookedTransformerConfig")
    if len(ckpts) != len(epochs) or not ckpts:
        raise ImportRefused(f"{len(ckpts)} checkpoints but {len(epochs)} checkpoint epochs")
    if sorted(set(epochs)) != epochs:
        raise ImportRefused("the checkpoint epochs are not increasing")
    for key in ("train_indices", "test_indices"):
        if not isinstance(data.get(key), torch.Tensor):
            raise ImportRefused(f"{source} lacks {key} (the split): circuits never re-derives a run's split")
    train_idx, test_idx = data["train_indices"].to(torch.int64), data["test_indices"].to(torch.int64)
    config = _config_of(cfg, len(train_idx), epochs[-1], op)
    _, _, valid = make_grid(config.task)
    problem = split_problem(config.task, valid, train_idx, test_idx)
    if problem is not None:
        raise ImportRefused(f"the saved split does not fit p = {config.task.p}: {problem}")
    expected = {k: tuple(v.shape) for k, v in make_model(config).state_dict().items()}
    weights = []
    for epoch, sd in zip(epochs, ckpts):
        kept = {k: v for k, v in dict(sd).items() if not is_buffer_key(k)}
        wrong = sorted(set(kept) ^ set(expected))
        if wrong:
            raise ImportRefused(f"checkpoint at epoch {epoch} does not have the model's parameters ({wrong[:3]})")
        for k, v in kept.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != expected[k]:
                raise ImportRefused(f"checkpoint at epoch {epoch}: {k} is not a tensor of shape {expected[k]}")
        weights.append(kept)
    store = RunStore(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with hold_run_folder(out, doing="importing into"):
            store.write_split(train_idx, test_idx)
            store.write_config(config)  # a run with a split, so a failure below is cleared as one
            for epoch, sd in zip(epochs, weights):
                store.write_checkpoint(epoch, sd)
            _write_metrics(load_run(out), store, epochs)
            source_doc = {"source": str(source.resolve()), "sha256": digest, "format": "transformer_lens_demo",
                          "op": op, "checkpoint_epochs": epochs,
                          "config_fields": {k: _plain(v) for k, v in cfg.items()}}
            atomic_write_bytes(out / SOURCE_FILE, (json.dumps(source_doc, indent=2) + "\n").encode())
    except BaseException:
        if (out / CONFIG_FILE).exists():
            clear_run_folder(out)
        (out / SPLIT_FILE).unlink(missing_ok=True)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return load_run(out)


def _write_metrics(run: Run, store: RunStore, epochs: list[int]) -> None:
    from circuits.engine.hooked import evaluate

    rows = []
    for model in run.models(epochs):
        with torch.no_grad():
            rows.append({"epoch": model.epoch, **evaluate(model, run.task, "reference")})
    store.append_metrics(rows)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def imported_source(run_dir: str | Path) -> dict | None:
    """The ``source.json`` of an imported run, or None for a run circuits trained."""
    path = Path(run_dir) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise RunFolderError(f"{path} is damaged: restore it, or import the run again") from None
