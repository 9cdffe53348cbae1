"""Many runs as stacked ensembles, each an ordinary run folder; one row of final measures per run.

Every protocol in :mod:`circuits.experiments` builds a list of named :class:`Member` configs,
hands it to :func:`run_members`, and reads the finished runs back with :func:`final_measures`.
Members that share shapes and schedule train together as one stacked computation
(:mod:`circuits.engine.ensemble`); the rest go in further ensembles. A killed protocol resumes:
finished runs are skipped and unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuits.config import RunConfig, differing_fields, flat_fields
from circuits.grid import grid_forward, grid_problem, stack_state_dicts
from circuits.experiments.executors import StackJob, plan_stacks, train_chunk
from circuits.errors import ProtocolError
from circuits.measures.circuits import circuit_efficiency, part_logit_stats, sum_direction_share
from circuits.measures.frequencies import key_frequencies, neuron_frequency_fractions
from circuits.measures.norms import weight_norm_sq
from circuits.model import make_model
from circuits.run import Run, load_run
from circuits.store import CONFIG_FILE, RUNS_DIR, atomic_write_bytes, is_safe_name
from circuits.tasks import MixtureTask
from circuits.trainer import StepInfo, split_metrics, with_init_digest

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = [
    "interval_by",
    "Member",
    "ExperimentResult",
    "run_members",
    "final_measures",
    "member_table",
    "RUNS_DIR",
    "check_grid",
]


#: Members per ensemble: 64 nanda-sized members peak at 4.8 GB (docs/benchmarks.md).
MAX_ENSEMBLE = 64


@dataclass(frozen=True)
class Member:
    """One run of a protocol: a folder name under ``<out>/runs/``, its config, and table labels."""

    name: str
    config: RunConfig
    labels: tuple[tuple[str, Any], ...] = ()

    def label_dict(self) -> dict[str, Any]:
        """The labels as a dict (the protocol's grid coordinates: size, seed, width, ...)."""
        return dict(self.labels)


@dataclass
class ExperimentResult:
    """A protocol's outcome: one row per run (or per setting), a figure, and headline numbers."""

    table: pd.DataFrame
    figure: go.Figure
    summary: dict[str, Any]
    path: Path | None = None
    name: str = ""
    """The protocol's file stem: ``<path>/<name>.csv``, ``.json`` (set when written) and the
    page of its figures, ``.html``, drawn by the caller (:func:`circuits.report.write_experiment_page`)."""
    extra_figures: tuple[go.Figure, ...] = ()
    """Figures beyond the main one, shown after it on the protocol's page."""


def check_grid(name: str, values: Sequence[Any]) -> list[Any]:
    """The grid as a sorted list without repeats; a clear error when it is empty."""
    values = sorted(set(values))
    if not values:
        raise ProtocolError(f"the {name} grid is empty; give at least one value")
    return values


def _is_done(path: Path, config: RunConfig) -> bool:
    if not (path / CONFIG_FILE).is_file():
        return False
    run = load_run(path)
    return run.is_complete and run.config.science_dict == config.science_dict


def run_members(
    members: Sequence[Member],
    out: str | Path,
    max_ensemble: int = MAX_ENSEMBLE,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> list[Run]:
    """Train every member into ``<out>/runs/<name>``, as few stacked ensembles as shapes allow.

    Finished members are skipped, so calling it again after a kill resumes the protocol.
    ``on_group(group, n_groups, n_members)`` is called before each ensemble starts and
    ``on_step`` after every update of it; ``device`` is where the ensembles compute (``"cuda"``;
    default the CPU). ``executor`` (:func:`circuits.experiments.executors.make_executor`: local
    worker processes or Ray) trains the stacks elsewhere, as a sweep's; default: this process.
    A member that fails or diverges there raises :class:`ProtocolError` once the others are done.
    Returns the runs in the members' order.
    """
    names = [m.name for m in members]
    for name in names:  # each becomes a folder under <out>/runs/
        if not is_safe_name(name):
            raise ProtocolError(
                f"member name {name!r} cannot name a run folder (letters, digits and ._=+- only)"
            )
    if len(set(names)) != len(names):
        raise ProtocolError("two protocol members share a name; each needs its own run folder")
    root = Path(out) / RUNS_DIR
    paths = {m.name: root / m.name for m in members}
    # Once here: the check below and the training after it then see the same digest.
    members = [dataclasses.replace(m, config=with_init_digest(m.config)) for m in members]
    todo = [m for m in members if not _is_done(paths[m.name], m.config)]
    # The same split into stacks as a sweep's executors (circuits.experiments.executors).
    chunks = [[todo[i] for i in idx] for idx in plan_stacks([m.config for m in todo], max_ensemble)]
    if executor is not None and chunks:
        _run_elsewhere(executor, chunks, paths, device, on_group)
        return [load_run(paths[m.name]) for m in members]
    for i, chunk in enumerate(chunks):
        if on_group is not None:
            on_group(i, len(chunks), len(chunk))
        train_chunk([m.config for m in chunk], [paths[m.name] for m in chunk], on_step=on_step, device=device)
    return [load_run(paths[m.name]) for m in members]


def _run_elsewhere(executor: Any, chunks: list[list[Member]], paths: dict[str, Path], device: str | None,
                   on_group: Callable[[int, int, int], None] | None) -> None:
    jobs = [StackJob(tuple(m.config for m in chunk), tuple(str(paths[m.name]) for m in chunk),
                     executor.threads, device) for chunk in chunks]
    bad: list[str] = []

    def on_start(i: int) -> None:
        if on_group is not None:
            on_group(i, len(jobs), len(jobs[i].paths))

    def on_done(i: int, outcomes: list[Any]) -> None:
        bad.extend(f"{Path(o.path).name} {o.status}: {o.error}" for o in outcomes if o.status != "done")

    executor.run(jobs, on_done, on_start=on_start)
    if bad:
        raise ProtocolError(f"{len(bad)} member(s) did not finish (the others did): " + "; ".join(bad[:3]))


@torch.no_grad()
def final_measures(run: Run, epoch: int | None = None) -> dict[str, float | int | None]:
    """The numbers every protocol tabulates, from one checkpoint (default: the last).

    Loss and accuracy on the run's split (float64 loss over the full grid), the total parameter
    norm ``sqrt(sum of squared weights)``, the network's mean logit margin on the training pairs
    (correct-class logit minus the mean other-class logit) and its efficiency =
    margin^(1/4) / norm (Varma et al. 2023; scale-free, as the circuit columns:
    :func:`circuits.measures.circuits.circuit_efficiency`), the trig-subspace shares of the
    logits (``gen_share_all``: every frequency, i.e. the part that depends on a+b only;
    ``gen_share``: the key frequencies the network's neurons vote for) and the number of key
    frequencies. A run the grid forward cannot read (:func:`circuits.grid.grid_problem`) is
    evaluated by its model's own forward and gets no shares; a mixture also gets each block's
    training accuracy (``op_train_acc``, ``mem_train_acc``).
    """
    epoch = run.epochs[-1] if epoch is None else epoch
    state = run.state_dict(epoch)
    task = run.task
    if grid_problem(run.config) is None:
        params = stack_state_dicts([state])
        logits, post = grid_forward(params, run.config.task, run.config.model.act_fn)
    else:
        # A model the grid forward cannot read (2 layers, LayerNorm, a mixture's [a, op, b, =]):
        # its own forward over the task's inputs, on the weights already read (run.model would
        # read and check the checkpoint again); the Fourier shares, which need the grid's MLP
        # activations, are then not given.
        model = make_model(run.config)
        model.load_state_dict(state)
        logits, post = model.eval()(task.tokens)[:, -1][None], None
    out: dict[str, float | int | None] = {"epoch": epoch}
    out.update(split_metrics(logits[0].to(torch.float64), task))
    if isinstance(task, MixtureTask):
        # Each block's own training accuracy: the operation's and the memorised pairs'.
        pred = logits[0].argmax(-1)
        for name, idx in (("op_train_acc", task.op_train_idx), ("mem_train_acc", task.mem_idx)):
            out[name] = float((pred[idx] == task.labels[idx]).double().mean())
    norm_sq = weight_norm_sq(state)
    _, margin = part_logit_stats(logits.to(torch.float64), task.labels, task.train_idx)
    out.update(
        weight_norm=norm_sq**0.5,
        margin_train=float(margin[0]),
        efficiency=float(circuit_efficiency(margin[0], torch.tensor(norm_sq, dtype=torch.float64))),
    )
    if not task.has_fourier or post is None:  # the shares need the task's answer directions
        out.update(gen_share_all=None, gen_share=None, n_key_freqs=None)
        return out
    key = key_frequencies(neuron_frequency_fractions(post[0], task))
    out.update(
        gen_share_all=float(sum_direction_share(logits, task)[0]),
        gen_share=float(sum_direction_share(logits, task, key)[0]) if key else 0.0,
        n_key_freqs=len(key),
    )
    return out


def interval_by(table: pd.DataFrame, group: str, column: str) -> dict[str, dict[str, float | int | None]]:
    """Per value of ``group``: the mean of ``column`` over its rows (seeds) with the half-width
    of its Student-t 95% interval and the count (science.md, "Statistics"; NaN rows, such as
    a threshold not reached, are left out of both and counted apart in ``missing``)."""
    from circuits.stats import interval

    out: dict[str, dict[str, float | int | None]] = {}
    for key, part in table.groupby(group):
        values = [float(v) for v in part[column] if v is not None and v == v]
        name = str(int(key)) if isinstance(key, (int, float)) and float(key).is_integer() else str(key)
        out[name] = {**interval(values), "missing": int(len(part) - len(values))}
    return out


def member_table(members: Sequence[Member], runs: Sequence[Run]) -> pd.DataFrame:
    """One row per member: its labels, every config field whose value differs between the
    members (a knob the protocol varies without naming it, such as the seeds or a mixed-in
    training option, is then a column too), then :func:`final_measures` of its last checkpoint."""
    import pandas as pd

    flat = [flat_fields(m.config) for m in members]
    varying = differing_fields(flat)
    rows = []
    for m, run, fields in zip(members, runs, flat):
        labels = m.label_dict()
        knobs = {k: fields[k] for k in varying if k not in labels}
        rows.append({**labels, **knobs, "run": m.name, **final_measures(run)})
    return pd.DataFrame(rows)


def write_result(
    result: ExperimentResult, out: str | Path, name: str, extra_figures: Sequence[go.Figure] = ()
) -> ExperimentResult:
    """Write ``<name>.csv`` and ``<name>.json`` (summary) under ``out``; the figures stay on the
    result (``figure``, ``extra_figures``) for the caller to draw (experiments never import the
    dashboard)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{name}.csv", result.table.to_csv(index=False).encode())
    atomic_write_bytes(
        out / f"{name}.json", (json.dumps(result.summary, indent=2, default=_json_default) + "\n").encode()
    )
    result.path, result.name, result.extra_figures = out, name, tuple(extra_figures)
    return result


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
