"""Frozen run configuration: task, model, training; presets; strict JSON round trips.

Nothing here imports torch, so the CLI can validate flags before paying for the import.
A run is fully described by one :class:`RunConfig`; derived values (``d_vocab``, ``d_head``,
the checkpoint schedule) are properties so they can never go stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "TaskConfig",
    "ModelConfig",
    "TrainConfig",
    "RunConfig",
    "PRESETS",
    "preset",
    "flat_fields",
    "differing_fields",
    "is_prime",
]

OPS = (
    "add",
    "sub",
    "mul",
    "div",
    "mix1",
    "x2_y2",
    "x2_xy_y2",
    "x2_xy_y2_x",
    "x3_xy",
    "x3_xy2_y",
    "s5",
    "s5conj",
    "s5aba",
)
#: The operations over S5, the 120 permutations of five elements (Power et al. 2022): x·y,
#: x·y·x⁻¹ and x·y·x. p plays no part in them.
S5_OPS = ("s5", "s5conj", "s5aba")
#: The order of S5.
S5_ORDER = 120
ACT_FNS = ("relu", "gelu")
#: LayerNorm choices (TransformerLens' normalization_type None or "LN", pre-norm).
NORMALIZATIONS = ("none", "LN")
INITS = ("gpt2", "fan")
#: Model architectures: the transformer (Nanda et al.) or Clauw et al.'s fully connected network.
ARCHS = ("transformer", "fcn")
ENGINES = ("fused", "reference")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def is_prime(n: int) -> bool:
    """True when ``n`` is a prime number (trial division; p is small here)."""
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


#: Fields added after 0.1.0 and their defaults: left out of the config hash at the default.
ADDED_FIELDS: dict[tuple[str, str], Any] = {
    ("task", "label_noise"): 0.0,
    ("task", "mix_mem"): 0,
    ("model", "init_scale"): 1.0,
    ("model", "normalization"): "none",
    ("model", "dropout"): 0.0,
    ("model", "split_mlp"): False,
    ("model", "arch"): "transformer",
    ("train", "optimizer"): "adamw",
    ("train", "momentum"): 0.0,
    ("train", "embed_lr"): None,
    ("train", "embed_weight_decay"): None,
    ("train", "grokfast"): "none",
    ("train", "grokfast_alpha"): 0.98,
    ("train", "grokfast_window"): 100,
    ("train", "grokfast_lambda"): None,
    ("train", "constrain_norm"): False,
    ("train", "batch_size"): None,
    ("train", "power_batches"): False,
}

#: The optimisers, with torch.optim's semantics: AdamW (decoupled weight decay), Adam (weight
#: decay as an L2 term added to the gradient, Power et al.'s and Grokfast's baseline) and SGD.
OPTIMIZERS = ("adamw", "adam", "sgd")
#: Grokfast's gradient filters (Lee et al. 2024): none, ema or ma.
GROKFAST = ("none", "ema", "ma")
#: Grokfast's default amplification per filter (science.md, Decisions).
GROKFAST_LAMBDA = {"ema": 2.0, "ma": 5.0}


@dataclass(frozen=True)
class TaskConfig:
    """A binary operation table over Z_p with a seeded train/test split (Power et al. 2022)."""

    p: int = 113
    """Modulus; a prime >= 3 (the Fourier measures need odd p, division needs a prime)."""
    op: str = "add"
    """Operation: add, sub, mul, div, mix1, x2_y2, x2_xy_y2, x2_xy_y2_x, x3_xy, x3_xy2_y over
    Z_p, or s5, s5conj, s5aba over the permutations of five elements (p unused)."""
    frac: float | None = 0.3
    """Training fraction of the valid pairs, in (0, 1]; excludes train_size."""
    train_size: int | None = None
    """Absolute number of training pairs; excludes frac."""
    data_seed: int = 598
    """Seed of the torch permutation that draws the split (598: the TransformerLens demo)."""
    random_labels: bool = False
    """Replace each label by a seeded uniform one, the same for (a, b) and (b, a) (Varma et al.)."""
    pool_size: int | None = None
    """Draw the training pairs from the first pool_size pairs of the data_seed permutation only
    (the training set of the same task with train_size = pool_size): ungrokking's subsets."""
    subset_seed: int = 0
    """Seed of the draw of the training pairs from the pool (used with pool_size)."""
    label_noise: float = 0.0
    """Fraction of the training pairs given a seeded uniform wrong label (test pairs stay
    clean; Doshi et al. 2023): round(label_noise * n_train) pairs, saved in the split file."""
    mix_mem: int = 0
    """Mix a memorisation task into training (Huang et al. 2024, §5): this many extra pairs
    under a second operator token, each with a seeded uniform random label, all of them
    training data. Inputs become ``[a, op, b, =]`` (op: '+' for the task's own operation, '-'
    for the memorisation pairs); frac / train_size still count the operation's own pairs, and
    the test pairs are only the operation's. 0: no mixture."""

    def __post_init__(self) -> None:
        _check_int("p", self.p)
        if self.p < 3 or not is_prime(self.p):
            raise ConfigError(f"p must be a prime >= 3, got {self.p} (try 59, 97 or 113)")
        if self.op not in OPS:
            raise ConfigError(f"op must be one of {', '.join(OPS)}; got {self.op!r}")
        if (self.frac is None) == (self.train_size is None):
            raise ConfigError("give exactly one of frac and train_size (--frac or --train-size)")
        if self.frac is not None:
            _check_float("frac", self.frac)
            if not 0.0 < self.frac <= 1.0:
                raise ConfigError(f"frac must lie in (0, 1], got {self.frac}")
        if self.train_size is not None:
            _check_int("train_size", self.train_size, 1)
            if self.train_size > self.n_pairs:
                raise ConfigError(
                    f"train_size {self.train_size} exceeds the {self.n_pairs} pairs of op "
                    f"{self.op!r}{'' if self.op in S5_OPS else f' at p={self.p}'}; use at most {self.n_pairs}"
                )
        _check_int("data_seed", self.data_seed, 0)
        if not isinstance(self.random_labels, bool):
            raise ConfigError(f"random_labels must be true or false, got {self.random_labels!r}")
        _check_int("subset_seed", self.subset_seed, 0)
        _check_float("label_noise", self.label_noise)
        if not 0.0 <= self.label_noise < 1.0:
            raise ConfigError(f"label_noise must lie in [0, 1), got {self.label_noise}")
        if self.label_noise and self.random_labels:
            raise ConfigError("label_noise corrupts a real table; with random_labels every label is noise already")
        _check_int("mix_mem", self.mix_mem, 0)
        if self.mix_mem:
            if self.op in S5_OPS:
                raise ConfigError(f"mix_mem mixes a memorisation task into a modular operation; op {self.op} is over S5")
            if self.mix_mem > self.n_elements * self.n_elements:
                raise ConfigError(f"mix_mem {self.mix_mem} exceeds the {self.n_elements ** 2} memorisation inputs "
                                  f"[a, -, b, =] at p={self.p}; use at most {self.n_elements ** 2}")
            for name, value, default in (("random_labels", self.random_labels, False), ("label_noise", self.label_noise, 0.0),
                                         ("pool_size", self.pool_size, None)):
                if value != default:
                    raise ConfigError(f"mix_mem does not combine with {name} (the mixture's memorisation pairs "
                                      f"are its random labels); leave {name} at {default}")
        if self.pool_size is not None:
            _check_int("pool_size", self.pool_size, 1)
            if self.pool_size > self.n_pairs:
                raise ConfigError(
                    f"pool_size {self.pool_size} exceeds the {self.n_pairs} pairs of op "
                    f"{self.op!r} at p={self.p}; use at most {self.n_pairs}"
                )
            if self.n_train > self.pool_size:
                raise ConfigError(
                    f"the training set ({self.n_train} pairs) must fit in the pool "
                    f"(pool_size {self.pool_size}); lower train_size or raise pool_size"
                )

    # The task's layout (circuits.tasks.base): derived, never stored. A modular task has the p
    # residues as elements and as answer classes, and '=' as one more token after them.
    @property
    def n_elements(self) -> int:
        """Elements a and b range over (the residues 0..p-1; the 120 permutations for S5)."""
        return S5_ORDER if self.op in S5_OPS else self.p

    @property
    def eq_token(self) -> int:
        """Index of the '=' token (after the elements, and after the two operator tokens of a
        mixture)."""
        return self.n_elements + 2 if self.mix_mem else self.n_elements

    @property
    def op_tokens(self) -> tuple[int, int] | None:
        """A mixture's operator tokens ('+' for the operation, '-' for the memorisation
        pairs), right after the elements; None without a mixture."""
        return (self.n_elements, self.n_elements + 1) if self.mix_mem else None

    @property
    def n_tokens(self) -> int:
        """Input vocabulary: the elements, a mixture's two operator tokens, and '='."""
        return self.eq_token + 1

    @property
    def n_classes(self) -> int:
        """Answer classes: the elements (the TransformerLens demo's choice)."""
        return self.n_elements

    @property
    def n_ctx(self) -> int:
        """Input sequence length: ``[a, b, =]``, or ``[a, op, b, =]`` in a mixture."""
        return 4 if self.mix_mem else 3

    @property
    def n_grid(self) -> int:
        """Inputs on the canonical grid: n_elements^2, twice that in a mixture (the
        operation's block, then the memorisation block)."""
        return self.n_elements * self.n_elements * (2 if self.mix_mem else 1)

    @property
    def n_pairs(self) -> int:
        """Number of valid (a, b) pairs: p^2, or p(p-1) when b = 0 is excluded (division)."""
        return self.p * (self.p - 1) if self.op == "div" else self.n_elements * self.n_elements

    @property
    def n_train_op(self) -> int:
        """Training pairs of the operation itself (int(frac * n_pairs), as the TransformerLens
        demo, or train_size)."""
        if self.train_size is not None:
            return self.train_size
        assert self.frac is not None
        return max(1, int(self.n_pairs * self.frac))

    @property
    def n_train(self) -> int:
        """Number of training pairs: the operation's, plus a mixture's memorisation pairs."""
        return self.n_train_op + self.mix_mem

    @property
    def n_noisy(self) -> int:
        """Training pairs with a corrupted label: round(label_noise * n_train)."""
        return round(self.label_noise * self.n_train)


@dataclass(frozen=True)
class ModelConfig:
    """A HookedTransformer-shaped model (Nanda et al. 2023 defaults: 1 layer, no LayerNorm)."""

    n_layers: int = 1
    """Number of transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per block; d_head = d_model // n_heads."""
    d_mlp: int = 512
    """MLP hidden width."""
    act_fn: str = "relu"
    """MLP activation: relu or gelu."""
    init: str = "gpt2"
    """gpt2: every W_ ~ N(0, (0.8/sqrt(d_model))^2) (TransformerLens); fan: 1/sqrt(fan) (official code)."""
    seed: int = 999
    """Seed of the weight initialisation (999: the TransformerLens demo)."""
    train_biases: bool = False
    """Train the biases (official code trains the MLP biases); else all biases stay frozen at 0."""
    init_scale: float = 1.0
    """Omnigrok's alpha (Liu et al. 2022b): every initial weight multiplied by this (> 0)."""
    normalization: str = "none"
    """none, or LN: TransformerLens' pre-LayerNorm (ln1, ln2, ln_final; Power et al.'s model)."""
    dropout: float = 0.0
    """Dropout on the attention and MLP outputs while training (Power et al.), in [0, 1)."""
    split_mlp: bool = False
    """Route each input of a mixture (``mix_mem``) through its own half of the MLP neurons:
    the operation's inputs through the first d_mlp / 2, the memorisation inputs through the
    rest (Huang et al. 2024, App. B: a task-routed, mixture-of-experts-like FFN)."""
    arch: str = "transformer"
    """transformer, or fcn: Clauw et al.'s (2024) fully connected network, one hidden ReLU layer
    of d_mlp units on the concatenated one-hots of a and b (d_model, n_heads, n_layers unused;
    PyTorch's Linear init, so init fan; reference engine)."""

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {self.normalization!r}")
        _check_float("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.split_mlp, bool):
            raise ConfigError(f"split_mlp must be true or false, got {self.split_mlp!r}")
        if self.split_mlp and self.d_mlp % 2:
            raise ConfigError(f"split_mlp gives each task half the MLP: d_mlp must be even, got {self.d_mlp}")
        _check_float("init_scale", self.init_scale)
        if self.init_scale <= 0:
            raise ConfigError(f"init_scale must be > 0 (Omnigrok's alpha multiplies the initial weights), "
                              f"got {self.init_scale}")
        for name in ("n_layers", "d_model", "n_heads", "d_mlp"):
            _check_int(name, getattr(self, name), 1)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.act_fn not in ACT_FNS:
            raise ConfigError(f"act_fn must be one of {', '.join(ACT_FNS)}; got {self.act_fn!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.arch == "fcn":
            given = [f"{name} {getattr(self, name)!r}" for name, ok in (
                ("init", "fan"), ("act_fn", "relu"), ("normalization", "none"), ("dropout", 0.0), ("split_mlp", False))
                if getattr(self, name) != ok]
            if given:
                raise ConfigError(f"arch fcn is Clauw et al.'s ReLU network with PyTorch's Linear init: it needs init fan, "
                                  f"act_fn relu, no LayerNorm, dropout or split MLP; got {', '.join(given)} "
                                  "(--preset clauw starts from their setting)")
        _check_int("seed", self.seed, 0)
        if not isinstance(self.train_biases, bool):
            raise ConfigError(f"train_biases must be true or false, got {self.train_biases!r}")

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    """Full-batch AdamW with weight decay (Nanda et al. 2023, TransformerLens demo regime)."""

    epochs: int = 40_000
    """Number of full-batch updates."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up: update s uses lr * min(s / warmup_steps, 1) (official code: 10)."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many epochs."""
    checkpoint_early_every: int = 20
    """Denser checkpoints early in training, every this many epochs ..."""
    checkpoint_early_until: int = 1000
    """... up to this epoch (0 turns the early checkpoints off)."""
    log_every: int = 10
    """Evaluate train/test loss and accuracy every this many epochs (and at every checkpoint)."""
    engine: str = "fused"
    """Training engine: fused (last-position tables, 1 layer) or reference (the hooked model)."""
    init_from: str | None = None
    """Start from the weights of this checkpoint file (fresh AdamW moments) instead of the
    seeded initialisation: Varma et al.'s ungrokking continues a grokked network."""
    init_sha256: str | None = None
    """sha256 of the ``init_from`` file, filled in when training starts. With it, the weights
    started from (not the path they were read from) identify the run: a moved experiment folder
    still resumes, and a changed parent checkpoint is refused by name."""
    optimizer: str = "adamw"
    """adamw (decoupled weight decay), adam (weight decay as L2 in the gradient) or sgd."""
    momentum: float = 0.0
    """SGD momentum (torch.optim.SGD's, no dampening); sgd only."""
    embed_lr: float | None = None
    """Learning rate of the embeddings W_E and W_pos (Liu et al. 2022's parameter groups; None: lr)."""
    embed_weight_decay: float | None = None
    """Weight decay of the embeddings W_E and W_pos (None: weight_decay)."""
    grokfast: str = "none"
    """Grokfast gradient filter (Lee et al. 2024): none, ema or ma."""
    grokfast_alpha: float = 0.98
    """Grokfast-EMA's momentum alpha."""
    grokfast_window: int = 100
    """Grokfast-MA's window (updates); nothing is added until it is full."""
    grokfast_lambda: float | None = None
    """Grokfast's amplification lambda (None: 2 for ema, 5 for ma)."""
    constrain_norm: bool = False
    """Omnigrok's constrained-norm training: after every update the trainable weights are
    rescaled to their total L2 norm just after initialisation."""
    batch_size: int | None = None
    """Minibatch size (None: full batch). With minibatches, epochs count updates; each pass
    over the training set is a seeded reshuffle, the last partial batch kept."""
    power_batches: bool = False
    """Minibatches of Power et al.'s size min(512, ceil(n_train / 2)); excludes batch_size."""

    @property
    def grokfast_gain(self) -> float:
        """The lambda in use: ``grokfast_lambda``, or the filter's default."""
        if self.grokfast_lambda is not None:
            return float(self.grokfast_lambda)
        return GROKFAST_LAMBDA.get(self.grokfast, 0.0)

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        _check_float("momentum", self.momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"momentum is SGD's; optimizer {self.optimizer} has its betas (set --optimizer sgd)")
        for name in ("embed_lr", "embed_weight_decay", "grokfast_lambda"):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name))
        if self.embed_lr is not None and self.embed_lr <= 0:
            raise ConfigError(f"embed_lr must be > 0, got {self.embed_lr}")
        if self.embed_weight_decay is not None and self.embed_weight_decay < 0:
            raise ConfigError(f"embed_weight_decay must be >= 0, got {self.embed_weight_decay}")
        if self.grokfast not in GROKFAST:
            raise ConfigError(f"grokfast must be one of {', '.join(GROKFAST)}; got {self.grokfast!r}")
        _check_float("grokfast_alpha", self.grokfast_alpha)
        if not 0.0 <= self.grokfast_alpha < 1.0:
            raise ConfigError(f"grokfast_alpha must lie in [0, 1), got {self.grokfast_alpha}")
        _check_int("grokfast_window", self.grokfast_window, 1)
        if self.grokfast_lambda is not None and self.grokfast_lambda < 0:
            raise ConfigError(f"grokfast_lambda must be >= 0, got {self.grokfast_lambda}")
        if not isinstance(self.constrain_norm, bool):
            raise ConfigError(f"constrain_norm must be true or false, got {self.constrain_norm!r}")
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        if not isinstance(self.power_batches, bool):
            raise ConfigError(f"power_batches must be true or false, got {self.power_batches!r}")
        if self.power_batches and self.batch_size is not None:
            raise ConfigError("give batch_size or power_batches, not both (--batch-size or --power-batches)")
        for name in ("lr", "weight_decay", "beta1", "beta2", "eps"):
            _check_float(name, getattr(self, name))
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("checkpoint_early_every", self.checkpoint_early_every, 1)
        _check_int("checkpoint_early_until", self.checkpoint_early_until, 0)
        _check_int("log_every", self.log_every, 1)
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ConfigError(f"init_from must be a checkpoint file path, got {self.init_from!r}")
        if self.init_sha256 is not None:
            if self.init_from is None:
                raise ConfigError("init_sha256 is set without init_from; give the checkpoint file as init_from")
            if (not isinstance(self.init_sha256, str) or len(self.init_sha256) != 64
                    or any(c not in "0123456789abcdef" for c in self.init_sha256)):
                raise ConfigError(f"init_sha256 must be 64 lowercase hex digits, got {self.init_sha256!r}")

    def is_checkpoint(self, epoch: int) -> bool:
        """Whether the weights after ``epoch`` updates are saved (epoch 0 = initialisation)."""
        if epoch == 0 or epoch == self.epochs or epoch % self.checkpoint_every == 0:
            return True
        return epoch <= self.checkpoint_early_until and epoch % self.checkpoint_early_every == 0

    @property
    def checkpoint_epochs(self) -> list[int]:
        """Every checkpoint epoch of the schedule, ascending."""
        return [e for e in range(self.epochs + 1) if self.is_checkpoint(e)]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run: same RunConfig, same weights (on one machine)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"
    """Name of the preset the run started from (only used to name its folder)."""

    def __post_init__(self) -> None:
        for name, cls in (("task", TaskConfig), ("model", ModelConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}")
        if not isinstance(self.preset, str) or not self.preset:
            raise ConfigError("preset must be a non-empty string")
        if self.train.engine == "fused" and self.model.n_layers != 1:
            raise ConfigError(
                f"engine fused supports n_layers = 1, got {self.model.n_layers}; "
                "use --engine reference"
            )
        if self.model.split_mlp and not self.task.mix_mem:
            raise ConfigError("split_mlp routes a mixture's two tasks through the two halves of the MLP; "
                              "give the mixture with --mix-mem N")
        if self.model.arch == "fcn":
            if self.train.engine == "fused":
                raise ConfigError("engine fused implements the transformer; arch fcn needs --engine reference")
            if self.task.n_ctx != 3:
                raise ConfigError("arch fcn reads inputs [a, b, =]; a mixture's [a, op, b, =] (mix_mem) is not one")
        if self.train.engine == "fused" and self.task.mix_mem:
            raise ConfigError("engine fused reads inputs [a, b, =]; a mixture's [a, op, b, =] (mix_mem) needs "
                              "--engine reference")
        if self.train.engine == "fused" and (self.model.normalization != "none" or self.model.dropout):
            what = "LayerNorm" if self.model.normalization != "none" else f"dropout {self.model.dropout}"
            raise ConfigError(f"engine fused does not support {what}; use --engine reference")
        if self.train.batch_size is not None and self.train.batch_size > self.task.n_train:
            raise ConfigError(f"batch_size {self.train.batch_size} exceeds the {self.task.n_train} training "
                              f"pairs; use at most {self.task.n_train} (or leave it out for full batches)")

    @property
    def batch(self) -> int | None:
        """The minibatch size in use (None: full batch): ``batch_size``, or Power et al.'s rule
        min(512, ceil(n_train / 2)) with ``power_batches``."""
        if self.train.power_batches:
            return min(512, -(-self.task.n_train // 2))
        return self.train.batch_size

    # Derived values: never stored, so they cannot disagree with the task.
    @property
    def d_vocab(self) -> int:
        """Input vocabulary: the task's tokens (the p residues plus '=', index p)."""
        return self.task.n_tokens

    @property
    def d_vocab_out(self) -> int:
        """Output classes: the task's answers (the p residues)."""
        return self.task.n_classes

    @property
    def n_ctx(self) -> int:
        """Sequence length of the task's inputs (``[a, b, =]``)."""
        return self.task.n_ctx

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Human-readable JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def science_dict(self) -> dict[str, Any]:
        """The fields that change the weights (everything but the preset's name).

        A run started from a checkpoint whose digest is known is identified by that digest, not
        by the path the checkpoint was read from.
        """
        d = self.to_dict()
        d.pop("preset")
        # Fields added after 0.1.0 count only when set: a config that leaves them at their
        # default keeps its hash, so its default run folder keeps its name (design.md).
        for (group, name), default in ADDED_FIELDS.items():
            if d[group][name] == default:
                d[group].pop(name)
        if d["train"]["init_sha256"] is not None:
            d["train"].pop("init_from")
        return d

    def short_hash(self) -> str:
        """Eight hex digits identifying the scientific content of the config."""
        blob = json.dumps(self.science_dict, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys and wrong types raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError("a run config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        for name, sub in (("task", TaskConfig), ("model", ModelConfig), ("train", TrainConfig)):
            if name in data:
                kwargs[name] = _sub_from_dict(sub, data[name], name)
        if "preset" in data:
            kwargs["preset"] = data["preset"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with flat field overrides (``p=59, weight_decay=0.5``), validated.

        Field names are unique across task, model and train, so a flat name is unambiguous.
        Setting ``train_size`` clears ``frac`` and vice versa unless both are given; setting
        ``init_from`` clears ``init_sha256`` unless both are given (the new file's digest is
        taken when training starts).
        """
        groups: dict[str, dict[str, Any]] = {"task": {}, "model": {}, "train": {}}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            owner = FIELD_OWNER.get(key)
            if owner is None:
                if key == "preset":
                    top[key] = value
                    continue
                raise ConfigError(f"unknown config field {key!r}")
            groups[owner][key] = _coerce(owner, key, value)
        task = groups["task"]
        if "train_size" in task and task["train_size"] is not None and "frac" not in task:
            task["frac"] = None
        if "frac" in task and task["frac"] is not None and "train_size" not in task:
            task["train_size"] = None
        if "init_from" in groups["train"] and "init_sha256" not in groups["train"]:
            groups["train"]["init_sha256"] = None
        return RunConfig(
            task=dataclasses.replace(self.task, **task),
            model=dataclasses.replace(self.model, **groups["model"]),
            train=dataclasses.replace(self.train, **groups["train"]),
            preset=top.get("preset", self.preset),
        )


_SUBCONFIGS = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig}
FIELD_OWNER: dict[str, str] = {
    f.name: owner for owner, cls in _SUBCONFIGS.items() for f in fields(cls)
}


def flat_fields(config: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A config (or its JSON dict) by flat field names: the task, model and train fields (their
    names are unique across the three) and the top-level ones (``preset``)."""
    data = config.to_dict() if isinstance(config, RunConfig) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def differing_fields(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """The fields of :func:`flat_fields` dicts whose values are not all the same, in the first
    dict's order (a field missing from a dict counts as None there)."""
    return [k for k in flats[0] if len({repr(f.get(k)) for f in flats}) > 1] if flats else []


def field_type(owner: str, name: str) -> type:
    """The base Python type of a config field (``int | None`` -> ``int``)."""
    hints = typing.get_type_hints(_SUBCONFIGS[owner])
    hint = hints[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return hint


def field_doc(owner: str, name: str) -> str:
    """The attribute docstring of a config field (used as CLI help)."""
    return _FIELD_DOCS.get((owner, name), "")


def _coerce(owner: str, name: str, value: Any) -> Any:
    """Accept ints for float fields (JSON writes 1.0 as 1 sometimes)."""
    if value is None:
        return None
    if field_type(owner, name) is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _sub_from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where!r} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(where, k, v) for k, v in data.items()}
    for k, v in kwargs.items():
        if v is None:
            continue
        expected = field_type(where, k)
        ok = isinstance(v, expected) and not (expected is not bool and isinstance(v, bool))
        if not ok:
            raise ConfigError(
                f"{where}.{k} must be of type {expected.__name__}, got {type(v).__name__}"
            )
    return cls(**kwargs)


def _attribute_docs() -> dict[tuple[str, str], str]:
    """Read the string literal after each dataclass field (PEP 257 attribute docstrings)."""
    import ast
    import inspect

    docs: dict[tuple[str, str], str] = {}
    for owner, cls in _SUBCONFIGS.items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[(owner, node.target.id)] = nxt.value.value.strip()
    return docs


_FIELD_DOCS = _attribute_docs()

PresetName = Literal["nanda", "quick", "quick-v1", "clauw"]


def preset(name: str) -> RunConfig:
    """A named starting configuration.

    ``nanda``: Nanda et al. (2023) in the TransformerLens demo regime (seeds 999/598, init
    N(0, 0.8^2/d_model), frozen zero biases, no warm-up, p = 113, 30% data, 40k epochs).
    ``quick``: the same widths at p = 59 with 45% data and weight decay 1.5, 3,000 epochs.
    Over the ten seed pairs (model 999 + s, data 598 + s, s = 0..9) every run groks (99% test
    accuracy at 1,471 +- 376 epochs, 95% interval) and 9 of 10 finish memorisation, circuit
    formation and cleanup inside the schedule; its own seeds (s = 9: 1008 / 607) are the median
    grokker of the ten, so the first run a user sees is a typical one (docs/reproductions.md).
    The preset it replaced (40% data, weight decay 1, the demo's seeds 999 / 598; 3 of 10 seed
    pairs grokked) is ``quick-v1`` (also the file ``docs/presets/quick-v1.json``): the base of
    every measurement recorded before 2026-12-06 and of the small configs the tests and the
    protocol scripts derive, so their numbers stay reproducible.
    ``clauw``: Clauw et al.'s (2024) setting for O-information: their fully connected network
    (250 ReLU units on concatenated one-hots, trained bias, PyTorch's Linear init), p = 97, 40%
    data, full-batch AdamW lr 0.03, betas (0.9, 0.98), weight decay 2.0 (their grokking setting;
    0.1 is their other), 6,000 steps, seeds 0 / 0; a checkpoint every 5 steps to 500 then every
    20 (theirs: every 5 throughout); reference engine.
    """
    if name == "nanda":
        return RunConfig(preset="nanda")
    if name == "quick":
        return RunConfig(
            task=TaskConfig(p=59, frac=0.45, data_seed=607),
            model=ModelConfig(seed=1008),
            train=TrainConfig(
                epochs=3000, weight_decay=1.5, checkpoint_every=50, checkpoint_early_every=10,
                checkpoint_early_until=300,
            ),
            preset="quick",
        )
    if name == "quick-v1":
        return RunConfig(
            task=TaskConfig(p=59, frac=0.4),
            train=TrainConfig(
                epochs=3000, checkpoint_every=50, checkpoint_early_every=10,
                checkpoint_early_until=300,
            ),
            preset="quick-v1",
        )
    if name == "clauw":
        return RunConfig(
            task=TaskConfig(p=97, frac=0.4, data_seed=0),
            model=ModelConfig(arch="fcn", d_mlp=250, init="fan", train_biases=True, seed=0),
            train=TrainConfig(
                epochs=6000, lr=0.03, weight_decay=2.0, checkpoint_every=20, checkpoint_early_every=5,
                checkpoint_early_until=500, log_every=5, engine="reference",
            ),
            preset="clauw",
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


PRESETS = ("nanda", "quick", "quick-v1", "clauw")
