"""``analyze(run)``: every progress measure over every checkpoint, batched, incremental.

Writes (by default to ``analyses/<run path relative to checkpoints/>/``):

* ``measures.csv``: one row per checkpoint (columns in :data:`MEASURE_COLUMNS` plus
  ``norm_sq.<parameter>`` for each parameter);
* ``arrays.safetensors``: the array-valued measures, all with a leading checkpoint axis matching
  the tensor ``epochs`` (see :data:`ARRAY_DOCS`);
* ``summary.json``: key frequencies (and the checkpoint they came from), neuron cluster sizes,
  phase boundaries, final metrics, the measure variants used, and any damaged checkpoints.

A second call computes only what it cannot reuse. Every row is tied to the exact inputs it was
computed from (``summary.json["inputs"]``: each checkpoint's sha256 from the run's manifest, the
config, the split file's sha256, the key frequencies and the analysis format): a row whose
checkpoint changed (a run retrained with ``--force``) or that belongs to another run is
recomputed, a row whose checkpoint is gone is dropped, and a new key-frequency set recomputes
every row (science.md, Decisions). ``summary.json`` also records the sha256 of the two tables,
so a table changed or damaged after it was written is named by :func:`load_analysis` and
recomputed by the next :func:`analyze`. A damaged checkpoint is named and skipped.

Default folders never collide (design.md, "Where analyses go"): a run under a ``checkpoints/``
folder is analysed into ``analyses/<its path under checkpoints/>`` beside that folder, any other
run into ``analyses/<name>-<8 hex of its resolved path>``. ``analyze`` writes only into a new or
empty folder or one of its own, and holds the folder's lock while it writes.
"""

from __future__ import annotations

import logging

import csv
import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from circuits.grid import grid_problem, stack_state_dicts
from circuits.engine.memory import keep_freed_memory
from circuits.errors import AnalysisFolderError, CheckpointError
from circuits.lock import hold_run_folder
from circuits.measures import families as _builtin  # noqa: F401 - registers the built-in families
from circuits.measures.frequencies import CLUSTER_THRESHOLD
from circuits.measures.phases import non_finite_epoch, phase_boundaries
from circuits.measures.registry import (
    Checkpoints,
    Family,
    applicable,
    array_docs,
    column_docs,
    column_order,
    compute,
    detect_key_frequencies,
    families,
    parse_options,
    select,
)
from circuits.run import DEFAULT_RUNS_DIR, Run, load_run
from circuits.store import (
    ARRAYS_FILE,
    DASHBOARD_FILE,
    LOCK_FILE,
    MEASURES_FILE,
    SPLIT_FILE,
    SUMMARY_FILE,
    atomic_write_bytes,
    file_sha256,
    own_temp,
)

if TYPE_CHECKING:
    import pandas as pd

_log = logging.getLogger(__name__)

__all__ = [
    "Analysis",
    "analyze",
    "load_analysis",
    "default_analysis_dir",
    "MEASURE_COLUMNS",
    "ARRAY_DOCS",
    "DEFAULT_ANALYSES_DIR",
]

DEFAULT_ANALYSES_DIR = Path("analyses")
#: Bumped when a measure's definition changes: rows of another format are recomputed.
ANALYSIS_FORMAT = 2
#: What ``analyze`` writes into an analysis folder (and the temporary files of its writes).
ANALYSIS_FILES = (MEASURES_FILE, ARRAYS_FILE, SUMMARY_FILE, DASHBOARD_FILE, LOCK_FILE)

#: The built-in default measure families (circuits.measures.families; the opt-in lenses are
#: computed only when named).
BUILTIN_MEASURES = tuple(f.name for f in families() if f.default)
#: The columns of ``measures.csv`` with every built-in family (plus ``norm_sq.<parameter>``);
#: a family registered later adds its own (circuits.measures.registry).
MEASURE_COLUMNS = column_order(select(BUILTIN_MEASURES))
#: The arrays of ``arrays.safetensors`` with every built-in family.
ARRAY_DOCS = array_docs(select(BUILTIN_MEASURES))

VARIANTS = {
    "restricted_loss": "logit level: P_S(L) + per-class mean, scored on all valid pairs",
    "excluded_loss": "logit level: L - P_S(L), scored on the training pairs",
    "gini": "over the p - 1 non-constant Fourier components (cos and sin separate)",
    "key_frequencies": (
        f"neurons vote for their best k when its 3x3 block explains >= {CLUSTER_THRESHOLD} of "
        "the centred variance; k is key with >= max(3, d_mlp // 100) votes; newest checkpoint"
    ),
    "phases": "circuits.measures.phases.phase_boundaries (frac 0.1, cleanup_frac 0.25, window 3)",
}


def default_analysis_dir(run: Run, root: str | Path | None = None) -> Path:
    """Where ``analyze`` writes by default; two runs never share it (design.md).

    A run under a ``checkpoints/`` folder: ``analyses/<its path under checkpoints/>`` beside
    that folder (``analyses/`` here for ``./checkpoints``). Any other run:
    ``analyses/<name>-<8 hex of the sha256 of its resolved path>``. ``root`` replaces the
    ``analyses`` folder.
    """
    path = run.path.resolve()
    for parent in path.parents:
        if parent.name == DEFAULT_RUNS_DIR.name:
            rel = path.relative_to(parent)
            if root is not None:
                return Path(root) / rel
            if parent.parent == Path.cwd().resolve():
                return DEFAULT_ANALYSES_DIR / rel
            return parent.parent / DEFAULT_ANALYSES_DIR.name / rel
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return Path(root if root is not None else DEFAULT_ANALYSES_DIR) / f"{path.name}-{tag}"


@dataclass
class Analysis:
    """The tables of one analysed run, as pandas DataFrames and tensors."""

    path: Path
    measures: pd.DataFrame
    arrays: dict[str, torch.Tensor]
    summary: dict[str, Any]
    damaged: list[str] = field(default_factory=list)

    @property
    def key_frequencies(self) -> list[int]:
        """The key frequencies used for the restricted and excluded losses."""
        return list(self.summary["key_frequencies"])

    def frequency_table(self) -> pd.DataFrame:
        """Long table: epoch, frequency k, embedding norm and neuron-logit norm of k (cos, sin merged)."""
        import pandas as pd

        from circuits.fourier import frequency_norms

        epochs = self.arrays["epochs"].tolist()
        emb = frequency_norms(self.arrays["embed_fourier_norms"])
        nl = frequency_norms(self.arrays["neuron_logit_fourier_norms"])
        rows = [
            {"epoch": e, "freq": k + 1, "embed_norm": float(emb[i, k]), "neuron_logit_norm": float(nl[i, k])}
            for i, e in enumerate(epochs)
            for k in range(emb.shape[1])
        ]
        return pd.DataFrame(rows)

    def clusters(self, epoch: int | None = None) -> pd.DataFrame:
        """Neuron table at ``epoch`` (default: last): neuron, cluster (k or -1), best fraction."""
        import pandas as pd

        epochs = self.arrays["epochs"].tolist()
        if epoch is not None and epoch not in epochs:
            near = min(epochs, key=lambda e: (abs(e - epoch), e)) if epochs else None
            raise KeyError(f"the analysis has no checkpoint at epoch {epoch}; the nearest is {near} "
                           f"(epochs: {epochs[0]}..{epochs[-1]}, {len(epochs)} checkpoints)" if epochs else
                           "the analysis has no checkpoints")
        i = len(epochs) - 1 if epoch is None else epochs.index(epoch)
        return pd.DataFrame({
            "neuron": range(self.arrays["neuron_cluster"].shape[1]),
            "cluster": self.arrays["neuron_cluster"][i].tolist(),
            "best_frac": self.arrays["neuron_best_frac"][i].tolist(),
            "key_frac": self.arrays["neuron_key_frac"][i].tolist(),
        })


def _key_set(run: Run, epoch: int) -> list[int]:
    return detect_key_frequencies(stack_state_dicts([run.state_dict(epoch)]), run.config)


def _measure_chunk(
    run: Run, params: dict[str, torch.Tensor], key: list[int], block_rows: int | None = None,
    chosen: Sequence[Family] | None = None, init: dict[str, torch.Tensor] | None = None,
    memo: dict[Any, Any] | None = None, positions: list[int] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    reference: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Columns and arrays of the chosen families (default: every one that applies) for a stack
    of checkpoints: :func:`circuits.measures.registry.compute` in row blocks of the grid.
    ``init``: the run's epoch-0 weights stacked (:func:`_init_weights`); ``memo``: one dict for
    every batch of an analysis (:class:`~circuits.measures.registry.Checkpoints`)."""
    if chosen is None:
        chosen, _ = applicable(select(), run.config)
    ckpts = Checkpoints(params, run.task, run.config, key, init, memo, positions, options, reference)
    return compute(ckpts, chosen, block_rows)


def _init_weights(run: Run) -> dict[str, torch.Tensor] | None:
    """The run's initialisation (checkpoint 0) as a stack of one, or None when it has none (an
    imported run may start later)."""
    if not run.epochs or run.epochs[0] != 0:
        return None
    try:
        return stack_state_dicts([run.state_dict(0)])
    except CheckpointError:  # named where the checkpoint itself is measured
        return None


def analyze(
    run: Run | str | Path,
    out: str | Path | None = None,
    batch_size: int = 2,
    key_freqs: list[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    write: bool = True,
    measures: Sequence[str] | None = None,
    options: Mapping[str, Any] | Sequence[str] | None = None,
) -> Analysis:
    """Run every progress measure over every checkpoint of ``run`` (Nanda et al. 2023).

    ``measures``: the measure families to compute (default: every default family; name an
    opt-in lens beside ``"default"`` to add it, ``measures=["default", "oinfo"]``;
    :func:`circuits.measures.families`); a family that does not apply to the run's task is
    skipped and ``summary.json["skipped_measures"]`` says why. ``options``: the families'
    settings (``{"oinfo.every": 10}``; :func:`circuits.measures.registry.parse_options`),
    recorded in ``summary.json``. ``key_freqs`` overrides the
    automatic key-frequency detection. ``on_progress(done, total)`` is called after each batch.
    With ``write`` (default) the tables are saved to ``out`` (default
    :func:`default_analysis_dir`) and reused by the next call for every checkpoint whose sha256
    is unchanged (see the module docstring); ``out`` must be new, empty or an analysis folder
    (AnalysisFolderError otherwise, nothing written). Where it writes is ``Analysis.path`` and is
    logged (``logging``, logger ``circuits.analysis``) before anything is computed.
    """
    keep_freed_memory()
    if not isinstance(run, Run):
        run = load_run(run)
    chosen = select(measures)  # an unknown name is refused before anything is read or written
    settings = parse_options(options)
    out_dir = Path(out) if out is not None else default_analysis_dir(run)
    if write:
        _log.info("analysing %s into %s%s", run.path, out_dir.resolve(),
                  " (reusing what is there)" if (out_dir / SUMMARY_FILE).exists() else "")
    if not write:
        return _analyze(run, out_dir, batch_size, key_freqs, on_progress, write, chosen, settings)
    check_analysis_dir(out_dir)
    made = not out_dir.exists()
    try:
        with hold_run_folder(out_dir, doing="analysing into"):
            for f in out_dir.iterdir():  # under the lock: temporary files of a killed analysis
                if own_temp(f.name, ANALYSIS_FILES):
                    f.unlink(missing_ok=True)
            return _analyze(run, out_dir, batch_size, key_freqs, on_progress, write, chosen, settings)
    except BaseException:
        if made:
            _remove_new_folder(out_dir)  # a failed first analysis leaves no half-made folder
        raise


def _remove_new_folder(path: Path) -> None:
    """Remove the analysis files of a folder this call created, then the folder if empty."""
    if not path.is_dir():
        return
    for f in path.iterdir():
        if f.name in ANALYSIS_FILES or own_temp(f.name, ANALYSIS_FILES):
            f.unlink(missing_ok=True)
    if not any(path.iterdir()):
        path.rmdir()


def check_analysis_dir(path: Path) -> None:
    """Refuse (AnalysisFolderError) a path ``analyze`` must not write into: a file, or a folder
    holding anything but an analysis's own files (a folder of yours, a run folder)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise AnalysisFolderError(f"{path} is a file, not an analysis folder; choose another --out")
    foreign = sorted(
        f.name for f in path.iterdir()
        if f.name not in ANALYSIS_FILES and not own_temp(f.name, ANALYSIS_FILES)
    )
    if foreign:
        raise AnalysisFolderError(
            f"{path} is not an analysis folder (it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}), so analyze will not write into it; "
            "choose a new or empty --out"
        )


def _inputs(
    run: Run, key: list[int], digests: dict[int, str], epochs: list[int], computed: Sequence[Family],
    options: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """What the rows of ``epochs`` were computed from; rows are reused only when it matches."""
    from circuits import __version__

    science = json.dumps(run.config.science_dict, sort_keys=True).encode()
    return {
        "format": ANALYSIS_FORMAT,
        "circuits_version": __version__,
        "config_sha256": hashlib.sha256(science).hexdigest(),
        "split_sha256": file_sha256(run.path / SPLIT_FILE),
        "key_frequencies": [int(k) for k in key],
        "measures": _names(computed),
        "options": _settings(computed, options),
        "checkpoints": {str(e): digests[e] for e in epochs if e in digests},
    }


def _settings(computed: Sequence[Family], options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every setting of the computed families, defaults filled in (what their rows depend on)."""
    return {f.name: {**f.options, **options.get(f.name, {})} for f in computed if f.options}


def _names(computed: Sequence[Family]) -> list[str]:
    return sorted(f.name for f in computed if not f.internal)


def _reusable(previous: Analysis | None, inputs: dict[str, Any], digests: dict[int, str]) -> list[int]:
    """Epochs of ``previous``'s rows that were computed from exactly today's inputs."""
    if previous is None:
        return []
    before = previous.summary.get("inputs")
    if not isinstance(before, dict):
        return []  # written before analyses recorded their inputs: recompute
    same = ("format", "circuits_version", "config_sha256", "split_sha256", "key_frequencies")
    if any(before.get(k) != inputs[k] for k in same):
        return []
    # Analyses from before the registry computed the built-in families.
    if before.get("measures", sorted(BUILTIN_MEASURES)) != inputs["measures"]:
        return []
    if before.get("options", {}) != inputs["options"]:
        return []
    seen = before.get("checkpoints")
    if not isinstance(seen, dict):
        return []
    rows = previous.measures.epoch.astype(int).tolist()
    return [e for e in rows if e in digests and seen.get(str(e)) == digests[e]]


def _analyze(
    run: Run, out_dir: Path, batch_size: int, key_freqs: list[int] | None,
    on_progress: Callable[[int, int], None] | None, write: bool, chosen: Sequence[Family],
    options: dict[str, dict[str, Any]],
) -> Analysis:
    import pandas as pd

    computed, skipped = applicable(chosen, run.config)

    epochs = run.epochs
    digests = run.store.checkpoint_digests()
    damaged: dict[int, str] = {}
    # Key frequencies from the newest intact checkpoint.
    key = key_freqs
    key_epoch = None
    if key is None and grid_problem(run.config) is not None:
        key = []  # the neurons' vote reads the grid forward; the Fourier families are skipped
    for e in reversed(epochs):
        try:
            if key is None:
                key = _key_set(run, e)
            key_epoch = e
            break
        except CheckpointError as err:
            damaged[e] = str(err)
    if key is None:
        key = []
    previous, discarded = None, None
    if write and (out_dir / SUMMARY_FILE).exists():
        try:
            previous = load_analysis(out_dir)
        except AnalysisFolderError as e:
            discarded = str(e)  # recomputed whole, and said so in the summary
    reuse = set(_reusable(previous, _inputs(run, key, digests, [], computed, options), digests))
    done_rows: pd.DataFrame | None = None
    done_arrays: dict[str, torch.Tensor] | None = None
    if previous is not None and reuse:
        keep = previous.measures.epoch.astype(int).isin(reuse).to_numpy()
        done_rows = previous.measures[keep].reset_index(drop=True)
        done_arrays = {k: v[torch.tensor(keep)] for k, v in previous.arrays.items()}
    todo = [e for e in epochs if e not in reuse and e not in damaged]
    new_cols: list[dict[str, torch.Tensor]] = []
    new_arrays: list[dict[str, torch.Tensor]] = []
    new_epochs: list[int] = []
    total = len(todo)
    init = _init_weights(run) if todo else None
    memo: dict[Any, Any] = {}  # what depends on the run alone, computed in the first batch
    position = {e: i for i, e in enumerate(epochs)}

    def reference() -> dict[str, torch.Tensor]:
        if "reference" not in memo:
            if key_epoch is None:
                raise CheckpointError(f"{run.path}: no intact checkpoint to fit the run's reference measures on")
            memo["reference"] = stack_state_dicts([run.state_dict(key_epoch)])
        return memo["reference"]
    for start in range(0, total, batch_size):
        chunk = todo[start : start + batch_size]
        sds, good = [], []
        for e in chunk:
            try:
                sds.append(run.state_dict(e))
                good.append(e)
            except CheckpointError as err:
                damaged[e] = str(err)
        if sds:
            cols, arrs = _measure_chunk(run, stack_state_dicts(sds), key, chosen=computed, init=init, memo=memo,
                                        positions=[position[e] for e in good], options=options,
                                        reference=reference)
            new_cols.append(cols)
            new_arrays.append(arrs)
            new_epochs += good
        if on_progress:
            on_progress(min(start + batch_size, total), total)
    frames = []
    if done_rows is not None and len(done_rows):
        frames.append(done_rows)
    if new_epochs:
        data: dict[str, list[float]] = {"epoch": new_epochs}
        for name in new_cols[0]:
            data[name] = torch.cat([c[name] for c in new_cols]).tolist()
        frames.append(pd.DataFrame(data))
    declared = column_order(computed)
    measures = (
        pd.concat(frames, ignore_index=True).sort_values("epoch").reset_index(drop=True)
        if frames else pd.DataFrame(columns=list(declared))
    )
    measures["epoch"] = measures["epoch"].astype(int)
    ordered = [c for c in declared if c in measures] + sorted(c for c in measures if c not in declared)
    measures = measures[ordered]
    arrays = _merge_arrays(done_arrays, new_arrays, new_epochs)
    summary = _summary(run, measures, arrays, key, key_epoch, key_freqs is not None, damaged, computed)
    summary["measures"] = _names(computed)
    internal = {f.name for f in chosen if f.internal}
    skipped = {name: why for name, why in skipped.items() if name not in internal}
    if skipped:
        summary["skipped_measures"] = skipped
    summary["inputs"] = _inputs(run, key, digests, measures.epoch.tolist(), computed, options)
    if summary["inputs"]["options"]:
        summary["measure_options"] = summary["inputs"]["options"]
    if discarded is not None:
        summary["previous_discarded"] = discarded
    analysis = Analysis(out_dir, measures, arrays, summary, [damaged[e] for e in sorted(damaged)])
    if write:
        _write(analysis)  # the dashboard is drawn by the caller (circuits.report)
    return analysis


def _merge_arrays(
    done: dict[str, torch.Tensor] | None, new: list[dict[str, torch.Tensor]], new_epochs: list[int]
) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    if done is not None and len(done.get("epochs", [])):
        for k, v in done.items():
            parts.setdefault(k, []).append(v)
    if new_epochs:
        parts.setdefault("epochs", []).append(torch.tensor(new_epochs, dtype=torch.int64))
        for k in new[0]:
            parts.setdefault(k, []).append(torch.cat([a[k] for a in new]))
    if not parts:
        return {"epochs": torch.zeros(0, dtype=torch.int64)}
    merged = {k: torch.cat(v) for k, v in parts.items()}
    order = torch.argsort(merged["epochs"])
    return {k: v[order].contiguous() for k, v in merged.items()}


def _summary(
    run: Run,
    measures: pd.DataFrame,
    arrays: dict[str, torch.Tensor],
    key: list[int],
    key_epoch: int | None,
    key_given: bool,
    damaged: dict[int, str],
    computed: Sequence[Family],
) -> dict[str, Any]:
    from circuits import __version__

    phases, refused, bad = None, {}, None
    if {"test_loss", "weight_norm_sq"} <= set(measures.columns):
        curves = (measures.test_loss.to_numpy(), measures.weight_norm_sq.to_numpy())
        bad = non_finite_epoch(measures.epoch.to_numpy(), *curves) if len(measures) else None
        phases = phase_boundaries(measures.epoch.to_numpy(), *curves) if len(measures) and bad is None else None
        if bad is not None:
            refused = {"phases_refused": f"the test loss or weight norm is not finite from epoch {bad}: "
                                         "no phase is read from a diverged run"}
    else:
        refused = {"phases_refused": "the phases are read from the test loss and the weight norm: "
                                     "analyse with the losses and norms measures"}
    final = measures.iloc[-1].to_dict() if len(measures) else {}
    sizes: dict[str, int] = {}
    if "neuron_cluster" in arrays and len(arrays["neuron_cluster"]):
        last = arrays["neuron_cluster"][-1]
        for k in sorted(set(last.tolist())):
            sizes["unassigned" if k == -1 else str(k)] = int((last == k).sum())
    return {
        "run": str(run.path),
        "circuits_version": __version__,
        "n_checkpoints": int(len(measures)),
        "key_frequencies": [int(k) for k in key],
        "key_frequencies_epoch": key_epoch,
        "key_frequencies_source": "given" if key_given else "detected",
        "neuron_cluster_sizes": sizes,
        "phases": phases.to_dict() if phases else None,
        **refused,
        "final": {k: (int(v) if k == "epoch" else float(v)) for k, v in final.items()},
        "variants": VARIANTS,
        "arrays": array_docs(computed),
        "columns": column_docs(computed),
        "damaged_checkpoints": {str(e): msg for e, msg in sorted(damaged.items())},
    }


def _write(analysis: Analysis) -> None:
    out = analysis.path
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        MEASURES_FILE: analysis.measures.to_csv(index=False, na_rep="nan").encode(),
        ARRAYS_FILE: st_save(analysis.arrays),
    }
    # summary.json is written last and names the tables' digests: a kill between the writes, or
    # a table changed afterwards, shows as a mismatch (load_analysis), never as wrong numbers.
    analysis.summary["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in tables.items()}
    for name, data in tables.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / SUMMARY_FILE, json.dumps(analysis.summary, indent=2).encode())


def _damaged(path: Path, problem: str) -> AnalysisFolderError:
    return AnalysisFolderError(
        f"analysis folder {path.parent} is damaged: {path.name} {problem}; rerun `circuits analyze` "
        "on its run to recompute it"
    )


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AnalysisFolderError(f"{path.parent} is not an analysis folder: {SUMMARY_FILE} is missing")
    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"is not JSON ({e})") from None
    if not isinstance(summary, dict):
        raise _damaged(path, "is not a JSON object")
    checks: dict[str, Callable[[Any], bool]] = {
        "n_checkpoints": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "key_frequencies": lambda v: isinstance(v, list) and all(
            isinstance(k, int) and not isinstance(k, bool) for k in v),
        "phases": lambda v: v is None or isinstance(v, dict),
        "final": lambda v: isinstance(v, dict),
        "neuron_cluster_sizes": lambda v: isinstance(v, dict),
    }
    for name, ok in checks.items():
        if name not in summary:
            raise _damaged(path, f"lacks {name!r}")
        if not ok(summary[name]):
            raise _damaged(path, f"has {name} = {summary[name]!r}, which is not what analyze writes")
    for name in ("damaged_checkpoints", "files", "inputs"):
        if not isinstance(summary.get(name, {}), dict):
            raise _damaged(path, f"has {name} = {summary[name]!r}, which is not what analyze writes")
    return summary


def _recorded(summary: dict[str, Any]) -> list[Family]:
    """The registered families an analysis says it computed (before the registry: the built-in
    ones); a family no longer registered is not checked."""
    names = summary.get("measures", list(BUILTIN_MEASURES))
    if not isinstance(names, list):
        return []
    return [f for f in families() if f.name in names]


def _read_measures(path: Path, expected: Sequence[str] = MEASURE_COLUMNS) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        text = path.read_bytes().decode("utf-8")
        rows = list(csv.reader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as e:
        raise _damaged(path, f"is not a CSV table ({e})") from None
    if not rows or "epoch" not in rows[0]:
        raise _damaged(path, "has no header with an epoch column")
    header = rows[0]
    for i, row in enumerate(rows[1:], start=2):
        # A torn or cut row would otherwise be read as NaN, and stay as NaN.
        if len(row) != len(header):
            raise _damaged(path, f"line {i} has {len(row)} fields, the header {len(header)} (truncated?)")
        for name, value in zip(header, row):
            try:
                float(value or "nan")  # an empty field is NaN (how older versions wrote it)
            except ValueError:
                raise _damaged(path, f"line {i}: {name} is {value[:20]!r}, not a number") from None
    missing = [c for c in expected if c not in header]
    if missing:
        raise _damaged(path, f"lacks the columns {', '.join(missing[:3])} (written by another "
                             "version of circuits?)")
    measures = pd.read_csv(io.StringIO(text))
    epochs = measures.epoch.to_numpy()
    if len(epochs) and (not all(float(e).is_integer() for e in epochs) or (epochs[1:] <= epochs[:-1]).any()):
        raise _damaged(path, "has epochs that are not whole numbers in increasing order")
    measures["epoch"] = measures["epoch"].astype(int)
    return measures


def load_analysis(path: str | Path) -> Analysis:
    """Read an analysis folder written by :func:`analyze` (``circuits analyze``).

    Everything is checked before it is served: ``summary.json``'s structure, the tables against
    the digests it records, every row of ``measures.csv`` whole and numeric, every array's
    leading axis against the rows, and the arrays' epochs against the table's.
    :class:`~circuits.errors.AnalysisFolderError` names the file and the fix.
    """
    path = Path(path)
    summary = _read_summary(path / SUMMARY_FILE)
    for name, digest in summary.get("files", {}).items():
        f = path / name
        if name not in (MEASURES_FILE, ARRAYS_FILE):
            continue
        if not f.is_file():
            raise _damaged(f, "is missing")
        if file_sha256(f) != digest:
            raise _damaged(f, f"is not the file {SUMMARY_FILE} names (its sha256 differs: changed "
                              "or damaged after it was written)")
    recorded = _recorded(summary)
    measures = _read_measures(path / MEASURES_FILE, column_order(recorded))
    f = path / ARRAYS_FILE
    if not f.is_file():
        raise _damaged(f, "is missing")
    try:
        arrays = st_load(f.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _damaged(f, f"is not safetensors data ({e})") from None
    for name in array_docs(recorded):
        if name not in arrays:
            raise _damaged(f, f"lacks the array {name!r}")
    for name, value in arrays.items():
        if value.dim() == 0 or value.shape[0] != len(measures):
            raise _damaged(f, f"has {name} of shape {tuple(value.shape)}, not one row per "
                              f"checkpoint ({len(measures)} in {MEASURES_FILE})")
    if arrays["epochs"].tolist() != measures.epoch.tolist():
        raise _damaged(f, f"has other epochs than {MEASURES_FILE}")
    if summary["n_checkpoints"] != len(measures):
        raise _damaged(path / SUMMARY_FILE, f"counts {summary['n_checkpoints']} checkpoints, "
                                            f"{MEASURES_FILE} has {len(measures)}")
    damaged = [str(m) for m in summary.get("damaged_checkpoints", {}).values()]
    return Analysis(path, measures, arrays, summary, damaged)
