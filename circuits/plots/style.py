"""The shared look of every figure: one colour per quantity, fonts, axes, phase shading, sliders.

Colours follow Okabe and Ito (colour-blind safe); the phases are those of Nanda et al. (2023), §5.2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import plotly.graph_objects as go

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
    "memorization": "#E69F00",  # Liu et al.'s spelling (circuits.measures.phases.liu_phase)
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
