"""The measure registry: every progress measure of ``circuits analyze`` is a registered family.

A family declares its columns (name, one-line doc, unit), its arrays, what it needs from the
forward pass over the (a, b) grid, the families whose results it reads, and the tasks it applies
to; it computes blockwise: ``start`` a state per stack of checkpoints, ``add`` each row block of
the grid (its logits and MLP activations, :func:`circuits.grid.grid_blocks`), ``finish`` into
columns and arrays. :func:`compute` runs a selection of families over a stack of checkpoints in
one pass over the grid; :func:`circuits.analysis.analyze` calls it for every batch of a run's
checkpoints, and :func:`measure` calls it for one model, so a notebook's one-call measure and
the batched analysis are the same code.

Adding a measure is one module: subclass :class:`Family`, decorate it with :func:`register`,
import the module. ``analyze(run, measures=[...])`` and ``circuits analyze --measures`` select
families by name; a family that does not apply to a run's task is skipped, with the reason
recorded in ``summary.json``, never filled with numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from circuits.config import RunConfig
    from circuits.tasks import FourierView, Task, ViewTable

__all__ = [
    "Column",
    "ArraySpec",
    "Family",
    "Block",
    "ViewBlock",
    "Checkpoints",
    "Result",
    "register",
    "unregister",
    "families",
    "family",
    "select",
    "parse_options",
    "compute",
    "measure",
    "load_checkpoint",
    "column_docs",
    "array_docs",
    "column_order",
]


@dataclass(frozen=True)
class Column:
    """One scalar per checkpoint: a column of ``measures.csv``."""

    name: str
    doc: str
    unit: str = ""


@dataclass(frozen=True)
class ArraySpec:
    """An array per checkpoint, stacked as ``[ckpt, ...]`` in ``arrays.safetensors``."""

    name: str
    doc: str


@dataclass
class Result:
    """What a family's ``finish`` gives: its columns ``[ckpt]``, its arrays ``[ckpt, ...]`` and
    anything ``shared`` with the families that read it (``uses``)."""

    columns: dict[str, Tensor] = field(default_factory=dict)
    arrays: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)


class Checkpoints:
    """A stack of checkpoints as the families see it: stacked weights (leading ``ckpt`` axis,
    classic names), the run's task and config, the key frequencies, and the results of the
    families finished so far (``results[name]``). ``init`` is the run's initialisation (epoch 0,
    stacked as ``[1, ...]``) when known: the chance baselines of the circuit split read it.
    ``memo`` is shared by every stack of one analysis (the analysis passes the same dict to each
    batch): a value that depends on the run alone, such as the split of ``init``, is computed
    there once rather than once per batch."""

    def __init__(self, params: Mapping[str, Tensor], task: Task, config: RunConfig, key: Sequence[int],
                 init: Mapping[str, Tensor] | None = None, memo: dict[Any, Any] | None = None,
                 positions: Sequence[int] | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
                 reference: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        self.params = dict(params)
        self.task, self.config = task, config
        self.key = [int(k) for k in key]
        self.init = dict(init) if init is not None else None
        self.memo: dict[Any, Any] = memo if memo is not None else {}
        self.positions = list(positions) if positions is not None else list(range(self.n_ckpt))
        """Each checkpoint's position among the run's checkpoints (0 = the first): a lens
        computed on every k-th checkpoint reads it."""
        self.options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (options or {}).items()}
        self._reference = reference
        self.results: dict[str, Result] = {}
        self.block_rows = 0
        """Rows of a per block of the grid pass (set by :func:`compute`): a family that goes over
        the grid again in ``finish`` uses the same blocks."""

    def option(self, family: Family, name: str) -> Any:
        """``family``'s setting ``name`` for this analysis (its default unless set)."""
        return self.options.get(family.name, {}).get(name, family.options[name])

    @cached_property
    def reference(self) -> dict[str, Tensor]:
        """The run's newest intact checkpoint, stacked as ``[1, ...]``: what a measure fits once
        per run is fit on (the key frequencies; O-information's neuron groups). Without a
        loader (one model measured alone), the stack's last checkpoint."""
        if self._reference is not None:
            return dict(self._reference())
        return {k: v[-1:] for k, v in self.params.items()}

    @property
    def p(self) -> int:
        """The task's number of elements (a modular task's p): the grid is p x p."""
        return self.task.n_elements

    @cached_property
    def view(self) -> FourierView:
        """The task's Fourier view (:class:`circuits.tasks.FourierView`): the frame of every
        ``fourier`` family (they are skipped for a task without one)."""
        view = self.task.fourier_view()
        if view is None:
            raise ValueError(type(self.task).no_view_reason(self.task.config))
        return view

    @cached_property
    def table(self) -> ViewTable:
        """The task's labels, validity and split in the view's coordinates."""
        return self.view.table(self.task)

    @property
    def n_ckpt(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def n_classes(self) -> int:
        return self.params["unembed.W_U"].shape[-1]

    @property
    def act_fn(self) -> str:
        return self.config.model.act_fn


class Block:
    """Rows ``a0 <= a < a1`` of the (a, b) grid for every checkpoint of the stack: the
    last-position ``logits`` (float32, ``[ckpt, pairs, cls]``) and MLP activations ``post``
    (``[ckpt, pairs, d_mlp]``); ``x64`` is the logits in float64, made once for all families."""

    def __init__(self, a0: int, a1: int, p: int, logits: Tensor | None, post: Tensor | None,
                 view: FourierView | None = None) -> None:
        self.a0, self.a1, self.logits, self.post = a0, a1, logits, post
        self.span = slice(a0 * p, a1 * p)
        self._view = view

    @cached_property
    def x64(self) -> Tensor:
        assert self.logits is not None
        return self.logits.to(torch.float64)

    @cached_property
    def fourier(self) -> ViewBlock:
        """The block in the task's Fourier view (what the ``fourier`` families read)."""
        if self._view is None:
            raise ValueError("this task has no Fourier view")
        return ViewBlock(self, self._view)


class ViewBlock:
    """A :class:`Block` in the coordinates of the task's :class:`circuits.tasks.FourierView`:
    ``rows`` (the view rows it holds: an int a0 for a view that is the whole grid, else a
    tensor), ``span`` (their pairs' view indices), ``post``, ``logits`` and ``x64`` with the
    pairs (and classes) in view order. For add and sub these are the block's own tensors."""

    def __init__(self, block: Block, view: FourierView) -> None:
        self._block, self.view = block, view
        if view.identity:
            self.rows: int | Tensor = block.a0
            self.span: slice | Tensor = block.span
        else:
            pos = view.element_position[block.a0 : block.a1]
            self._keep = torch.nonzero(pos >= 0).squeeze(1)
            self.rows = pos[self._keep]
            self.span = (self.rows[:, None] * view.n + torch.arange(view.n)).reshape(-1)

    def _take(self, x: Tensor, classes: bool) -> Tensor:
        v, b = self.view, self._block
        grid = x.reshape(x.shape[0], b.a1 - b.a0, v.n_elements, x.shape[-1])
        out = grid[:, self._keep][:, :, v.elements].reshape(x.shape[0], -1, x.shape[-1])
        return out.index_select(-1, v.classes) if classes else out

    @property
    def post(self) -> Tensor:
        post = self._block.post
        assert post is not None
        return post if self.view.identity else self._take(post, False)

    @cached_property
    def logits(self) -> Tensor:
        logits = self._block.logits
        assert logits is not None
        return logits if self.view.identity else self._take(logits, True)

    @cached_property
    def x64(self) -> Tensor:
        return self._block.x64 if self.view.identity else self.logits.to(torch.float64)


class Family:
    """A family of measures; subclass it, set the class attributes, and :func:`register` it.

    ``needs``: what the grid pass must give its ``add`` (``"logits"``, ``"post"``); empty for
    a family computed from the weights alone. ``uses``: families whose :class:`Result` it reads
    in ``finish`` (selected with it, finished before it). ``fourier``: it needs the task's
    Fourier basis and key frequencies. ``one_layer``: it needs a one-layer model. ``internal``: a shared accumulator with no columns of
    its own, selected only through another family's ``uses``. ``dynamic_columns``: a doc for
    columns whose names are only known from the weights (``norm_sq.<parameter>``).
    """

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    columns: ClassVar[tuple[Column, ...]] = ()
    arrays: ClassVar[tuple[ArraySpec, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
    uses: ClassVar[tuple[str, ...]] = ()
    fourier: ClassVar[bool] = False
    one_layer: ClassVar[bool] = True
    """It reads a one-layer transformer (the grid forward and ``blocks.0``'s weights); the
    families that do not (the norms) set False."""
    internal: ClassVar[bool] = False
    default: ClassVar[bool] = True
    """Computed when no selection is given. A lens that costs much more than the core measures
    sets False: it is computed only when named (``measures=["default", "oinfo"]``)."""
    options: ClassVar[Mapping[str, Any]] = {}
    """Its settings and their defaults (``{"every": 1}``); a run's analysis may set them
    (``analyze(run, options={"oinfo.every": 10})``, ``circuits analyze --option oinfo.every=10``)
    and records them; rows are reused only under the same settings."""
    zero_allowed: ClassVar[frozenset[str]] = frozenset()
    """Numeric settings that may be 0 (a seed, a burn-in, a 0 that means "automatic"); the
    others must be positive."""
    dynamic_columns: ClassVar[tuple[str, str] | None] = None
    """``(prefix, doc)`` of columns named ``<prefix><something>``."""

    def applies(self, config: RunConfig) -> str | None:
        """None when the family applies to this run; otherwise why it does not."""
        return None

    def start(self, ckpts: Checkpoints) -> Any:
        """The state its blocks accumulate into (None for a weights-only family)."""
        return None

    def add(self, state: Any, ckpts: Checkpoints, block: Block) -> None:
        """Accumulate one row block of the grid (called only when ``needs`` is not empty)."""

    def finish(self, state: Any, ckpts: Checkpoints) -> Result:
        raise NotImplementedError


_REGISTRY: dict[str, Family] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_COLUMN = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family (an instance of ``cls``) to the registry, by its name.

    Registering a name again replaces the family (a notebook redefining its measure)."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{cls.__name__}.name is {name!r}: a family needs a lowercase name of letters, "
                         "digits and _ (it names CLI choices, summary keys and dashboard panels)")
    for col in cls.columns:
        if not _COLUMN.fullmatch(col.name) or col.name == "epoch":
            raise ValueError(f"column {col.name!r} of {name!r}: use letters, digits, _ and ., not 'epoch'")
    taken = {c.name: f.name for f in _REGISTRY.values() if f.name != cls.name for c in f.columns}
    for col in cls.columns:
        if col.name in taken:
            raise ValueError(f"column {col.name!r} of {cls.name!r} is already {taken[col.name]!r}'s")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a family (a test's own, say) from the registry."""
    _REGISTRY.pop(name, None)


def families(internal: bool = False) -> list[Family]:
    """Every registered family, in registration order (the columns' order in ``measures.csv``)."""
    return [f for f in _REGISTRY.values() if internal or not f.internal]


def family(name: str) -> Family:
    """The registered family ``name``; a ValueError naming the choices otherwise."""
    if name not in _REGISTRY or _REGISTRY[name].internal:
        choices = ", ".join(["default", "all", *(f.name for f in families())])
        raise ValueError(f"no measure family {name!r}; choose from {choices}")
    return _REGISTRY[name]


def parse_options(options: Mapping[str, Any] | Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """Family settings, given as ``{"oinfo.every": 10}`` or as ``["oinfo.every=10", ...]``
    (the CLI's ``--option``), checked against the families' declared options and converted to
    the type of each default: ``{"oinfo": {"every": 10}}``; a numeric setting must be positive,
    or at least 0 where the family allows it (``Family.zero_allowed``: seeds, a burn-in, a 0 that
    means automatic). A ValueError names a bad one."""
    if options is None:
        return {}
    items: list[tuple[str, Any]] = []
    if isinstance(options, Mapping):
        items = list(options.items())
    else:
        for text in options:
            key, eq, value = str(text).partition("=")
            if not eq:
                raise ValueError(f"option {text!r} is not FAMILY.NAME=VALUE (for example oinfo.every=10)")
            items.append((key.strip(), value.strip()))
    out: dict[str, dict[str, Any]] = {}
    for key, value in items:
        fam_name, dot, name = key.partition(".")
        if not dot:
            raise ValueError(f"option {key!r} is not FAMILY.NAME (for example oinfo.every)")
        fam = family(fam_name)
        if name not in fam.options:
            known = ", ".join(f"{fam.name}.{o}" for o in fam.options) or "none"
            raise ValueError(f"the {fam.name} measures have no option {name!r} (theirs: {known})")
        out.setdefault(fam.name, {})[name] = _convert(fam.options[name], value, key, name in fam.zero_allowed)
    return out


def _convert(default: Any, value: Any, key: str, zero: bool = False) -> Any:
    """``value`` as the type of ``default`` (an option given as text on the command line)."""
    kind = type(default)
    what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        converted = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={value!r}: expected {what}") from None
    if kind in (int, float) and not (converted >= 0 if zero else converted > 0):
        raise ValueError(f"option {key}={value!r}: expected a {'non-negative' if zero else 'positive'} "
                         f"{what.split()[-1]}")
    return converted


def select(names: Iterable[str] | None = None) -> list[Family]:
    """The families ``names`` plus those they use, each after what it uses. ``None`` or the
    name ``"default"`` stands for the default families (every one but the opt-in lenses),
    ``"all"`` for every family: ``select(["default", "rqi"])`` adds one lens to the default."""
    wanted: list[str] = []
    for n in ["default"] if names is None else names:
        if n == "default":
            wanted += [f.name for f in families() if f.default]
        elif n == "all":
            wanted += [f.name for f in families()]
        else:
            wanted.append(family(n).name)
    order: list[Family] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"measure families use each other in a cycle: {' -> '.join((*path, name))}")
        if any(f.name == name for f in order):
            return
        if name not in _REGISTRY:
            raise ValueError(f"measure family {path[-1]!r} uses {name!r}, which is not registered")
        for dep in _REGISTRY[name].uses:
            visit(dep, (*path, name))
        order.append(_REGISTRY[name])

    for name in sorted(set(wanted), key=list(_REGISTRY).index):
        visit(name, ())
    return order


def applicable(chosen: Sequence[Family], config: RunConfig) -> tuple[list[Family], dict[str, str]]:
    """``(families to compute, {skipped family: reason})``: a family that does not apply is
    skipped, and so is any family that uses a skipped one."""
    from circuits.tasks import fourier_view, task_class
    from circuits.grid import grid_problem

    keep: list[Family] = []
    skipped: dict[str, str] = {}
    fourier = fourier_view(config.task) is not None
    for f in chosen:
        reason = f.applies(config)
        if reason is None and f.fourier and not fourier:
            reason = task_class(config.task).no_view_reason(config.task)
        if reason is None and f.one_layer:
            reason = grid_problem(config)
        if reason is None and "post" in f.needs:
            reason = activations_problem(config)
        if reason is None:
            missing = [d for d in f.uses if d in skipped]
            if missing:
                reason = f"it uses {missing[0]!r}, which does not apply: {skipped[missing[0]]}"
        if reason is None:
            keep.append(f)
        else:
            skipped[f.name] = reason
    return keep, skipped


def compute(
    ckpts: Checkpoints, chosen: Sequence[Family], block_rows: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run ``chosen`` (as :func:`select` orders them) over a stack of checkpoints: one pass over
    row blocks of the grid feeds every family that needs it, then each finishes in order.
    Returns ``(columns, arrays)`` of the non-internal families."""
    from circuits.grid import grid_blocks, grid_problem

    with torch.no_grad():
        states = {f.name: f.start(ckpts) for f in chosen}
        ckpts.block_rows = block_rows or _block_rows(ckpts)
        # The activations are reduced first, while the forward has just left them in the cache,
        # and dropped before the logits' float64 passes: the order of the single-function pass
        # this replaced, so the block's working set is what it was.
        by_post = [f for f in chosen if "post" in f.needs]
        by_logits = [f for f in chosen if f.needs and "post" not in f.needs]
        if by_post or by_logits:
            view = ckpts.task.fourier_view()
            source = (grid_blocks(ckpts.params, ckpts.task, ckpts.act_fn, ckpts.block_rows)
                      if grid_problem(ckpts.config) is None else model_blocks(ckpts))
            for a0, a1, logits, post in source:
                block = Block(a0, a1, ckpts.p, logits, post, view)
                del logits, post
                for f in by_post:
                    f.add(states[f.name], ckpts, block)
                block.post = None
                for f in by_logits:
                    f.add(states[f.name], ckpts, block)
                del block
        cols: dict[str, Tensor] = {}
        arrays: dict[str, Tensor] = {}
        for f in chosen:
            result = f.finish(states.pop(f.name), ckpts)
            ckpts.results[f.name] = result
            if not f.internal:
                cols.update(result.columns)
                arrays.update(result.arrays)
    return cols, arrays


def activations_problem(config: RunConfig) -> str | None:
    """Why the analysis cannot read a run's MLP activations ``post`` (None: it can): they come
    from the grid forward of a one-layer transformer, or from the hidden layer of the fully
    connected network (``arch fcn``)."""
    from circuits.grid import grid_problem

    if config.model.arch == "fcn":
        return None
    problem = grid_problem(config)
    if problem is None:
        return None
    return f"it reads MLP activations (a one-layer transformer's grid forward or the fcn's hidden layer): {problem}"


def model_blocks(ckpts: Checkpoints) -> Iterator[tuple[int, int, Tensor, Tensor | None]]:
    """The blocks of :func:`compute`'s pass for a run the grid forward cannot read
    (:func:`circuits.grid.grid_problem`: two layers, LayerNorm, a mixture's ``[a, op, b, =]``,
    the fully connected network): each checkpoint's model, run on every input of the task's
    canonical grid, gives the logits at the answer position, and for the fully connected
    network its hidden activations as ``post`` (None otherwise: :func:`activations_problem`)."""
    logits, post = model_outputs(ckpts.params, ckpts.config, ckpts.task)
    rows = ckpts.task.n_pairs // ckpts.p
    yield 0, rows, logits, post


def model_outputs(
    params: Mapping[str, Tensor], config: RunConfig, task: Task
) -> tuple[Tensor, Tensor | None]:
    """``(logits [ckpt, pairs, cls], post [ckpt, pairs, d_mlp] or None)`` of a stack of
    checkpoints, each loaded into the run's own model and run on the task's canonical grid;
    ``post`` is the fully connected network's ``hidden.hook_post``."""
    from circuits.model import make_model

    model = make_model(config)
    logits, posts = [], []
    hook = "hidden.hook_post" if config.model.arch == "fcn" else None
    n = next(iter(params.values())).shape[0]
    for i in range(n):
        load_checkpoint(model, params, i)
        if hook is None:
            logits.append(model(task.tokens)[:, -1].float())
        else:
            out, cache = model.run_with_cache(task.tokens, names_filter=hook)
            logits.append(out[:, -1].float())
            posts.append(cache[hook].float())
    return torch.stack(logits), (torch.stack(posts) if posts else None)


def post_activations(params: Mapping[str, Tensor], task: Task, config: RunConfig) -> Tensor:
    """``[ckpt, pairs, d_mlp]``: the MLP activations at the answer position over the task's
    canonical grid (the grid forward, or the fully connected network's hidden layer)."""
    from circuits.grid import grid_forward, grid_problem

    if grid_problem(config) is None:
        return grid_forward(params, task, config.model.act_fn)[1]
    problem = activations_problem(config)
    if problem is not None:
        raise ValueError(problem)
    _, post = model_outputs(params, config, task)
    assert post is not None
    return post


def load_checkpoint(model: Any, params: Mapping[str, Tensor], i: int) -> None:
    """Load checkpoint ``i`` of stacked weights ``params`` into ``model`` (a run's
    :func:`circuits.model.make_model`): a ValueError when they do not fit it (buffers, which
    checkpoints do not hold, excepted)."""
    from circuits.model import is_buffer_key

    missing, unexpected = model.load_state_dict({k: v[i] for k, v in params.items()}, strict=False)
    if unexpected or any(not is_buffer_key(k) for k in missing):
        raise ValueError(f"checkpoint weights do not fit the run's model: missing {missing}, unexpected {unexpected}")


def _block_rows(ckpts: Checkpoints) -> int:
    """Rows of a per block: about 4 MB of activations per block, so the memory-bound
    reductions over them run from the cache (2-8 checkpoints per batch measured best on a
    2-core EPYC with 32 MB L3; the whole grid at once was 25-30% slower: benchmarks/analyze.py)."""
    d_mlp = ckpts.config.model.d_mlp
    return max(1, (4 << 20) // (ckpts.n_ckpt * ckpts.p * d_mlp * 4))


def measure(
    model_or_params: Any,
    task: Task,
    config: RunConfig,
    measures: Iterable[str] | None = None,
    key_freqs: Sequence[int] | None = None,
    init: Any = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Every (or the chosen) measure of one model, as :func:`circuits.analysis.analyze`
    computes it for a checkpoint: ``{column: value}``. ``key_freqs`` default: detected from the
    model's own neurons (the analysis takes the run's newest checkpoint's). ``init``: the run's
    initial model or state dict (``run.model(0)``), for the columns measured against it
    (``mem_norm_sq_init``; NaN without it). A family that does not apply to the task is left
    out (its reason: :func:`applicable`). ``options``: the families' settings
    (``{"rqi.delta": 0.1}``, :func:`parse_options`); ``measures=["default", "rqi"]`` adds an
    opt-in lens to the default ones."""
    params = stacked_weights(model_or_params)
    settings = parse_options(options)
    if key_freqs is None:
        key_freqs = detect_key_frequencies(params, config)
    keep, _ = applicable(select(measures), config)
    init_params = stacked_weights(init) if init is not None else None
    cols, _ = compute(Checkpoints(params, task, config, key_freqs, init_params, options=settings), keep)
    return {name: float(v[0]) for name, v in cols.items()}


def stacked_weights(model_or_params: Any) -> dict[str, Tensor]:
    """One model (or state dict) as a stack of one checkpoint, on the CPU."""
    from circuits.grid import stack_state_dicts

    sd = model_or_params.state_dict() if hasattr(model_or_params, "state_dict") else model_or_params
    return stack_state_dicts([{k: v.detach().cpu() for k, v in sd.items()}])


def detect_key_frequencies(params: Mapping[str, Tensor], config: RunConfig) -> list[int]:
    """Key frequencies of the last checkpoint of a stack, by the neurons' vote
    (:func:`circuits.measures.frequencies.key_frequencies`) in the task's Fourier view; none
    for a task without one."""
    from circuits.grid import grid_forward, grid_problem
    from circuits.measures.frequencies import key_frequencies, neuron_frequency_fractions
    from circuits.tasks import fourier_view

    view = fourier_view(config.task)
    if view is None or grid_problem(config) is not None:
        return []
    last = {k: v[-1:] for k, v in params.items()}
    with torch.no_grad():
        _, post = grid_forward(last, config.task, config.model.act_fn)
    return key_frequencies(neuron_frequency_fractions(post[0], view))


def column_docs(chosen: Sequence[Family] | None = None) -> dict[str, dict[str, str]]:
    """``{column: {"doc", "unit", "family"}}`` of the chosen families (default: all)."""
    out: dict[str, dict[str, str]] = {}
    for f in chosen if chosen is not None else families():
        if f.internal:
            continue
        for c in f.columns:
            out[c.name] = {"doc": c.doc, "unit": c.unit, "family": f.name}
        if f.dynamic_columns is not None:
            prefix, doc = f.dynamic_columns
            out[f"{prefix}*"] = {"doc": doc, "unit": "", "family": f.name}
    return out


def array_docs(chosen: Sequence[Family] | None = None) -> dict[str, str]:
    """``{array: doc}`` of the chosen families (default: all), after ``epochs``."""
    out = {"epochs": "int64 [ckpt]: the checkpoint epoch of each row of every other array"}
    for f in chosen if chosen is not None else families():
        out.update({a.name: a.doc for a in f.arrays})
    return out


def column_order(chosen: Sequence[Family] | None = None) -> tuple[str, ...]:
    """``epoch`` and the declared columns of the chosen families, in registry order."""
    names = ["epoch"]
    for f in chosen if chosen is not None else families():
        names += [c.name for c in f.columns]
    return tuple(names)
