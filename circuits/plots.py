"""Figure builders: analysis tables and arrays -> plotly ``Figure``. No IO, no torch.

Every panel of the dashboards is one ``plot_*`` function that a notebook calls the same way::

    analysis = circuits.analyze(run)
    plots.plot_losses(analysis.measures, analysis.summary["phases"]).show()
    plots.plot_fourier_heatmap(analysis.arrays["epochs"], analysis.arrays["embed_fourier_norms"],
                               analysis.key_frequencies).show()

The measures are those of Nanda et al. (2023), "Progress measures for grokking via mechanistic
interpretability" (restricted and excluded loss §5.1, Gini sparsity and weight norm §5.1, the
phases §5.2, Fourier norms and neuron clusters §4); the experiment panels follow Varma et al.
(2023), "Explaining grokking through circuit efficiency". Arrays may be numpy arrays or CPU
torch tensors. One colour means one thing on every panel: :data:`PALETTE`.

Per-checkpoint panels (``plot_fourier_norms``, ``plot_neuron_clusters``,
``plot_neuron_activations``, ``plot_attention_patterns``) carry one plotly frame per shown
checkpoint, named by its epoch, and their own slider; the dashboard drives all of them from
one epoch slider instead.
"""

from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PALETTE",
    "PHASE_COLORS",
    "ZONE_COLORS",
    "frame_indices",
    "phase_spans",
    "plot_losses",
    "plot_accuracies",
    "plot_fourier_heatmap",
    "plot_gini",
    "plot_weight_norms",
    "plot_key_share",
    "circuit_columns",
    "circuit_quantities",
    "plot_circuits",
    "plot_fourier_norms",
    "plot_neuron_clusters",
    "plot_neuron_activations",
    "plot_attention_patterns",
    "plot_comparison",
    "plot_efficiency_vs_dataset_size",
    "plot_reference_circuits",
    "plot_capacity",
    "plot_ungrokking",
    "plot_zone_map",
    "plot_phase_diagram",
]

#: One colour per quantity, the same on every panel (Okabe-Ito, colour-blind safe).
PALETTE: dict[str, str] = {
    "train": "#0072B2",  # blue
    "test": "#D55E00",  # vermillion
    "restricted": "#009E73",  # green
    "excluded": "#CC79A7",  # purple
    "mem": "#E69F00",  # orange: the memorising circuit
    "gen": "#56B4E9",  # sky blue: the generalising circuit
    "total": "#222222",
    "key": "#D55E00",  # key frequencies, highlighted
    "other": "#9AA5B1",  # everything else, muted
}

#: Background shading of the three phases of Nanda et al. (2023), §5.2.
PHASE_COLORS: dict[str, str] = {
    "memorisation": "#E69F00",
    "circuit formation": "#56B4E9",
    "cleanup": "#009E73",
}

#: Colours of named zones on a zone map (unknown names get the muted colours after these).
ZONE_COLORS: dict[str, str] = {
    "comprehension": "#009E73",
    "progression": "#0072B2",
    "grokking": "#56B4E9",
    "semi-grokking": "#F0E442",
    "ungrokking": "#CC79A7",
    "memorisation": "#E69F00",
    "confusion": "#9AA5B1",
}

#: Colours of runs on comparison panels (a run is a colour; train/test is the line style).
RUN_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#222222", "#F0E442")

FONT = "Inter, 'Helvetica Neue', Helvetica, Arial, sans-serif"
LINE = {"width": 2.2}
SPLITS = ("train", "test", "restricted", "excluded")
SPLIT_LABELS = {
    "train": "train",
    "test": "test",
    "restricted": "restricted (key freqs only)",
    "excluded": "excluded (key freqs removed)",
}


# ---- helpers ---------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    """A numpy view of an array or a CPU torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _f32(x: Any) -> np.ndarray:
    return _np(x).astype(np.float32)


@lru_cache(maxsize=1)
def _template() -> go.layout.Template:
    # Built once: validating a named template on every figure costs ~0.1 s each.
    import plotly.io as pio

    return pio.templates["plotly_white"]


def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str, **kw: Any) -> go.Figure:
    """The house style: white background, left-aligned title, legend above the plot."""
    fig.layout.template = _template()
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 0.975, "yanchor": "top",
               "yref": "container", "font": {"size": 16}},
        font={"family": FONT, "size": 13, "color": "#222"},
        margin={"l": 70, "r": 30, "t": 74, "b": 55},
        legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom", "font": {"size": 12}},
        hoverlabel={"font": {"family": FONT}},
        height=400,
    )
    fig.update_layout(**kw)  # per-figure settings merge into the defaults above
    fig.update_xaxes(title_text=xlabel, showline=True, linecolor="#888", mirror=False, ticks="outside")
    fig.update_yaxes(title_text=ylabel, showline=True, linecolor="#888", ticks="outside")
    return fig


def _curve_layout(fig: go.Figure, title: str, ylabel: str, **kw: Any) -> go.Figure:
    """Curves over epochs: one hover box listing every curve, headed by the epoch."""
    _layout(fig, title, "epoch", ylabel, hovermode="x unified", **kw)
    fig.update_xaxes(unifiedhovertitle={"text": "epoch %{x}"}, title_standoff=6)
    fig.update_layout(margin={"t": 82, "b": 88})
    if "legend" not in kw:  # below the plot: the strip above it names the phases
        fig.update_layout(legend={"y": -0.17, "yanchor": "top", "x": 0, "xanchor": "left"})
    return fig


def _line(x: Any, y: Any, name: str, color: str, fmt: str = ".3g", **kw: Any) -> go.Scatter:
    return go.Scatter(
        x=_np(x), y=_f32(y), name=name, mode="lines", line={**LINE, "color": color, **kw.pop("line", {})},
        hovertemplate=f"%{{y:{fmt}}}", **kw,
    )


def frame_indices(n: int, max_frames: int = 50, keep: Sequence[int] = ()) -> list[int]:
    """Indices of at most ``max_frames`` of ``n`` checkpoints: evenly spaced, first and last kept.

    Indices in ``keep`` (for example the checkpoints at the phase boundaries) are always shown;
    the rest are spread evenly over the checkpoint index, which follows the checkpoint schedule
    (dense early in training, where the network changes fastest).
    """
    if n <= 0:
        return []
    if n <= max_frames:
        return list(range(n))
    keep = sorted({int(k) for k in keep if 0 <= k < n})
    free = max(2, max_frames - len(keep))
    even = np.unique(np.round(np.linspace(0, n - 1, free)).astype(int)).tolist()
    chosen = set(keep) | set(even)
    # Drop evenly spaced picks nearest to a kept index until the budget holds.
    while len(chosen) > max(max_frames, len(keep) + 2):
        extra = sorted(chosen - set(keep) - {0, n - 1}, key=lambda i: min(abs(i - k) for k in keep or [0]))
        if not extra:
            break
        chosen.discard(extra[0])
    return sorted(chosen)


def phase_spans(
    phases: Mapping[str, int | None] | None, first: int | float, last: int | float
) -> list[tuple[str, float, float, bool]]:
    """``(name, start, end, ended)`` for each phase the boundaries reveal (Nanda et al. 2023, §5.2).

    ``phases`` is ``summary["phases"]`` (``memorisation_end``, ``circuit_formation_end``,
    ``cleanup_end``; any may be None). A phase whose end is not reached runs to ``last`` with
    ``ended=False``; with no memorisation end, nothing is known and no span is returned.
    """
    if not phases or phases.get("memorisation_end") is None:
        return []
    ends = [phases.get("memorisation_end"), phases.get("circuit_formation_end"), phases.get("cleanup_end")]
    spans = []
    start = first
    for name, end in zip(PHASE_COLORS, ends, strict=True):
        if start is None:
            break
        spans.append((name, float(start), float(end if end is not None else last), end is not None))
        start = end
    return spans


def _shade_phases(
    fig: go.Figure, phases: Mapping[str, int | None] | None, epochs: Any, labels: bool = True, **kw: Any
) -> None:
    """Shade the phases behind the curves and name them in a strip just above the plot.

    Labels sit above the plot so they never cover a curve; one that would overlap its
    neighbour moves up a row (memorisation is often only a few % of the run).
    """
    e = _np(epochs)
    if not len(e):
        return
    first, last = float(e.min()), float(e.max())
    span = max(last - first, 1.0)
    row_end = [-1.0, -1.0]  # right edge of the last label on each row, as a fraction of the axis
    for name, x0, x1, ended in phase_spans(phases, first, last):
        fig.add_vrect(
            x0=x0, x1=x1, fillcolor=PHASE_COLORS[name], opacity=0.13, layer="below", line_width=0, **kw,
        )
        if not labels:
            continue
        label = name if ended else f"{name} (ongoing)"
        width = (len(label) * 6.3 + 8) / 560  # of a typical plot width, in axis fractions
        start = min(max(((x0 + x1) / 2 - first) / span - width / 2, 0.0), max(1.0 - width, 0.0))
        row = 0 if start >= row_end[0] else 1
        row_end[row] = start + width
        fig.add_annotation(
            x=first + start * span, xref="x", xanchor="left", y=1.0, yref="paper", yanchor="bottom",
            yshift=2 + 15 * row, text=f"<span style='color:{PHASE_COLORS[name]}'>■</span> {label}",
            showarrow=False, font={"size": 11, "color": "#5b6670"},
        )


def _log_axis(fig: go.Figure, values: list[Any], **where: Any) -> None:
    """A log y axis labelled 10^n: every decade over a few decades, 1-2-5 within one or two."""
    v = np.concatenate([_np(x).astype(float).ravel() for x in values]) if values else np.zeros(0)
    v = v[np.isfinite(v) & (v > 0)]
    decades = float(np.log10(v.max() / v.min())) if len(v) else 0.0
    if decades >= 1.5 or not len(v):
        # Over many decades plotly's own choice (every other decade) reads best.
        fig.update_yaxes(type="log", exponentformat="power", dtick=None if decades >= 5 else 1, **where)
        return
    # Within a decade or so: 1-2-5 steps written out in full (200, 500, 1000).
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    ticks = [m * 10.0**k for k in range(lo, hi + 1) for m in (1, 2, 5) if v.min() / 1.5 <= m * 10.0**k <= v.max() * 1.5]
    fig.update_yaxes(type="log", tickvals=ticks, ticktext=[f"{t:,.6g}" for t in ticks], **where)


# ---- curves over training ----------------------------------------------------------------------


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


def _merge_freqs(norms: np.ndarray) -> np.ndarray:
    """Component norms [..., p] (Const, cos 1, sin 1, ...) -> one norm per frequency [..., (p-1)/2]."""
    nonconst = norms[..., 1:]
    pairs = nonconst.reshape(*nonconst.shape[:-1], -1, 2)
    return np.sqrt((pairs.astype(np.float64) ** 2).sum(-1))


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
    merged = _merge_freqs(_np(norms)).astype(np.float32)  # [ckpt, k]
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


# ---- per-checkpoint panels (frames) -----------------------------------------------------------


def _slider(fig: go.Figure, names: list[str], active: int, label: str = "epoch ") -> None:
    """Attach plotly frames' own slider and play button (used when a figure stands alone)."""
    if not names:
        return
    step_args = {"mode": "immediate", "frame": {"duration": 0, "redraw": True}, "transition": {"duration": 0}}
    fig.update_layout(
        sliders=[{
            "active": active, "currentvalue": {"prefix": label}, "pad": {"t": 45}, "len": 0.9, "x": 0.1,
            "steps": [{"label": n, "method": "animate", "args": [[n], step_args]} for n in names],
        }],
        updatemenus=[{
            "type": "buttons", "showactive": False, "x": 0, "y": 0, "yanchor": "top", "xanchor": "left",
            "pad": {"t": 55}, "buttons": [{
                "label": "▶", "method": "animate",
                "args": [None, {**step_args, "frame": {"duration": 150, "redraw": True}, "fromcurrent": True}],
            }],
        }],
    )


def _frames(n: int, frames: Sequence[int] | None, max_frames: int) -> list[int]:
    return list(frames) if frames is not None else frame_indices(n, max_frames)


def plot_fourier_norms(
    epochs: Any,
    norms: Any,
    key_freqs: Sequence[int] = (),
    frames: Sequence[int] | None = None,
    title: str = "Embedding W_E in the Fourier basis",
    what: str = "‖W_E‖",
    max_frames: int = 50,
) -> go.Figure:
    """Norm of each Fourier component (Const, cos 1, sin 1, ...) at each shown checkpoint.

    ``norms`` is ``[ckpt, p]`` (``arrays["embed_fourier_norms"]`` or
    ``arrays["neuron_logit_fourier_norms"]``); ``frames`` are checkpoint indices to show (default
    :func:`frame_indices`). The key frequencies' components are highlighted: after grokking they
    hold almost all the norm (Nanda et al. 2023, Fig. 3).
    """
    e, z = _np(epochs), _f32(norms)
    idx = _frames(len(e), frames, max_frames)
    p = z.shape[1]
    labels = ["Const"] + [f"{t} {k}" for k in range(1, (p - 1) // 2 + 1) for t in ("cos", "sin")]
    key = set(key_freqs)
    colors = [PALETTE["key"] if i > 0 and (i + 1) // 2 in key else PALETTE["other"] for i in range(p)]
    ymax = float(z[idx].max()) * 1.05 if idx else 1.0

    def bars(i: int) -> dict[str, Any]:
        # Frames carry only what changes; plotly merges them into the trace.
        return {
            "type": "bar", "y": z[i],
            "hovertemplate": f"epoch {int(e[i]):,}<br>%{{customdata}}<br>{what} %{{y:.3g}}<extra></extra>",
        }

    active = len(idx) - 1
    fig = go.Figure([go.Bar(
        x=np.arange(p), customdata=labels, marker={"color": colors}, name=what, **(bars(idx[active]) if idx else {"y": np.zeros(p)})
    )])
    fig.frames = [
        go.Frame(name=str(int(e[i])), data=[bars(i)], traces=[0],
                 layout={"title": {"text": f"{title} · epoch {int(e[i]):,}"}})
        for i in idx
    ]
    _layout(fig, f"{title} · epoch {int(e[idx[active]]):,}" if idx else title,
            "Fourier component: constant, then cos k and sin k side by side", what,
            bargap=0.15, showlegend=False, margin={"t": 50})
    fig.update_yaxes(range=[0, ymax])
    # One tick per frequency k between its cos and sin bars (every k when few, else every 5th).
    step = 1 if p < 30 else 5
    ks = sorted({k for k in range(step, (p - 1) // 2 + 1, step)} | key)
    fig.update_xaxes(
        tickmode="array", tickvals=[0] + [2 * k - 0.5 for k in ks], tickangle=0,
        ticktext=["C"] + [f"<b><span style='color:{PALETTE['key']}'>{k}</span></b>" if k in key else str(k) for k in ks],
    )
    _slider(fig, [f.name for f in fig.frames], active)
    return fig


def plot_neuron_clusters(
    epochs: Any,
    clusters: Any,
    key_freqs: Sequence[int] = (),
    frames: Sequence[int] | None = None,
    max_frames: int = 50,
    n_freq: int | None = None,
) -> go.Figure:
    """Number of MLP neurons clustered on each frequency k, at each shown checkpoint.

    ``clusters`` is ``[ckpt, d_mlp]`` (``arrays["neuron_cluster"]``): a neuron's frequency when
    at least 85% of its activation variance over the (a, b) grid lies in that frequency's
    terms, else -1 ("none"). After grokking nearly every neuron sits in a key-frequency
    cluster (Nanda et al. 2023, §4.2). ``n_freq`` ((p - 1) / 2) sets the x axis; by default it
    ends at the largest frequency seen.
    """
    e, c = _np(epochs), _np(clusters).astype(np.int64)
    idx = _frames(len(e), frames, max_frames)
    if n_freq is None:
        n_freq = int(max(c.max(initial=0), max(key_freqs, default=0)))
    x = [str(k) for k in range(1, n_freq + 1)] + ["none"]
    key = set(key_freqs)
    colors = [PALETTE["key"] if k in key else PALETTE["other"] for k in range(1, n_freq + 1)] + ["#D9DEE3"]

    def counts(i: int) -> np.ndarray:
        row = c[i]
        out = np.bincount(row[row > 0], minlength=n_freq + 1)[1 : n_freq + 1]
        return np.append(out, (row < 0).sum()).astype(np.int32)

    def bars(i: int) -> dict[str, Any]:
        return {
            "type": "bar", "y": counts(i),
            "hovertemplate": f"epoch {int(e[i]):,}<br>k=%{{x}}<br>%{{y}} neurons<extra></extra>",
        }

    active = len(idx) - 1
    title = "Neuron clusters (≥85% of variance in one frequency)"
    fig = go.Figure([go.Bar(
        x=x, marker={"color": colors}, name="neurons", **(bars(idx[active]) if idx else {"y": np.zeros(len(x))})
    )])
    fig.frames = [
        go.Frame(name=str(int(e[i])), data=[bars(i)], traces=[0],
                 layout={"title": {"text": f"{title} · epoch {int(e[i]):,}"}})
        for i in idx
    ]
    _layout(fig, f"{title} · epoch {int(e[idx[active]]):,}" if idx else title, "frequency k", "neurons",
            bargap=0.15, showlegend=False, margin={"t": 50})
    fig.update_yaxes(range=[0, c.shape[1] * 1.02 if c.ndim == 2 else 1])
    fig.update_xaxes(type="category", tickfont={"size": 10})
    _slider(fig, [f.name for f in fig.frames], active)
    return fig


def _square_heatmaps(
    epochs: Any, grids: Any, titles: list[str], zlabel: str, title: str, shared_scale: bool,
    colorscale: str, zmin: float | None = None, zmax: float | None = None,
) -> go.Figure:
    """Small multiples of p x p heatmaps over (a, b), one frame per epoch."""
    e, g = _np(epochs), _f32(grids)  # [frame, p, p, panel]
    n_panels = g.shape[-1] if g.ndim == 4 else len(titles)
    fig = make_subplots(rows=1, cols=max(n_panels, 1), subplot_titles=titles, horizontal_spacing=0.03)
    lo = np.zeros(n_panels, np.float32) if zmin is None else np.full(n_panels, zmin, np.float32)
    if zmax is not None:
        hi = np.full(n_panels, zmax, np.float32)
    elif len(e):
        hi = g.reshape(-1, n_panels).max(0)
        if shared_scale:
            hi = np.full(n_panels, hi.max())
    else:
        hi = np.ones(n_panels, np.float32)
    hi = np.maximum(hi, lo + 1e-6)

    def traces(i: int) -> list[dict[str, Any]]:
        # Frames carry only what changes; plotly merges them into the traces.
        return [
            {
                "type": "heatmap", "z": g[i, :, :, j],
                "hovertemplate": (
                    f"epoch {int(e[i]):,}<br>a=%{{y}}, b=%{{x}}<br>{zlabel} %{{z:.3g}}<extra>{titles[j]}</extra>"
                ),
            }
            for j in range(n_panels)
        ]

    active = len(e) - 1
    for j, tr in enumerate(traces(active) if len(e) else []):
        fig.add_trace(go.Heatmap(
            zmin=float(lo[j]), zmax=float(hi[j]), colorscale=colorscale,
            showscale=shared_scale and j == n_panels - 1,
            colorbar={"title": {"text": zlabel}, "thickness": 12} if shared_scale else None, **tr,
        ), row=1, col=j + 1)
    fig.frames = [
        go.Frame(name=str(int(e[i])), data=traces(i), traces=list(range(n_panels)),
                 layout={"title": {"text": f"{title} · epoch {int(e[i]):,}"}})
        for i in range(len(e))
    ]
    _layout(fig, f"{title} · epoch {int(e[active]):,}" if len(e) else title, "", "", showlegend=False,
            margin={"t": 70, "b": 45})
    p = g.shape[1] if g.ndim == 4 else 1
    for j in range(1, n_panels + 1):
        anchor = "x" if j == 1 else f"x{j}"
        fig.update_xaxes(title_text="b", range=[-0.5, p - 0.5], showgrid=False, constrain="domain",
                         showline=False, ticks="", row=1, col=j)
        fig.update_yaxes(title_text="a" if j == 1 else None, range=[-0.5, p - 0.5], showgrid=False,
                         scaleanchor=anchor, constrain="domain", showline=False, ticks="",
                         showticklabels=j == 1, row=1, col=j)
    fig.update_annotations(font={"size": 12})
    _slider(fig, [f.name for f in fig.frames], active)
    return fig


def plot_neuron_activations(
    epochs: Any, acts: Any, neurons: Sequence[int], clusters: Sequence[int] | None = None
) -> go.Figure:
    """Activation of chosen MLP neurons over the (a, b) grid at each given epoch.

    ``acts`` is ``[frame, p, p, neuron]`` (neuron ``neurons[j]`` in the last axis, one frame per
    entry of ``epochs``), read at the last position from ``blocks.0.mlp.hook_post``. A neuron of
    frequency k becomes a periodic pattern in a + b (Nanda et al. 2023, Fig. 4); each panel keeps
    one colour scale over all epochs, so growth is visible.
    """
    clusters = list(clusters) if clusters is not None else [-1] * len(neurons)
    titles = [f"neuron {n}" + (f" · k={k}" if k > 0 else "") for n, k in zip(neurons, clusters, strict=True)]
    return _square_heatmaps(
        epochs, acts, titles, "activation", "MLP neuron activations over (a, b)", False, "Viridis"
    )


def plot_attention_patterns(epochs: Any, pattern: Any) -> go.Figure:
    """Attention from the '=' token to the first operand a, per head, over the (a, b) grid.

    ``pattern`` is ``[frame, p, p, head]`` (from ``blocks.0.attn.hook_pattern`` at query
    position 2, key position 0), one frame per entry of ``epochs``, on a shared 0-1 scale. In a
    grokked model the attention is periodic in a and b (Nanda et al. 2023, Fig. 4).
    """
    g = _np(pattern)
    heads = g.shape[-1] if g.ndim == 4 else 0
    return _square_heatmaps(
        epochs, g, [f"head {h}" for h in range(heads)], "attention", "Attention from '=' to a",
        True, "Blues", zmin=0.0, zmax=1.0,
    )


# ---- several runs --------------------------------------------------------------------------------


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


def _crossing(x: np.ndarray, diff: np.ndarray) -> float | None:
    """First x where ``diff`` changes sign, interpolated in log x."""
    for i in range(len(x) - 1):
        if diff[i] == 0:
            return float(x[i])
        if diff[i] * diff[i + 1] < 0:
            lx0, lx1 = math.log(x[i]), math.log(x[i + 1])
            t = diff[i] / (diff[i] - diff[i + 1])
            return float(math.exp(lx0 + t * (lx1 - lx0)))
    return None


_DATASET_SIZE_VALUES = {
    "efficiency": ("Circuit efficiency vs training-set size", "efficiency (logit per unit parameter norm)"),
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
        d = _crossing(_np(both.index).astype(float), _np(both["mem"] - both["gen"]).astype(float))
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
    df: pd.DataFrame, x: str = "dataset_size", y: str = "weight_decay", zone: str = "zone"
) -> go.Figure:
    """Which regime each (x, y) setting lands in: a categorical heatmap of ``zone`` names.

    ``df`` has one row per run (or per setting) with columns ``x``, ``y`` and ``zone`` (a name
    such as ``"grokking"``, ``"memorisation"``, ``"ungrokking"``, ``"semi-grokking"``,
    ``"comprehension"``; see :data:`ZONE_COLORS`). Several rows at one setting: the most
    common zone wins. Axes are categorical, so log-spaced sweeps stay evenly spaced.
    """
    _require(df, (x, y, zone), "plot_zone_map")
    table = df.groupby([y, x])[zone].agg(lambda s: s.value_counts().index[0]).unstack(x)
    table = table.sort_index().sort_index(axis=1)
    names = sorted(set(df[zone].astype(str)), key=lambda n: (n not in ZONE_COLORS, list(ZONE_COLORS).index(n) if n in ZONE_COLORS else 0, n))
    code = {n: i for i, n in enumerate(names)}
    fallback = ("#BBBBBB", "#777777", "#E5C494", "#B3B3B3")
    colors = [ZONE_COLORS.get(n, fallback[i % len(fallback)]) for i, n in enumerate(names)]
    k = len(names)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / k, c], [(i + 1) / k, c]]
    z = np.array([[code[str(v)] if isinstance(v, str) or v == v else np.nan for v in row] for row in table.to_numpy(dtype=object)], dtype=float)
    text = np.array([[str(v) if isinstance(v, str) else "" for v in row] for row in table.to_numpy(dtype=object)])
    fig = go.Figure(go.Heatmap(
        x=_axis_values(table.columns), y=_axis_values(table.index), z=z, text=text, zmin=-0.5, zmax=k - 0.5,
        colorscale=scale, xgap=2, ygap=2,
        colorbar={"tickvals": list(range(k)), "ticktext": names, "thickness": 14, "title": {"text": "zone"}},
        hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>%{{text}}<extra></extra>",
    ))
    _layout(fig, "Zone map", x.replace("_", " "), y.replace("_", " "))
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", showgrid=False)
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
