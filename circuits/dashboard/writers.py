"""The pages: a run's dashboard, several runs compared, an experiment's results, any figures."""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from circuits import plots
from circuits.config import differing_fields, flat_fields
from circuits.dashboard.figures import (
    MAX_FRAMES,
    choose_neurons,
    frame_budget,
    frame_epochs,
    grid_frames,
    run_figures,
)
from circuits.dashboard.render import (
    Panel,
    Section,
    page_footer,
    render_page,
    write_page,
)
from circuits.store import CONFIG_FILE, DASHBOARD_FILE

if TYPE_CHECKING:
    from circuits.analysis import Analysis
    from circuits.run import Run

#: The built-in curve panels over epochs, in page order (each carries the slider's epoch marker).
CURVE_PANELS = ("losses", "accuracies", "fourier_heatmap", "gini", "weight_norms", "key_share")

OPS = {"add": "a + b", "sub": "a − b", "mul": "a · b", "div": "a / b"}


def _read_config(run_path: str | Path | None) -> dict[str, Any] | None:
    if not run_path:
        return None
    try:
        data = json.loads((Path(run_path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("config", data) if isinstance(data, dict) else None


def _e(value: Any) -> str:
    """Any value from a file, as HTML text: run and analysis folders may come from anyone."""
    return html.escape(str(value), quote=True)


def _num(value: Any, spec: str) -> str:
    """A number formatted with ``spec``; anything else (a crafted file's string) escaped as is."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return format(value, spec)
    return _e(value)


def _fmt_epoch(e: Any) -> str:
    return "not reached" if e is None else _num(e, ",")


def _run_facts(analysis: Analysis, config: dict[str, Any] | None) -> list[str]:
    facts = []
    if config:
        t, mo, tr = config["task"], config["model"], config["train"]
        data = (f"{_e(t['train_size'])} training pairs" if t.get("train_size")
                else f"{_num(t['frac'], '.0%')} of pairs for training")
        op = t["op"]
        facts += [
            f"<b>{_e(OPS.get(op, op) if isinstance(op, str) else op)} mod {_e(t['p'])}</b>",
            data,
            f"d_model {_e(mo['d_model'])} · {_e(mo['n_heads'])} heads · d_mlp {_e(mo['d_mlp'])} · "
            f"{_e(mo['act_fn'])}",
            f"AdamW lr {_num(tr['lr'], 'g')} · weight decay {_num(tr['weight_decay'], 'g')}",
            f"seed {_e(mo['seed'])} · data seed {_e(t['data_seed'])}",
        ]
    s = analysis.summary
    facts.append(f"{_e(s.get('n_checkpoints', len(analysis.measures)))} checkpoints")
    key = ", ".join(_e(k) for k in analysis.key_frequencies) or "none yet"
    facts.append(f"key frequencies <b>{key}</b>")
    ph = s.get("phases") or {}
    if ph:
        facts.append(
            "phases end: memorisation <b>{}</b> · circuit formation <b>{}</b> · cleanup <b>{}</b>".format(
                _fmt_epoch(ph.get("memorisation_end")), _fmt_epoch(ph.get("circuit_formation_end")),
                _fmt_epoch(ph.get("cleanup_end")))
        )
    final = s.get("final") or {}
    if final:
        facts.append(
            f"epoch {_num(final.get('epoch', 0), ',')}: train acc {_num(final.get('train_acc', 0), '.1%')}, "
            f"test acc {_num(final.get('test_acc', 0), '.1%')}, test loss {_num(final.get('test_loss', 0), '.2g')}"
        )
    return facts


def write_run_dashboard(
    analysis: Analysis | str | Path,
    out: str | Path | None = None,
    run: Run | str | Path | None = None,
    max_frames: int = MAX_FRAMES,
    grid: Mapping[str, Any] | None = None,
    n_neurons: int = 4,
) -> Path:
    """Write one run's dashboard (default ``<analysis folder>/dashboard.html``); return its path.

    ``analysis`` is an :class:`~circuits.analysis.Analysis` or its folder. The neuron-activation
    and attention panels need the checkpoints: ``run`` (default: the run named in
    ``summary.json``, when it still exists), evaluated at the slider's frames with the hooked
    model (:func:`grid_frames`); ``grid`` supplies precomputed ones instead. Without either they
    are left out, and the page says so.
    """
    from circuits.analysis import Analysis, load_analysis

    if not isinstance(analysis, Analysis):
        analysis = load_analysis(analysis)
    out_path = Path(out) if out is not None else analysis.path / DASHBOARD_FILE
    run_path = run.path if hasattr(run, "path") else run
    if run_path is None:
        run_path = analysis.summary.get("run")
    config = _read_config(run_path)
    name = Path(str(run_path)).name if run_path else analysis.path.name
    n_epochs = len(np.asarray(analysis.arrays["epochs"]))
    if n_epochs == 0:
        # A run with no intact checkpoint yet: say so rather than draw empty axes.
        text = render_page(
            f"circuits · {name}", "grokking dashboard", _run_facts(analysis, config),
            [Section("No checkpoints analysed yet", [], "Run <code>circuits analyze</code> again once "
                      "the run has saved a checkpoint.")], page_footer(),
        )
        return write_page(out_path, text)
    neurons = choose_neurons(analysis, n_neurons)
    missing_grid = ""
    if grid is None and n_epochs and config is not None and neurons:
        from circuits.run import Run, load_run

        p = int(config["task"]["p"])
        frames = frame_epochs(analysis, frame_budget(p, len(neurons) + int(config["model"]["n_heads"]), max_frames))
        grid = grid_frames(run if isinstance(run, Run) else load_run(run_path), frames, [n for n, _ in neurons])
    elif grid is None:
        missing_grid = (" The neuron-activation and attention panels need the run's checkpoints, "
                        "which were not found; they are left out.")
    figs = run_figures(analysis, grid, max_frames, neurons)
    curves = [Panel(key, figs[key], marker=True) for key in CURVE_PANELS if key in figs]
    curves += [Panel(key, fig, marker=True) for key, fig in figs.items() if key.startswith("family:")]
    for key in ("circuits", "circuit_details"):
        if key in figs:
            curves.append(Panel(key, figs[key], wide=True, height=int(figs[key].layout.height)))
    frames_panels = [Panel(key, figs[key]) for key in ("embed_fourier", "neuron_logit_fourier") if key in figs]
    if "neurons" in figs:
        frames_panels.append(Panel("neurons", figs["neurons"], wide=True, height=430))
        frames_panels.append(Panel("attention", figs["attention"], wide=True, height=430))
    if "clusters" in figs:
        frames_panels.append(Panel("clusters", figs["clusters"], wide=True, height=340))
    shown = [int(f.name) for f in frames_panels[0].fig.frames] if frames_panels else []
    note = (
        f"One slider drives every panel below (and the dashed line on the curves above). "
        f"Frames are downsampled: {len(shown)} of {n_epochs} checkpoints are shown, spread evenly "
        "over the checkpoints with the phase boundaries kept."
        if len(shown) < n_epochs else
        f"One slider drives every panel below (and the dashed line on the curves above): all {n_epochs} checkpoints."
    )
    if "neurons" in figs:
        note += (" Neurons shown: " + ("the most frequency-pure neuron of each key frequency's cluster, then "
                 if analysis.key_frequencies else "") + "the neurons most concentrated in one frequency "
                 "(at the last checkpoint); activations and attention are computed from the checkpoints.")
    note += missing_grid
    sections = [
        Section("Over training", curves,
                 "Shaded: the phases of Nanda et al. (2023, §5.2), detected from the test loss and the "
                 "weight norm. Restricted loss keeps only the key frequencies' directions of the logits; "
                 "excluded loss removes them (§5.1)."),
    ]
    if frames_panels:
        sections.append(Section("Through the checkpoints", frames_panels, note, slider=shown))
    text = render_page(
        f"circuits · {name}", "grokking dashboard", _run_facts(analysis, config), sections,
        page_footer(f"Analysis: {html.escape(str(analysis.path))}."),
    )
    return write_page(out_path, text)


# ---- several runs -----------------------------------------------------------------------------


# Fields that say how a run was recorded, not what was trained: never worth a label.
_SCHEDULE = {"engine", "preset", "checkpoint_every", "checkpoint_early_every", "checkpoint_early_until", "log_every"}


def _labels(analyses: Sequence[Analysis]) -> list[str]:
    """Label runs by the config fields in which they differ (else by folder name)."""
    names = [Path(str(a.summary.get("run") or a.path)).name for a in analyses]
    configs = [_read_config(a.summary.get("run")) for a in analyses]
    if all(configs) and len(configs) > 1:
        flats = [flat_fields(c) for c in configs]  # type: ignore[arg-type]
        keys = [k for k in differing_fields(flats) if k not in _SCHEDULE]
        if 0 < len(keys) <= 3:
            labels = [", ".join(f"{k}={f.get(k)}" for k in keys) for f in flats]
            if len(set(labels)) == len(labels):
                return labels
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _runs_table(analyses: Sequence[Analysis], labels: Sequence[str]) -> str:
    rows = []
    for label, a in zip(labels, analyses, strict=True):
        m = a.measures
        ph = a.summary.get("phases") or {}
        hit = m.epoch[m.test_acc >= 0.99] if "test_acc" in m else []
        grok = f"{int(hit.iloc[0]):,}" if len(hit) else "not yet"
        final = a.summary.get("final") or {}
        rows.append(
            "<tr>" + "".join(f"<td>{x}</td>" for x in (
                html.escape(label), html.escape(str(a.summary.get("run") or a.path)),
                ", ".join(map(_e, a.key_frequencies)) or "–",
                _fmt_epoch(ph.get("memorisation_end")), _fmt_epoch(ph.get("circuit_formation_end")),
                _fmt_epoch(ph.get("cleanup_end")), grok,
                _num(final.get("test_acc", float("nan")), ".1%") if final else "–",
            )) + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in (
        "run", "folder", "key frequencies", "memorisation ends", "circuit formation ends", "cleanup ends",
        "test acc ≥ 99% at", "final test acc"))
    return f'<table class="runs"><tr>{head}</tr>{"".join(rows)}</table>'


def write_comparison_dashboard(
    analyses: Sequence[Analysis | str | Path], out: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """Overlay several runs' curves (seeds, weight decays, dataset sizes) in one HTML file.

    A run is a colour on every panel; within a panel, line style tells the measures apart.
    Labels default to the config fields in which the runs differ.
    """
    from circuits.analysis import Analysis, load_analysis

    loaded = [a if isinstance(a, Analysis) else load_analysis(a) for a in analyses]
    labels = list(labels) if labels is not None else _labels(loaded)
    runs = {label: a.measures for label, a in zip(labels, loaded, strict=True)}
    panels = [
        Panel("test_loss", plots.plot_comparison(runs, ["test_loss", "train_loss"],
               "Loss: test (solid) and train (dashed), log scale", "loss (nats)", log_y=True)),
        Panel("accuracy", plots.plot_comparison(runs, ["test_acc", "train_acc"],
               "Accuracy: test (solid) and train (dashed)", "accuracy", percent=True)),
        Panel("restricted", plots.plot_comparison(runs, ["restricted_loss", "excluded_loss"],
               "Restricted (solid) and excluded (dashed) loss, log scale", "loss (nats)", log_y=True)),
        Panel("weight_norm", plots.plot_comparison(runs, ["weight_norm_sq"],
               "Sum of squared weights, log scale", "Σ w²", log_y=True)),
        Panel("gini", plots.plot_comparison(runs, ["gini_embed", "gini_neuron_logit"],
               "Gini of Fourier norms: W_E (solid), W_L (dashed)", "Gini")),
        Panel("key_share", plots.plot_comparison(runs, ["key_logit_frac"],
               "Share of logit variance in the key frequencies", "share", percent=True)),
    ]
    # The circuit quantities every run has; norm and efficiency only, when there are such.
    common = set.intersection(*(set(plots.circuit_columns(m)) for m in runs.values())) if runs else set()
    main = {q for q in common if "norm" in q or "efficiency" in q}
    for suffix in sorted(main or common, key=lambda q: ("efficiency" not in q, q)):
        panels.append(Panel(f"circuit_{suffix}", plots.plot_comparison(
            runs, [f"gen_{suffix}", f"mem_{suffix}"],
            f"{suffix.replace('_', ' ')}: generalising (solid), memorising (dashed)", suffix.replace("_", " "))))
    for panel in panels:
        panel.fig.update_layout(legend={"font": {"size": 11}})
    sections = [
        Section("Runs", [], _runs_table(loaded, labels)),
        Section("Curves", panels, "Each run keeps its colour on every panel. Hover to read all runs at one epoch."),
    ]
    text = render_page("circuits · comparison", f"{len(loaded)} runs", [html.escape(x) for x in labels],
                   sections, page_footer())
    return write_page(Path(out), text)


# ---- experiment protocols ----------------------------------------------------------------------


def write_experiment_dashboard(
    out: str | Path,
    *,
    efficiency: pd.DataFrame | None = None,
    ungrokking: pd.DataFrame | None = None,
    sweep: pd.DataFrame | None = None,
    axes: tuple[str, str] = ("dataset_size", "weight_decay"),
    values: Sequence[str] | None = None,
    critical_size: int | float | None = None,
    title: str = "Experiments",
) -> Path:
    """One HTML page for the experiment protocols' results; every table is optional.

    * ``efficiency``: ``dataset_size``, ``circuit`` (``"mem"``/``"gen"``), ``efficiency``
      [, ``seed``] -> efficiency vs D with D_crit (:func:`~circuits.plots.plot_efficiency_vs_dataset_size`);
    * ``ungrokking``: ``dataset_size``, ``test_acc`` [, ``weight_decay``, ``seed``] -> the
      ungrokking curve (:func:`~circuits.plots.plot_ungrokking`), ``critical_size`` marked;
    * ``sweep``: one row per run with the two ``axes`` columns, an optional ``zone`` column (zone
      map) and numeric result columns (one phase diagram each; ``values`` picks them, default
      every numeric column but the axes and ``seed``; names ending ``_epoch`` get a log colour).
    """
    panels: list[Panel] = []
    if efficiency is not None:
        panels.append(Panel("efficiency", plots.plot_efficiency_vs_dataset_size(efficiency)))
    if ungrokking is not None:
        panels.append(Panel("ungrokking", plots.plot_ungrokking(ungrokking, critical_size)))
    x, y = axes
    if sweep is not None:
        if "zone" in sweep:
            panels.append(Panel("zones", plots.plot_zone_map(sweep, x, y)))
        cols = list(values) if values is not None else [
            c for c in sweep.columns
            if c not in (x, y, "seed", "zone") and pd.api.types.is_numeric_dtype(sweep[c])
        ]
        for c in cols:
            panels.append(Panel(f"phase_{c}", plots.plot_phase_diagram(
                sweep, c, x, y, log_color=c.endswith("_epoch") and bool((sweep[c] > 0).all()))))
    if not panels:
        raise ValueError("write_experiment_dashboard needs at least one table")
    sections = [Section("Results", panels,
                         "Efficiency and ungrokking after Varma et al. (2023); phase diagrams show the mean over seeds.")]
    text = render_page(f"circuits · {title}", "experiment results", [], sections, page_footer())
    return write_page(Path(out), text)


def write_figure_page(
    out: str | Path, figures: go.Figure | Sequence[go.Figure], title: str = "circuits", note: str = ""
) -> Path:
    """One or more figures as one self-contained, offline HTML page (an experiment protocol's figure)."""
    figs = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figs:
        raise ValueError("write_figure_page needs at least one figure")
    panels = [Panel(f"figure{i}", f, wide=True, height=480) for i, f in enumerate(figs)]
    text = render_page(f"circuits · {title}", "experiment results", [],
                   [Section("Results", panels, note)], page_footer())
    return write_page(Path(out), text)


def comparison_name(paths: Sequence[str | Path]) -> str:
    """A stable file name for a comparison of ``paths``: ``comparison-<hash>.html``."""
    digest = hashlib.sha256("\n".join(sorted(str(Path(p).resolve()) for p in paths)).encode()).hexdigest()
    return f"comparison-{digest[:8]}.html"
