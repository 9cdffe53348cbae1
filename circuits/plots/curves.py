"""Curves over training: losses, accuracies, Fourier heatmap, Gini sparsity, norms, the two circuits.

The measures of Nanda et al. (2023), "Progress measures for grokking via mechanistic
interpretability" (restricted and excluded loss, Gini sparsity and weight norm §5.1, phases §5.2),
and the memorising/generalising split of Varma et al. (2023), "Explaining grokking through circuit
efficiency".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.plots.style import (
    PALETTE,
    RUN_COLORS,
    SPLIT_LABELS,
    SPLITS,
    _curve_layout,
    _layout,
    _line,
    _log_axis,
    _np,
    _shade_phases,
)

if TYPE_CHECKING:
    import pandas as pd


def plot_losses(measures: pd.DataFrame, phases: Mapping[str, int | None] | None = None) -> go.Figure:
    """Train, test, restricted and excluded loss over epochs, log scale, phases shaded.

    Restricted loss keeps only the key-frequency directions of the logits; excluded loss removes
    them on the training set (Nanda et al. 2023, §5.1): restricted falls before test loss does
    (the circuit forms), excluded rises (memorisation is cleaned up).
    """
    fig = go.Figure()
    for split in SPLITS:
        col = f"{split}_loss"
        if col in measures:
            fig.add_trace(_line(measures.epoch, measures[col], SPLIT_LABELS[split], PALETTE[split]))
    _shade_phases(fig, phases, measures.epoch)
    _curve_layout(fig, "Loss (cross-entropy, log scale)", "loss (nats)")
    _log_axis(fig, [t.y for t in fig.data])
    return fig


def plot_accuracies(measures: pd.DataFrame, phases: Mapping[str, int | None] | None = None) -> go.Figure:
    """Train and test accuracy over epochs (restricted and excluded one legend click away)."""
    fig = go.Figure()
    for split in SPLITS:
        col = f"{split}_acc"
        if col in measures:
            fig.add_trace(_line(
                measures.epoch, measures[col], SPLIT_LABELS[split], PALETTE[split], fmt=".1%",
                visible=True if split in ("train", "test") else "legendonly",
            ))
    _shade_phases(fig, phases, measures.epoch)
    _curve_layout(fig, "Accuracy", "accuracy")
    fig.update_yaxes(tickformat=".0%", range=[-0.02, 1.04])
    return fig


def plot_fourier_heatmap(
    epochs: Any,
    norms: Any,
    key_freqs: Sequence[int] = (),
    title: str = "Embedding Fourier norm per frequency",
    what: str = "‖W_E‖",
) -> go.Figure:
    """Heatmap of a weight's Fourier norm per frequency k (y) over epochs (x), key k marked.

    ``norms`` is ``[ckpt, p]`` per basis component (``arrays["embed_fourier_norms"]``); cos k and
    sin k are merged into ``sqrt(cos² + sin²)``. The embedding becomes sparse in the Fourier
    basis as the network groks (Nanda et al. 2023, Fig. 3): a few bright rows, the key
    frequencies, marked on the right.
    """
    e = _np(epochs)
    import torch

    from circuits.fourier import frequency_norms

    merged = frequency_norms(torch.as_tensor(_np(norms), dtype=torch.float64)).numpy().astype(np.float32)  # [ckpt, k]
    n_freq = merged.shape[1] if merged.ndim == 2 else 0
    fig = go.Figure(go.Heatmap(
        x=e, y=np.arange(1, n_freq + 1), z=merged.T, colorscale="Viridis", name=what,
        colorbar={"title": {"text": what, "side": "right"}, "thickness": 12},
        hovertemplate=f"epoch %{{x}}<br>frequency k=%{{y}}<br>{what} %{{z:.3g}}<extra></extra>",
    ))
    _layout(fig, title, "epoch", "frequency k")
    # Key frequencies are labelled in colour on the frequency axis, among every fifth k.
    step = 5 if n_freq > 12 else 1
    ticks = sorted({k for k in range(step, n_freq + 1, step)} | {1} | set(key_freqs))
    key = set(key_freqs)
    fig.update_yaxes(
        range=[0.5, n_freq + 0.5], showgrid=False, tickmode="array", tickvals=ticks,
        ticktext=[f"<b><span style='color:{PALETTE['key']}'>{k} ▶</span></b>" if k in key else str(k) for k in ticks],
    )
    fig.update_xaxes(showgrid=False)
    if key:
        fig.add_annotation(
            x=0, xref="paper", y=1.0, yref="paper", yanchor="bottom", xanchor="left", showarrow=False,
            text=f"▶ key frequencies: {', '.join(map(str, sorted(key)))}", font={"size": 12, "color": "#5b6670"},
        )
    return fig


def plot_gini(measures: pd.DataFrame, phases: Mapping[str, int | None] | None = None) -> go.Figure:
    """Gini coefficient of the Fourier norms of W_E and of W_L = W_out W_U over epochs.

    0 is spread evenly over the frequencies, 1 is all in one; both rise during cleanup
    (Nanda et al. 2023, §5.1 and Fig. 7).
    """
    fig = go.Figure()
    if "gini_embed" in measures:
        fig.add_trace(_line(measures.epoch, measures.gini_embed, "embedding W_E", PALETTE["train"]))
    if "gini_neuron_logit" in measures:
        fig.add_trace(_line(measures.epoch, measures.gini_neuron_logit, "neuron-logit map W_L", PALETTE["test"]))
    _shade_phases(fig, phases, measures.epoch)
    _curve_layout(fig, "Sparsity in the Fourier basis (Gini coefficient)", "Gini (0 = dense, 1 = sparse)")
    fig.update_yaxes(range=[0, 1.02])
    return fig


def plot_weight_norms(measures: pd.DataFrame, phases: Mapping[str, int | None] | None = None) -> go.Figure:
    """Sum of squared weights over epochs: the total, and per parameter (log scale).

    Weight decay shrinks it; the steep fall marks cleanup (Nanda et al. 2023, §5.1 and Fig. 7).
    """
    fig = go.Figure()
    if "weight_norm_sq" in measures:
        fig.add_trace(_line(measures.epoch, measures.weight_norm_sq, "total", PALETTE["total"], line={"width": 3}))
    params = [c for c in measures.columns if c.startswith("norm_sq.")]
    colors = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#8C6D31")
    shown = [c for c in params if float(np.nanmax(_np(measures[c]))) > 0]
    for i, col in enumerate(shown):
        name = col.removeprefix("norm_sq.").removeprefix("blocks.0.")
        fig.add_trace(_line(
            measures.epoch, measures[col], name, colors[i % len(colors)], line={"width": 1.4, "dash": "dot"}
        ))
    _shade_phases(fig, phases, measures.epoch)
    _curve_layout(fig, "Parameter norms (sum of squared weights, log scale)", "Σ w²",
                  legend={"orientation": "v", "x": 1.02, "y": 1, "yanchor": "top", "font": {"size": 11}})
    fig.update_layout(margin={"r": 150, "t": 82})
    _log_axis(fig, [t.y for t in fig.data])
    return fig


def plot_key_share(measures: pd.DataFrame, phases: Mapping[str, int | None] | None = None) -> go.Figure:
    """Share of the logits' and of the neurons' variance in the key frequencies over epochs."""
    fig = go.Figure()
    if "key_logit_frac" in measures:
        fig.add_trace(_line(measures.epoch, measures.key_logit_frac, "logits", PALETTE["restricted"], fmt=".1%"))
    if "neuron_key_frac" in measures:
        fig.add_trace(_line(measures.epoch, measures.neuron_key_frac, "neurons (mean)", PALETTE["train"], fmt=".1%"))
    _shade_phases(fig, phases, measures.epoch)
    _curve_layout(fig, "Variance explained by the key frequencies", "share of variance")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return fig


def plot_measure_columns(
    measures: pd.DataFrame, columns: Mapping[str, str], title: str,
    phases: Mapping[str, int | None] | None = None, units: Mapping[str, str] | None = None,
) -> go.Figure:
    """Any measure family's columns over epochs (``columns``: name -> hover label), phases
    shaded: the dashboard's panel for a family registered beyond the built-in ones. Each curve
    joins the checkpoints where its column is a number (a lens computed on every k-th checkpoint
    is NaN between them). With ``units`` (column -> unit), the columns of a second unit go on a
    right-hand axis."""
    fig = go.Figure()
    units = units or {}
    order = list(dict.fromkeys(units.get(c, "") for c in columns))
    for i, (col, label) in enumerate(columns.items()):
        if col not in measures:
            continue
        finite = measures[col].notna()
        right = len(order) > 1 and units.get(col, "") != order[0]
        fig.add_trace(_line(measures.epoch[finite], measures[col][finite], label, RUN_COLORS[i % len(RUN_COLORS)],
                            yaxis="y2" if right else "y"))
    _shade_phases(fig, phases, measures.epoch)
    _curve_layout(fig, title, order[0] if order and order[0] else "value")
    if len(order) > 1:
        fig.update_layout(yaxis2={"title": {"text": ", ".join(u for u in order[1:] if u) or "value"},
                                  "overlaying": "y", "side": "right", "showgrid": False})
    return fig


def circuit_columns(measures: pd.DataFrame) -> dict[str, dict[str, str]]:
    """``mem_*`` / ``gen_*`` columns grouped by what they measure: ``{suffix: {"mem": col, "gen": col}}``."""
    groups: dict[str, dict[str, str]] = {}
    for col in measures.columns:
        for prefix in ("mem", "gen"):
            if col.startswith(prefix + "_"):
                groups.setdefault(col[len(prefix) + 1 :], {})[prefix] = col
    return groups


def circuit_quantities(measures: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The circuit quantities (``mem_<q>`` / ``gen_<q>`` suffixes): those about norm or efficiency, then the rest."""
    groups = circuit_columns(measures)
    main = [q for q in groups if "norm" in q or "efficiency" in q]
    return main, [q for q in groups if q not in main]


def plot_circuits(
    measures: pd.DataFrame,
    phases: Mapping[str, int | None] | None = None,
    quantities: Sequence[str] | None = None,
    title: str = "Memorising vs generalising circuit",
) -> go.Figure:
    """Memorising vs generalising circuit over epochs, from the ``mem_*`` / ``gen_*`` columns.

    One subplot per measured quantity (``mem_norm`` with ``gen_norm``, ``mem_efficiency`` with
    ``gen_efficiency``, ...; a quantity measured for one circuit is drawn alone), memorising in
    orange, generalising in blue, four subplots a row. ``quantities`` picks the suffixes; by
    default those about norm or efficiency (all when there are none), efficiency first.
    Efficiency is logit size per unit of parameter norm (Varma et al. 2023, "Explaining grokking
    through circuit efficiency"); a positive quantity spanning over two decades is on a log scale.
    """
    groups = circuit_columns(measures)
    if not groups:
        raise ValueError("no mem_* or gen_* columns in the table")
    if quantities is None:
        main, rest = circuit_quantities(measures)
        quantities = main or rest
    unknown = [q for q in quantities if q not in groups]
    if unknown:
        raise ValueError(f"no mem_/gen_ columns for {unknown}; have {sorted(groups)}")
    order = sorted(quantities, key=lambda q: ("efficiency" not in q, "norm" not in q, q))
    cols = min(len(order), 4)
    rows = math.ceil(len(order) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[q.replace("_", " ") for q in order],
        horizontal_spacing=0.12 if cols < 3 else 0.07, vertical_spacing=min(0.3, 0.35 / rows),
    )
    shown: set[str] = set()
    for i, quantity in enumerate(order):
        row, col = i // cols + 1, i % cols + 1
        for prefix, label in (("mem", "memorising"), ("gen", "generalising")):
            column = groups[quantity].get(prefix)
            if column is None:
                continue
            fig.add_trace(
                _line(measures.epoch, measures[column], label, PALETTE[prefix], legendgroup=prefix,
                      showlegend=prefix not in shown, meta=column),
                row=row, col=col,
            )
            shown.add(prefix)
        values = np.concatenate([_np(measures[c]).astype(float) for c in groups[quantity].values()])
        values = values[np.isfinite(values)]
        if len(values) and values.min() > 0 and values.max() / values.min() > 100:
            _log_axis(fig, [values], row=row, col=col)
    # Shading only: the phase names would collide with the subplot titles (every other panel names them).
    _shade_phases(fig, phases, measures.epoch, labels=False, row="all", col="all")
    _curve_layout(fig, title, "", legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1,
                                          "yref": "container", "yanchor": "top"})
    fig.update_xaxes(title_text=None)
    fig.update_xaxes(title_text="epoch", row=rows)
    fig.update_layout(height=130 + 260 * rows, margin={"t": 90, "b": 60})
    return fig
