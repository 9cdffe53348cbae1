"""Figures over many runs: comparisons and the experiment protocols of Varma et al. (2023),
"Explaining grokking through circuit efficiency" (efficiency vs dataset size, ungrokking), and of
the zone maps and phase diagrams over data size, model size and weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go

from circuits.measures.phases import crossing
from circuits.plots.style import (
    LINE,
    PALETTE,
    RUN_COLORS,
    ZONE_COLORS,
    _curve_layout,
    _f32,
    _layout,
    _line,
    _log_axis,
    _np,
)

if TYPE_CHECKING:
    import pandas as pd


def plot_comparison(
    runs: Mapping[str, pd.DataFrame],
    columns: Sequence[str],
    title: str,
    ylabel: str,
    log_y: bool = False,
    percent: bool = False,
) -> go.Figure:
    """Overlay ``columns`` of several runs' measures tables: a colour per run, a dash per column.

    ``runs`` maps a label (``"wd=0.3"``) to that run's measures table. Columns are drawn solid
    for the first (test, say) and dashed/dotted for the rest.
    """
    dashes = ("solid", "dash", "dot", "dashdot")
    fig = go.Figure()
    for i, (label, m) in enumerate(runs.items()):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for j, col in enumerate(columns):
            if col not in m:
                continue
            name = label if len(columns) == 1 else f"{label} · {col.replace('_', ' ')}"
            fig.add_trace(_line(
                m.epoch, m[col], name, color, fmt=".1%" if percent else ".3g",
                line={"dash": dashes[j % len(dashes)], "width": 2.2 if j == 0 else 1.6}, legendgroup=label,
            ))
    _curve_layout(fig, title, ylabel)
    if log_y:
        _log_axis(fig, [t.y for t in fig.data])
    if percent:
        fig.update_yaxes(tickformat=".0%", range=[-0.02, 1.04])
    return fig


# ---- experiment protocols ------------------------------------------------------------------------


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing}")


_DATASET_SIZE_VALUES = {
    "efficiency": ("Circuit efficiency vs training-set size", "efficiency (margin^(1/4) per unit parameter norm)"),
    "weight_norm": ("Parameter norm at convergence vs training-set size", "parameter norm ‖θ‖ at the end"),
}


def plot_efficiency_vs_dataset_size(df: pd.DataFrame, value: str = "efficiency") -> go.Figure:
    """Circuit efficiency (or parameter norm) against training-set size D (Varma et al. 2023, Fig. 2).

    ``df`` columns: ``dataset_size`` (int, training pairs), ``circuit`` (``"mem"`` or ``"gen"``),
    ``value`` (float; ``"efficiency"`` or ``"weight_norm"``); optional ``seed``. Each row is a
    point; lines join the means per D. The memorising circuit's efficiency falls (its norm
    rises) with D while the generalising one's does not; the crossing of the means is the
    critical dataset size D_crit, marked when present.
    """
    _require(df, ("dataset_size", "circuit", value), "plot_efficiency_vs_dataset_size")
    title, ylabel = _DATASET_SIZE_VALUES.get(value, (f"{value} vs training-set size", value))
    fig = go.Figure()
    means: dict[str, Any] = {}
    for circuit, label in (("mem", "memorising"), ("gen", "generalising")):
        part = df[(df.circuit == circuit) & df[value].notna()]
        if not len(part):
            continue
        fig.add_trace(go.Scatter(
            x=_np(part.dataset_size), y=_f32(part[value]), mode="markers", name=f"{label} (runs)",
            marker={"color": PALETTE[circuit], "size": 7, "opacity": 0.45}, legendgroup=circuit,
            showlegend=False, hovertemplate=f"{label}<br>D=%{{x}}<br>{value} %{{y:.3g}}<extra></extra>",
        ))
        mean = part.groupby("dataset_size")[value].mean()
        means[circuit] = mean
        fig.add_trace(go.Scatter(
            x=_np(mean.index), y=_f32(mean.values), mode="lines+markers", name=label,
            line={**LINE, "color": PALETTE[circuit]}, marker={"size": 8}, legendgroup=circuit,
            hovertemplate=f"{label} (mean)<br>D=%{{x}}<br>{value} %{{y:.3g}}<extra></extra>",
        ))
    if "mem" in means and "gen" in means:
        both = means["mem"].to_frame("mem").join(means["gen"].to_frame("gen"), how="inner").sort_index()
        d = crossing(_np(both.index).astype(float), _np(both["mem"] - both["gen"]).astype(float), 0.0)
        if d is not None:
            fig.add_vline(x=d, line={"color": "#444", "dash": "dash", "width": 1.5})
            fig.add_annotation(x=math.log10(d), xref="x", y=1.0, yref="paper", yanchor="bottom",
                               text=f"D_crit ≈ {d:,.0f}", showarrow=False, font={"size": 12})
    _layout(fig, title, "training-set size D (pairs, log scale)", ylabel)
    fig.update_xaxes(type="log")
    return fig


def plot_reference_circuits(df: pd.DataFrame, chance: float | None = None) -> go.Figure:
    """Trig-subspace share of the logits of the reference networks (Varma et al. 2023, App. B).

    ``df`` columns: ``kind`` (``"mem"``: random labels, ``"gen"``: large training set),
    ``gen_share_all`` and ``gen_share`` (0-1), optional ``seed``. ``chance`` marks the share a
    network with no a+b structure has by chance, 1/sqrt(p+1).
    """
    _require(df, ("kind", "gen_share_all", "gen_share"), "plot_reference_circuits")
    names = {"mem": "memorisation only (random labels)", "gen": "generalisation only (large data)"}
    fig = go.Figure()
    for col, symbol, label in (("gen_share_all", "circle", "all frequencies"), ("gen_share", "diamond", "key frequencies")):
        fig.add_trace(go.Scatter(
            x=[names.get(k, k) for k in df.kind], y=_f32(df[col]), mode="markers", name=label,
            marker={"symbol": symbol, "size": 10, "opacity": 0.75,
                    "color": [PALETTE.get(k, "#777") for k in df.kind]},
            hovertemplate=f"{label}<br>%{{x}}<br>share %{{y:.3f}}<extra></extra>",
        ))
    if chance is not None:
        fig.add_hline(y=chance, line={"color": "#444", "dash": "dot", "width": 1.5},
                      annotation_text=f"chance 1/√(p+1) = {chance:.3f}", annotation_position="top left")
    fig.add_hline(y=0.95, line={"color": PALETTE["gen"], "dash": "dash", "width": 1.2},
                  annotation_text="0.95 (Varma's criterion)", annotation_position="bottom left")
    _layout(fig, "Reference circuits: share of the logit norm in the a+b Fourier subspace", "network",
            "‖P_S(L)‖ / ‖L − mean‖")
    fig.update_yaxes(range=[-0.02, 1.04])
    return fig


def plot_capacity(df: pd.DataFrame, x: str = "d_model") -> go.Figure:
    """Memorisation capacity against model width (Huang et al. 2024, Fig. 4).

    ``df`` columns: ``x`` (the width), ``capacity`` (pairs memorised), optional ``seed``.
    """
    _require(df, (x, "capacity"), "plot_capacity")
    mean = df.groupby(x).capacity.mean()
    fig = go.Figure([
        go.Scatter(x=_np(df[x]), y=_f32(df.capacity), mode="markers", name="runs", showlegend=False,
                   marker={"color": PALETTE["mem"], "size": 7, "opacity": 0.45},
                   hovertemplate=f"{x}=%{{x}}<br>capacity %{{y:,.0f}}<extra></extra>"),
        go.Scatter(x=_np(mean.index), y=_f32(mean.values), mode="lines+markers", name="mean over seeds",
                   line={**LINE, "color": PALETTE["mem"]},
                   hovertemplate=f"{x}=%{{x}}<br>capacity %{{y:,.0f}}<extra></extra>"),
    ])
    _layout(fig, "Memorisation capacity vs model width", x.replace("_", " "),
            "random-label pairs memorised")
    return fig


def plot_emergence(df: pd.DataFrame, threshold: float | None = None) -> go.Figure:
    """Emergence (Huang et al. 2024, §5): the operation's best test accuracy against model size,
    one line per amount of memorisation data mixed in.

    ``df`` columns: ``n_params``, ``mem_size`` (0: the operation alone), ``best_test_acc``;
    optional ``seed`` (points per run, lines through the means). ``threshold`` draws the level
    that defines the emergence size.
    """
    _require(df, ("n_params", "mem_size", "best_test_acc"), "plot_emergence")
    fig = go.Figure()
    for i, (m, part) in enumerate(df.groupby("mem_size")):
        color = PALETTE["gen"] if m == 0 else RUN_COLORS[i % len(RUN_COLORS)]
        name = "operation alone" if m == 0 else f"+ {int(m):,} memorisation pairs"
        mean = part.groupby("n_params").best_test_acc.mean()
        fig.add_trace(go.Scatter(x=_np(part.n_params), y=_f32(part.best_test_acc), mode="markers", showlegend=False,
                                 marker={"color": color, "size": 6, "opacity": 0.4}, name=name,
                                 hovertemplate="%{x:,} parameters<br>test acc %{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=_np(mean.index), y=_f32(mean.values), mode="lines+markers", name=name,
                                 line={**LINE, "color": color},
                                 hovertemplate="%{x:,} parameters<br>mean test acc %{y:.3f}<extra></extra>"))
    if threshold is not None:
        fig.add_hline(y=threshold, line={"dash": "dot", "color": PALETTE["other"]})
    _layout(fig, "Emergence: test accuracy of the operation vs model size", "parameters", "best test accuracy")
    fig.update_xaxes(type="log")
    return fig


def plot_ungrokking(df: pd.DataFrame, critical_size: int | float | None = None) -> go.Figure:
    """Ungrokking: test accuracy after further training on a smaller set of size D (Varma et al. 2023).

    ``df`` columns: ``dataset_size`` (int), ``test_acc`` (0-1); optional ``weight_decay`` (one
    line per value) and ``seed`` (several points per D, line through the mean). A grokked
    network retrained below D_crit forgets the general solution: accuracy drops sharply there.
    """
    _require(df, ("dataset_size", "test_acc"), "plot_ungrokking")
    groups = list(df.groupby("weight_decay")) if "weight_decay" in df else [(None, df)]
    fig = go.Figure()
    for i, (wd, part) in enumerate(groups):
        color = RUN_COLORS[i % len(RUN_COLORS)] if wd is not None else PALETTE["test"]
        name = f"wd={wd:g}" if wd is not None else "test accuracy"
        mean = part.groupby("dataset_size").test_acc.mean()
        if len(mean) < len(part):
            fig.add_trace(go.Scatter(
                x=_np(part.dataset_size), y=_f32(part.test_acc), mode="markers", showlegend=False,
                marker={"color": color, "size": 6, "opacity": 0.4}, legendgroup=name,
                hovertemplate=f"{name}<br>D=%{{x}}<br>test acc %{{y:.1%}}<extra></extra>",
            ))
        fig.add_trace(go.Scatter(
            x=_np(mean.index), y=_f32(mean.values), mode="lines+markers", name=name, legendgroup=name,
            line={**LINE, "color": color}, marker={"size": 7},
            hovertemplate=f"{name}<br>D=%{{x}}<br>test acc %{{y:.1%}}<extra></extra>",
        ))
    if critical_size is not None:
        fig.add_vline(x=critical_size, line={"color": "#444", "dash": "dash", "width": 1.5},
                      annotation_text=f"D_crit ≈ {critical_size:,.0f}", annotation_position="top")
    _layout(fig, "Ungrokking: test accuracy after retraining on D pairs", "training-set size D (pairs)",
            "test accuracy")
    fig.update_yaxes(tickformat=".0%", range=[-0.02, 1.04])
    return fig


def _axis_values(values: Any) -> list[str]:
    return [f"{v:g}" if isinstance(v, (int, float, np.integer, np.floating)) else str(v) for v in values]


def plot_zone_map(
    df: pd.DataFrame, x: str = "dataset_size", y: str = "weight_decay", zone: str = "zone",
    title: str = "Zone map",
) -> go.Figure:
    """Which regime each (x, y) setting lands in: a categorical heatmap of ``zone`` names.

    ``df`` has one row per run (or per setting) with columns ``x``, ``y`` and ``zone`` (a name
    such as ``"grokking"``, ``"memorisation"``, ``"ungrokking"``, ``"semi-grokking"``,
    ``"comprehension"``; see :data:`ZONE_COLORS`). Several rows at one setting (seeds): the most
    common zone wins, and a cell whose runs disagree says so ("grokking 2/3", the others in
    its hover text). Axes are categorical, so log-spaced sweeps stay evenly spaced.
    """
    _require(df, (x, y, zone), "plot_zone_map")
    votes = df.assign(**{zone: df[zone].astype(str)}).groupby([y, x])[zone]
    table = votes.agg(lambda s: s.value_counts().index[0]).unstack(x)
    table = table.sort_index().sort_index(axis=1)
    # The agreement per cell: the winner's count of the cell's runs, and every zone's count.
    counts = votes.agg(lambda s: (int(s.value_counts().iloc[0]), len(s),
                                  ", ".join(f"{k} {v}" for k, v in s.value_counts().items())))
    counts = counts.unstack(x).reindex(index=table.index, columns=table.columns)
    names = sorted(set(df[zone].astype(str)), key=lambda n: (n not in ZONE_COLORS, list(ZONE_COLORS).index(n) if n in ZONE_COLORS else 0, n))
    code = {n: i for i, n in enumerate(names)}
    fallback = ("#BBBBBB", "#777777", "#E5C494", "#B3B3B3")
    colors = [ZONE_COLORS.get(n, fallback[i % len(fallback)]) for i, n in enumerate(names)]
    k = len(names)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / k, c], [(i + 1) / k, c]]
    cells = table.to_numpy(dtype=object)
    agree = counts.to_numpy(dtype=object)
    z = np.array([[code[v] if isinstance(v, str) else np.nan for v in row] for row in cells], dtype=float)
    text = np.array([[(v + (f" {a[0]}/{a[1]}" if a[0] < a[1] else "")) if isinstance(v, str) else ""
                      for v, a in zip(row, arow)] for row, arow in zip(cells, agree)])
    hover = np.array([[a[2] if isinstance(a, tuple) else "" for a in arow] for arow in agree])
    fig = go.Figure(go.Heatmap(
        x=_axis_values(table.columns), y=_axis_values(table.index), z=z, text=text, customdata=hover,
        texttemplate="%{text}", zmin=-0.5, zmax=k - 0.5, colorscale=scale, xgap=2, ygap=2,
        colorbar={"tickvals": list(range(k)), "ticktext": names, "thickness": 14, "title": {"text": zone.replace("_", " ")}},
        hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>%{{customdata}}<extra></extra>",
    ))
    _layout(fig, title, x.replace("_", " "), y.replace("_", " "))
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", showgrid=False)
    return fig


def plot_sweep_curve(df: pd.DataFrame, x: str, value: str = "epochs_to_test_95", log_y: bool = True) -> go.Figure:
    """``value`` against one swept setting: the mean over the runs at each ``x`` (seeds and any
    other axes) with its Student-t 95% interval, the runs as points, and how many never got a
    value (a level not reached) in the hover text. Time to generalise against weight decay
    (Omnigrok: about 1/wd) or against the training fraction (Power et al.: steep below ~40%)."""
    from circuits.stats import mean_ci

    _require(df, (x, value), "plot_sweep_curve")
    xs, means, halves, missing = [], [], [], []
    for key, part in df.groupby(x, sort=True):
        vals = [float(v) for v in part[value] if v is not None and v == v]
        mean, half, _ = mean_ci(vals) if vals else (math.nan, math.nan, 0)
        xs.append(key)
        means.append(mean)
        halves.append(0.0 if half != half else half)
        missing.append(len(part) - len(vals))
    label = value.replace("_", " ")
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in xs)
    shown_x = xs if numeric else _axis_values(xs)
    fig = go.Figure()
    pts = df[[x, value]].dropna()
    fig.add_trace(go.Scatter(
        x=pts[x].tolist() if numeric else _axis_values(pts[x]), y=_f32(pts[value]), mode="markers", name="runs",
        marker={"color": "#9AA5B1", "size": 6, "opacity": 0.6},
    ))
    fig.add_trace(go.Scatter(
        x=shown_x, y=_f32(means), mode="lines+markers", name="mean (95% interval)", line={**LINE, "color": RUN_COLORS[0]},
        error_y={"type": "data", "array": _f32(halves), "visible": True}, customdata=missing,
        hovertemplate=f"{x}=%{{x}}<br>{label} %{{y:.4g}}<br>runs without a value: %{{customdata}}<extra></extra>",
    ))
    _layout(fig, f"{label} against {x.replace('_', ' ')}", x.replace("_", " "), label)
    if log_y:
        fig.update_yaxes(type="log")
    if numeric and len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 20:
        fig.update_xaxes(type="log")
    elif not numeric:
        fig.update_xaxes(type="category")
    return fig


def plot_phase_diagram(
    df: pd.DataFrame,
    value: str,
    x: str = "dataset_size",
    y: str = "weight_decay",
    title: str | None = None,
    log_color: bool = False,
) -> go.Figure:
    """A phase diagram: ``value`` (mean over seeds) as a heatmap over two swept settings.

    ``df`` has one row per run with columns ``x``, ``y`` and ``value`` (for example
    ``grok_epoch`` or ``final_test_acc``). With ``log_color`` the colour is log10(value).
    Axes are categorical, so log-spaced sweeps stay evenly spaced; empty cells are blank.
    """
    _require(df, (x, y, value), "plot_phase_diagram")
    table = df.groupby([y, x])[value].mean().unstack(x).sort_index().sort_index(axis=1)
    z = table.to_numpy(dtype=float)
    shown = np.log10(np.where(z > 0, z, np.nan)) if log_color else z
    label = value.replace("_", " ")
    fig = go.Figure(go.Heatmap(
        x=_axis_values(table.columns), y=_axis_values(table.index), z=shown.astype(np.float32),
        customdata=z.astype(np.float32), colorscale="Viridis", xgap=2, ygap=2,
        colorbar={"title": {"text": f"log10 {label}" if log_color else label}, "thickness": 14},
        hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>{label} %{{customdata:.3g}}<extra></extra>",
    ))
    _layout(fig, title or f"Phase diagram: {label}", x.replace("_", " "), y.replace("_", " "))
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", showgrid=False)
    return fig
