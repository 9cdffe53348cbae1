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

Nanda et al.'s ``full_run_data.pth`` (the run of "Progress measures for grokking via
mechanistic interpretability", 2023, used by ARENA's grokking exercises) is a dict of
``state_dicts`` (every ``save_every`` = 100 epochs), their code's ``config`` object,
``train_losses`` and ``test_losses``. Its weights are in their own code's layout
(``W_E [d_model, p + 1]``, ``W_Q [n_heads, d_head, d_model]``, ``W_O [d_model, n_heads *
d_head]``, ``W_in [d_mlp, d_model]``, ``W_out [d_model, d_mlp]``, ``W_U [d_model, p + 1]``, trained
MLP biases); the split is not stored and is rebuilt by their rule, then checked against the
recorded losses (:func:`_read_full_run`).

A file from someone else is never executed: it is read by a restricted unpickler
(:func:`read_restricted`) that builds tensors, containers, numbers, strings, torch dtypes and
devices only; a config object (``HookedTransformerConfig``, ``Config``) becomes an inert dict of its fields, never
constructed; any other object is refused by name before anything is written (design.md,
"Import").
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor

from circuits.config import ConfigError, RunConfig, preset
from circuits.errors import RunFolderError
from circuits.model import is_buffer_key, make_model
from circuits.run import Run, load_run
from circuits.lock import hold_run_folder
from circuits.store import CONFIG_FILE, SOURCE_FILE, SPLIT_FILE, RunStore, atomic_write_bytes, clear_run_folder
from circuits.tasks import make_grid, split_problem

__all__ = ["import_run", "read_restricted", "nanda_split", "ImportRefused", "InertConfig"]


class ImportRefused(ValueError):
    """A file that is not a run circuits can read, or that holds objects it will not build."""


class InertConfig(dict):
    """The fields of a pickled config object (TransformerLens' ``HookedTransformerConfig``,
    Nanda et al.'s ``Config``), as a plain dict (never constructed: unpickling only fills it
    with the saved state)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ImportRefused("the saved config is not a dict of fields")
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
        if (module, name) in _CONFIG_CLASSES or name == "Config":
            # Nanda et al.'s training code pickles its own ``Config`` (whatever module it was
            # run from); like TransformerLens' config it is only ever read as inert fields.
            return InertConfig
        raise ImportRefused(f"the file holds a {module}.{name} object, which circuits does not build from a "
                            "file it received (only tensors, containers, numbers, strings, torch dtypes "
                            "and a config's fields)")


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


def import_run(source: str | Path, out: str | Path, op: str | None = None) -> Run:
    """A saved run, in either layout of the module docstring, as a run folder at ``out`` (new
    or empty). ``op`` names the task it was trained on where the file does not say (the demo's
    is addition; Nanda et al.'s config names it, and a different ``op`` is refused). Returns
    the :class:`Run`; ImportRefused (nothing written) when the file does not fit."""
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise ImportRefused(f"{source}: no such file")
    if out.exists() and any(out.iterdir()):
        raise ImportRefused(f"{out} exists and is not empty; choose a new --out")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    data = read_restricted(source)
    if isinstance(data, dict) and "state_dicts" in data:
        found = _read_full_run(data, op)
    elif isinstance(data, dict) and {"config", "checkpoints", "checkpoint_epochs"} <= set(data):
        found = _read_demo(data, source, op or "add")
    else:
        keys = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise ImportRefused(f"{source} is neither a TransformerLens Grokking demo save (config, checkpoints, "
                            "checkpoint_epochs, train_indices, test_indices) nor Nanda et al.'s full_run_data.pth "
                            f"(state_dicts, config, train_losses, test_losses); it has {keys}")
    config, epochs, weights, (train_idx, test_idx), doc = found
    _, _, valid = make_grid(config.task)
    problem = split_problem(config.task, valid, train_idx, test_idx)
    if problem is not None:
        raise ImportRefused(f"the saved split does not fit p = {config.task.p}: {problem}")
    expected = {k: tuple(v.shape) for k, v in make_model(config).state_dict().items()}
    for epoch, sd in zip(epochs, weights):
        wrong = sorted(set(sd) ^ set(expected))
        if wrong:
            raise ImportRefused(f"checkpoint at epoch {epoch} does not have the model's parameters ({wrong[:3]})")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != expected[k]:
                raise ImportRefused(f"checkpoint at epoch {epoch}: {k} is not a tensor of shape {expected[k]}")
    store = RunStore(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with hold_run_folder(out, doing="importing into"):
            store.write_split(train_idx, test_idx)
            store.write_config(config)  # a run with a split, so a failure below is cleared as one
            for epoch, sd in zip(epochs, weights):
                store.write_checkpoint(epoch, sd)
            run = load_run(out)
            _write_metrics(run, store, epochs)
            check = doc.pop("split_check", None)
            if check is not None:
                doc["split_check"] = check(run)
            source_doc = {"source": str(source.resolve()), "sha256": digest, "op": config.task.op,
                          "checkpoint_epochs": epochs, **doc}
            atomic_write_bytes(out / SOURCE_FILE, (json.dumps(source_doc, indent=2) + "\n").encode())
    except BaseException:
        if (out / CONFIG_FILE).exists():
            clear_run_folder(out)
        (out / SPLIT_FILE).unlink(missing_ok=True)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return load_run(out)


_Found = tuple[RunConfig, list[int], list[dict[str, Tensor]], tuple[Tensor, Tensor], dict[str, Any]]


def _read_demo(data: dict, source: Path, op: str) -> _Found:
    """The TransformerLens Grokking demo's save: TransformerLens names and shapes already."""
    cfg, ckpts, epochs = data["config"], list(data["checkpoints"]), [int(e) for e in data["checkpoint_epochs"]]
    if not isinstance(cfg, dict):
        raise ImportRefused("the saved config is not a HookedTransformerConfig")
    _check_epochs(ckpts, epochs)
    for key in ("train_indices", "test_indices"):
        if not isinstance(data.get(key), torch.Tensor):
            raise ImportRefused(f"{source} lacks {key} (the split): circuits never re-derives a demo run's split")
    train_idx, test_idx = data["train_indices"].to(torch.int64), data["test_indices"].to(torch.int64)
    config = _config_of(cfg, len(train_idx), epochs[-1], op)
    weights = [{k: v for k, v in dict(sd).items() if not is_buffer_key(k)} for sd in ckpts]
    doc = {"format": "transformer_lens_demo", "config_fields": {k: _plain(v) for k, v in cfg.items()}}
    return config, epochs, weights, (train_idx, test_idx), doc


def _check_epochs(ckpts: list, epochs: list[int]) -> None:
    if len(ckpts) != len(epochs) or not ckpts:
        raise ImportRefused(f"{len(ckpts)} checkpoints but {len(epochs)} checkpoint epochs")
    if sorted(set(epochs)) != epochs:
        raise ImportRefused("the checkpoint epochs are not increasing")


#: Nanda et al.'s ``fn_name`` values and the toolkit's operation of the same table.
_NANDA_OPS = {"add": "add", "subtract": "sub", "sub": "sub", "multiply": "mul", "mul": "mul",
              "divide": "div", "div": "div", "x2xyy2": "x2_xy_y2"}


def nanda_split(p: int, frac_train: float, seed: int) -> tuple[Tensor, Tensor]:
    """The train/test split of Nanda et al.'s training code (their ``gen_train_test``): the
    pairs (i, j) in the order i * p + j, shuffled by Python's ``random`` seeded with ``seed``,
    the first ``int(frac_train * p^2)`` for training. Returned as pair indices i * p + j."""
    import random

    order = list(range(p * p))
    rng = random.Random(seed)
    rng.shuffle(order)
    cut = int(frac_train * p * p)
    return torch.tensor(order[:cut], dtype=torch.int64), torch.tensor(order[cut:], dtype=torch.int64)


def _read_full_run(data: dict, op: str | None) -> _Found:
    """Nanda et al.'s ``full_run_data.pth`` (the run of "Progress measures for grokking",
    distributed with their code and ARENA's grokking exercises): ``state_dicts`` (one every
    ``save_every`` epochs) in the layout of their own transformer code, the ``config`` object
    of that code (read as inert fields), ``train_losses`` and ``test_losses``. The split is not
    in the file: it is their code's rule (:func:`nanda_split`) with the config's ``frac_train``
    and ``seed`` (0.3 and 0 if the config is absent), and it is accepted only when the
    checkpoints' losses on it agree with the losses the file recorded (``split_check`` in
    ``source.json``)."""
    ckpts = list(data["state_dicts"])
    cfg = data.get("config")
    cfg = dict(cfg) if isinstance(cfg, dict) else {}
    if not ckpts or not all(isinstance(sd, dict) for sd in ckpts):
        raise ImportRefused("state_dicts is not a list of state dicts")
    for key in ("embed.W_E", "blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.0.mlp.W_in", "unembed.W_U"):
        if not isinstance(ckpts[0].get(key), torch.Tensor):
            raise ImportRefused(f"the first state dict lacks {key}: not Nanda et al.'s transformer")
    first = ckpts[0]
    d_model, d_vocab = first["embed.W_E"].shape
    n_heads, d_head, _ = first["blocks.0.attn.W_Q"].shape
    d_mlp = first["blocks.0.mlp.W_in"].shape[0]
    p = int(cfg.get("p", d_vocab - 1))
    if d_vocab != p + 1 or tuple(first["unembed.W_U"].shape) != (d_model, d_vocab):
        raise ImportRefused(f"W_E is {tuple(first['embed.W_E'].shape)} and W_U {tuple(first['unembed.W_U'].shape)}: "
                            f"not [d_model, p + 1] with p = {p}")
    if any(k.startswith("blocks.1.") for k in first) or cfg.get("use_ln", False):
        raise ImportRefused("only the one-layer model without LayerNorm imports")
    fn_name = cfg.get("fn_name")
    if fn_name is not None and fn_name not in _NANDA_OPS:
        raise ImportRefused(f"the run's operation fn_name={fn_name!r} is not one circuits knows")
    file_op = _NANDA_OPS.get(fn_name) if fn_name is not None else None
    if op is not None and file_op is not None and op != file_op:
        raise ImportRefused(f"--op {op} but the file's config says fn_name={fn_name!r} ({file_op})")
    op = op or file_op or "add"
    every = int(cfg.get("save_every", 100))
    given = data.get("checkpoint_epochs", data.get("epochs"))
    epochs = [int(e) for e in given] if given is not None else [i * every for i in range(len(ckpts))]
    _check_epochs(ckpts, epochs)
    frac, seed = float(cfg.get("frac_train", 0.3)), int(cfg.get("seed", 0))
    train_idx, test_idx = nanda_split(p, frac, seed)
    act = str(cfg.get("act_type", "ReLU")).lower()
    try:
        config = preset("nanda").replace(
            p=p, op=op, train_size=len(train_idx), d_model=int(d_model), n_heads=int(n_heads), d_mlp=int(d_mlp),
            act_fn=act, train_biases=True, seed=seed, epochs=max(1, epochs[-1]), preset="imported",
            **{k: float(cfg[c]) for k, c in (("lr", "lr"), ("weight_decay", "weight_decay")) if c in cfg},
        )
    except ConfigError as e:
        raise ImportRefused(f"the saved config does not fit a circuits run: {e}") from None
    if config.model.d_head != d_head:
        raise ImportRefused(f"d_head {d_head} x n_heads {n_heads} != d_model {d_model}")
    weights = [_from_nanda_layout(dict(sd), n_heads, epoch) for epoch, sd in zip(epochs, ckpts)]
    losses = {k: [float(x) for x in data[k]] for k in ("train_losses", "test_losses") if k in data}
    doc: dict[str, Any] = {
        "format": "nanda_full_run_data",
        "config_fields": {k: _plain(v) for k, v in cfg.items()},
        "split": f"Nanda et al.'s rule: the p^2 pairs shuffled by Python random.Random({seed}), "
                 f"the first int({frac} * p^2) = {len(train_idx)} for training",
        "conversions": ["weights transposed from [out, in] to TransformerLens' [in, out] layout",
                        "W_O [d_model, n_heads*d_head] split into [n_heads, d_head, d_model]",
                        "the unembedding's column of '=' (never an answer) dropped: logits over the p answers "
                        "are unchanged, the softmax no longer counts '='",
                        "MLP biases kept (the run trained them); attention and unembedding biases are zero"],
        "epoch_note": f"state_dicts[i] is labelled epoch i * {every}; the file does not say whether it was "
                      "saved before or after that epoch's update (one step apart)",
        "split_check": lambda run: _check_split(run, losses, bool(cfg.get("frac_train") is not None
                                                                   and cfg.get("seed") is not None)),
    }
    return config, epochs, weights, (train_idx, test_idx), doc


def _from_nanda_layout(sd: dict, n_heads: int, epoch: int) -> dict[str, Tensor]:
    """One of Nanda et al.'s state dicts in TransformerLens' names and shapes (see the
    conversions of :func:`_read_full_run`)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if is_buffer_key(key) or key.endswith((".mask", ".IGNORE")):
            continue
        if not isinstance(value, torch.Tensor):
            raise ImportRefused(f"checkpoint at epoch {epoch}: {key} is not a tensor")
        if key == "embed.W_E" or key.endswith(("mlp.W_in", "mlp.W_out")) or key.endswith(("attn.W_Q", "attn.W_K", "attn.W_V")):
            out[key] = value.transpose(-1, -2).contiguous()
        elif key.endswith("attn.W_O"):
            out[key] = einops.rearrange(value, "d (h e) -> h e d", h=n_heads).contiguous()
        elif key == "unembed.W_U":
            out[key] = value[:, :-1].contiguous()
        elif key in ("pos_embed.W_pos",) or key.endswith(("mlp.b_in", "mlp.b_out")):
            out[key] = value.clone()
        else:
            raise ImportRefused(f"checkpoint at epoch {epoch} holds {key}, which Nanda et al.'s model does not have")
    d_model = out["embed.W_E"].shape[1]
    d_head = d_model // n_heads
    for key, shape in (("blocks.0.attn.b_Q", (n_heads, d_head)), ("blocks.0.attn.b_K", (n_heads, d_head)),
                       ("blocks.0.attn.b_V", (n_heads, d_head)), ("blocks.0.attn.b_O", (d_model,)),
                       ("unembed.b_U", (out["unembed.W_U"].shape[1],))):
        out[key] = torch.zeros(shape, dtype=out["embed.W_E"].dtype)
    return out


#: The split is confirmed when the checkpoints' training losses on it are, in the median,
#: within this factor of the losses the file recorded (one update apart, and over p rather
#: than p + 1 logits); a wrong split misses by orders of magnitude while the run memorises.
SPLIT_CHECK_FACTOR = 1.5


def _check_split(run: Run, losses: dict[str, list[float]], from_config: bool) -> dict[str, Any]:
    train = losses.get("train_losses") or []
    m = run.metrics.set_index("epoch")
    recorded = [e for e in run.epochs if e < len(train) and train[e] > 0]
    pairs = [(float(m.loc[e, "train_loss"]), train[e]) for e in recorded]
    test = losses.get("test_losses") or []
    if test and train and len(test) != len(train):  # some runs logged test loss every few epochs
        stride = max(1, round(len(train) / len(test)))
        test = [test[min(len(test) - 1, e // stride)] for e in range(len(train))]
    # Where the run had memorised (test loss far above train loss) is where a wrong split shows.
    telling = [i for i, e in enumerate(recorded) if test and test[e] > 10 * train[e]]
    chosen = [pairs[i] for i in telling] or pairs
    if not chosen:
        if from_config:
            return {"confirmed": False, "reason": "the file records no training losses; the split follows the config"}
        raise ImportRefused("the file has neither the config's frac_train and seed nor training losses, so the "
                            "split cannot be known; circuits does not guess a run's split")
    ratios = sorted(abs(math.log(ours / theirs)) for ours, theirs in chosen if ours > 0)
    median = math.exp(ratios[len(ratios) // 2]) if ratios else math.inf
    if median > SPLIT_CHECK_FACTOR:
        raise ImportRefused(f"the losses on the reconstructed split are {median:.3g}x off the losses the file "
                            "recorded: the run was not split by Nanda et al.'s rule with its config's frac_train "
                            "and seed, and circuits does not guess a split")
    return {"confirmed": True, "checkpoints_compared": len(chosen), "median_loss_ratio": round(median, 4),
            "while_memorised": bool(telling)}


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
