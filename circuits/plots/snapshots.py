"""Per-checkpoint panels with one plotly frame per shown epoch: Fourier norms, neuron clusters,
neuron activations and attention patterns (Nanda et al. 2023, §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.plots.style import PALETTE, _f32, _frames, _layout, _np, _slider


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
