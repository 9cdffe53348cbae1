"""Figures -> one self-contained HTML file: the run, comparison and experiment dashboards.

``write_run_dashboard(analysis)`` writes ``dashboard.html`` beside ``measures.csv`` (``circuits
analyze`` calls it; so does ``circuits dashboard RUN_DIR``). The file embeds plotly.js and every
number it shows: it opens from ``file://`` with no network. Per-checkpoint panels share one
epoch slider; their frames are downsampled to at most :data:`MAX_FRAMES` checkpoints (the page
says so), and large heatmap frames are stored as 8-bit levels of their own range (1/255 of the
range, below what a colour scale shows), so a 500-checkpoint p = 113 run stays under 15 MB.

Panels follow Nanda et al. (2023), "Progress measures for grokking via mechanistic
interpretability"; the experiment page follows Varma et al. (2023), "Explaining grokking through
circuit efficiency". The figures themselves come from :mod:`circuits.plots`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from circuits import plots

if TYPE_CHECKING:
    from circuits.analysis import Analysis
    from circuits.run import Run

__all__ = [
    "DASHBOARD_FILE",
    "MAX_FRAMES",
    "choose_neurons",
    "comparison_name",
    "plotly_js",
    "grid_activations",
    "grid_frames",
    "run_figures",
    "write_run_dashboard",
    "write_comparison_dashboard",
    "write_experiment_dashboard",
    "write_figure_page",
]

DASHBOARD_FILE = "dashboard.html"
MAX_FRAMES = 50
#: Bytes of quantised heatmap frames a run page may hold (15 MB limit; plotly.js takes 1.5 MB).
GRID_BUDGET = 7_000_000
OPS = {"add": "a + b", "sub": "a − b", "mul": "a · b", "div": "a / b"}


# ---- data for the per-checkpoint panels ---------------------------------------------------------


def choose_neurons(analysis: Analysis, n: int = 4) -> list[tuple[int, int]]:
    """``n`` neurons worth watching, as ``(neuron, frequency or -1)``.

    For each key frequency in turn, the neuron of that cluster (at the last checkpoint) whose
    variance is most concentrated in it; then the most concentrated neurons left over.
    """
    cluster = np.asarray(analysis.arrays["neuron_cluster"])
    best = np.asarray(analysis.arrays["neuron_best_frac"])
    if not len(cluster):
        return []
    last_c, last_b = cluster[-1], best[-1]
    chosen: list[tuple[int, int]] = []
    for k in analysis.key_frequencies:
        members = np.nonzero(last_c == k)[0]
        if len(members) and len(chosen) < n:
            i = int(members[np.argmax(last_b[members])])
            chosen.append((i, int(k)))
    for i in np.argsort(-last_b, kind="stable"):
        if len(chosen) >= n:
            break
        if int(i) not in {c[0] for c in chosen}:
            chosen.append((int(i), int(last_c[i])))
    return chosen


def _grid_pattern(params: Mapping[str, Any], p: int) -> Any:
    """The '=' query's attention over the key positions, ``[ckpt, a, b, head, 3]``.

    On the (a, b) grid the key at position 0 depends on a only and the key at position 1 on b
    only, so the scores are per-token tables (as in :func:`circuits.engine.grid.grid_resid_mid`).
    """
    import math

    import torch

    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_Q, W_K = params["blocks.0.attn.W_Q"], params["blocks.0.attn.W_K"]
    b_Q, b_K = params["blocks.0.attn.b_Q"], params["blocks.0.attn.b_K"]
    scale = math.sqrt(W_Q.shape[-1])
    r0 = W_E[:, :p] + W_pos[:, None, 0]
    r1 = W_E[:, :p] + W_pos[:, None, 1]
    r2 = W_E[:, p] + W_pos[:, 2]
    q = torch.einsum("kd,khde->khe", r2, W_Q) + b_Q
    s0 = torch.einsum("khe,kthe->kth", q, torch.einsum("ktd,khde->kthe", r0, W_K) + b_K[:, None]) / scale
    s1 = torch.einsum("khe,kthe->kth", q, torch.einsum("ktd,khde->kthe", r1, W_K) + b_K[:, None]) / scale
    s2 = torch.einsum("khe,khe->kh", q, torch.einsum("kd,khde->khe", r2, W_K) + b_K) / scale
    scores = torch.stack(
        torch.broadcast_tensors(s0[:, :, None], s1[:, None, :], s2[:, None, None]), dim=-1
    )
    return torch.softmax(scores, dim=-1)


def grid_activations(
    params: Mapping[str, Any], p: int, neurons: Sequence[int], act_fn: str = "relu"
) -> tuple[Any, Any]:
    """MLP activations of a few ``neurons`` and the attention to a, over the (a, b) grid.

    ``params`` are stacked checkpoints (:func:`circuits.engine.grid.stack_state_dicts`).
    Returns ``(acts [ckpt, a, b, len(neurons)], attention [ckpt, a, b, head])``: equal to the
    hooked model's ``blocks.0.mlp.hook_post[:, -1, neurons]`` and
    ``blocks.0.attn.hook_pattern[:, :, -1, 0]`` (tested). Only the chosen neurons' columns of
    W_in are used, so every product is small: the attention output is projected onto them
    before it is summed over (a, b).
    """
    import torch
    import torch.nn.functional as F

    pattern = _grid_pattern(params, p)  # [k, a, b, h, 3]
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_V, W_O = params["blocks.0.attn.W_V"], params["blocks.0.attn.W_O"]
    b_V, b_O = params["blocks.0.attn.b_V"], params["blocks.0.attn.b_O"]
    idx = torch.tensor([int(n) for n in neurons], dtype=torch.long)
    W_in, b_in = params["blocks.0.mlp.W_in"][..., idx], params["blocks.0.mlp.b_in"][..., idx]
    OI = torch.einsum("khem,kmn->khen", W_O, W_in)  # W_O then W_in: [k, h, d_head, n]
    r0 = W_E[:, :p] + W_pos[:, None, 0]
    r1 = W_E[:, :p] + W_pos[:, None, 1]
    r2 = W_E[:, p] + W_pos[:, 2]
    v0 = torch.einsum("ktd,khde->kthe", r0, W_V) + b_V[:, None]
    v1 = torch.einsum("ktd,khde->kthe", r1, W_V) + b_V[:, None]
    v2 = torch.einsum("kd,khde->khe", r2, W_V) + b_V
    a0 = torch.einsum("kthe,khen->kthn", v0, OI)  # value of a, as seen by the neurons
    a1 = torch.einsum("kthe,khen->kthn", v1, OI)
    a2 = torch.einsum("khe,khen->khn", v2, OI)
    const = torch.einsum("kd,kdn->kn", r2 + b_O, W_in) + b_in  # residual of '=' itself
    pre = (
        torch.einsum("kabh,kahn->kabn", pattern[..., 0], a0)
        + torch.einsum("kabh,kbhn->kabn", pattern[..., 1], a1)
        + torch.einsum("kabh,khn->kabn", pattern[..., 2], a2)
        + const[:, None, None]
    )
    post = F.relu(pre) if act_fn == "relu" else F.gelu(pre)
    return post, pattern[..., 0]


def grid_frames(
    run: Run, epochs: Sequence[int], neurons: Sequence[int], batch_size: int = 16
) -> dict[str, Any]:
    """Neuron activations and attention over the (a, b) grid at ``epochs`` of ``run``.

    Returns ``epochs`` (those whose checkpoint loaded; a damaged one is skipped), ``acts``
    ``[frame, p, p, len(neurons)]`` and ``attention`` ``[frame, p, p, head]``
    (:func:`grid_activations`).
    """
    import torch

    from circuits.engine.grid import stack_state_dicts
    from circuits.errors import CheckpointError

    p, act_fn = run.config.task.p, run.config.model.act_fn
    keep: list[int] = []
    acts: list[np.ndarray] = []
    attn: list[np.ndarray] = []
    sds: list[Any] = []

    def flush() -> None:
        if sds:
            with torch.no_grad():
                post, pattern = grid_activations(stack_state_dicts(sds), p, neurons, act_fn)
            acts.append(post.float().numpy())
            attn.append(pattern.float().numpy())
            sds.clear()

    for epoch in epochs:
        try:
            sds.append(run.state_dict(int(epoch)))
        except CheckpointError:
            continue
        keep.append(int(epoch))
        if len(sds) == batch_size:
            flush()
    flush()
    n_heads = run.config.model.n_heads
    return {
        "epochs": keep,
        "acts": np.concatenate(acts) if acts else np.zeros((0, p, p, len(neurons)), np.float32),
        "attention": np.concatenate(attn) if attn else np.zeros((0, p, p, n_heads), np.float32),
    }


def _frame_budget(p: int, panels: int, max_frames: int) -> int:
    per_frame = p * p * max(panels, 1) * 4 / 3  # one byte a value, base64
    return max(2, min(max_frames, int(GRID_BUDGET // per_frame)))


def _frame_epochs(analysis: Analysis, max_frames: int) -> list[int]:
    epochs = [int(e) for e in np.asarray(analysis.arrays["epochs"])]
    phases = analysis.summary.get("phases") or {}
    marks = [v for v in phases.values() if v is not None]
    keep = [epochs.index(m) for m in marks if m in epochs]
    return [epochs[i] for i in plots.frame_indices(len(epochs), max_frames, keep)]


def run_figures(
    analysis: Analysis, grid: Mapping[str, Any] | None = None, max_frames: int = MAX_FRAMES,
    neurons: Sequence[tuple[int, int]] = (),
) -> dict[str, go.Figure]:
    """Every panel of the run dashboard, by name; per-checkpoint panels share their frames.

    ``grid`` is :func:`grid_frames`'s result (without it the activation and attention panels
    are left out); ``neurons`` the ``(neuron, frequency)`` pairs it was computed for.
    """
    m, a = analysis.measures, analysis.arrays
    phases = analysis.summary.get("phases")
    key = [int(k) for k in analysis.key_frequencies]
    figs: dict[str, go.Figure] = {
        "losses": plots.plot_losses(m, phases),
        "accuracies": plots.plot_accuracies(m, phases),
        "fourier_heatmap": plots.plot_fourier_heatmap(a["epochs"], a["embed_fourier_norms"], key),
        "gini": plots.plot_gini(m, phases),
        "weight_norms": plots.plot_weight_norms(m, phases),
        "key_share": plots.plot_key_share(m, phases),
    }
    main, rest = plots.circuit_quantities(m)
    if main or rest:
        figs["circuits"] = plots.plot_circuits(m, phases)
        if main and rest:
            figs["circuit_details"] = plots.plot_circuits(
                m, phases, rest, title="Memorising vs generalising circuit: the other measures"
            )
    epochs = [int(e) for e in np.asarray(a["epochs"])]
    if grid is not None and len(grid["epochs"]):
        shown = [int(e) for e in grid["epochs"]]
    else:
        shown = _frame_epochs(analysis, max_frames)
    idx = [epochs.index(e) for e in shown if e in epochs]
    figs["embed_fourier"] = plots.plot_fourier_norms(a["epochs"], a["embed_fourier_norms"], key, idx)
    figs["neuron_logit_fourier"] = plots.plot_fourier_norms(
        a["epochs"], a["neuron_logit_fourier_norms"], key, idx,
        title="Neuron-logit map W_L = W_out W_U in the Fourier basis", what="‖W_L‖",
    )
    p = int(np.asarray(a["embed_fourier_norms"]).shape[-1])
    figs["clusters"] = plots.plot_neuron_clusters(a["epochs"], a["neuron_cluster"], key, idx, n_freq=(p - 1) // 2)
    if grid is not None and len(grid["epochs"]):
        figs["neurons"] = plots.plot_neuron_activations(
            grid["epochs"], grid["acts"], [n for n, _ in neurons], [k for _, k in neurons]
        )
        figs["attention"] = plots.plot_attention_patterns(grid["epochs"], grid["attention"])
    return figs


# ---- HTML ---------------------------------------------------------------------------------------


@dataclass
class _Panel:
    key: str
    fig: go.Figure
    wide: bool = False
    height: int = 400


@dataclass
class _Section:
    title: str
    panels: list[_Panel]
    note: str = ""
    slider: list[int] = field(default_factory=list)  # frame epochs: this section has the slider


def _decode(spec: dict[str, Any]) -> np.ndarray:
    shape = [int(s) for s in str(spec.get("shape", "")).split(",") if s.strip()]
    arr = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(spec["dtype"]))
    return arr.reshape(shape) if shape else arr


def _quantise_traces(traces: list[dict[str, Any]], min_size: int) -> None:
    """Store big heatmap z arrays as uint8 levels of [lo, hi]; the page turns them back into floats."""
    for t in traces or []:
        z = t.get("z")
        if t.get("type") != "heatmap" or not isinstance(z, dict) or "bdata" not in z:
            continue
        values = _decode(z).astype(np.float32)
        if values.size < min_size or values.ndim != 2:
            continue
        finite = values[np.isfinite(values)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        step = (hi - lo) / 255 or 1.0
        q = np.clip(np.round((np.nan_to_num(values, nan=lo) - lo) / step), 0, 255).astype(np.uint8)
        t["z"] = {"qz": base64.b64encode(q.tobytes()).decode(), "shape": list(values.shape), "lo": lo, "step": step}


def _figure_json(fig: go.Figure, height: int, slider: bool, quantise_from: int = 1024) -> str:
    """The figure as compact JSON: float32 typed arrays, big heatmaps quantised, own slider dropped."""
    spec = fig.to_dict()
    layout = spec.setdefault("layout", {})
    layout["height"] = height
    layout.pop("width", None)
    layout["autosize"] = True
    if slider:
        layout["sliders"] = []
        layout["updatemenus"] = []
    _quantise_traces(spec.get("data", []), quantise_from)
    for frame in spec.get("frames", []) or []:
        _quantise_traces(frame.get("data", []), quantise_from)
    if not slider:
        spec.pop("frames", None)
    import plotly.io.json as pjson

    return pjson.to_json_plotly(spec)


_CSS = """
:root { --ink:#1d2329; --muted:#5b6670; --line:#e3e7eb; --bg:#f4f6f8; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.45 Inter, 'Helvetica Neue', Helvetica, Arial, sans-serif; }
header { padding: 18px 28px 10px; background:#fff; border-bottom:1px solid var(--line); }
h1 { font-size: 22px; margin: 0 0 6px; font-weight: 650; }
h1 small { font-weight: 400; color: var(--muted); font-size: 15px; margin-left: 8px; }
h2 { font-size: 17px; margin: 22px 4px 4px; font-weight: 620; }
.facts { display:flex; flex-wrap:wrap; gap:6px 8px; margin: 6px 0 4px; }
.fact { background:#f0f3f6; border:1px solid var(--line); border-radius: 6px; padding: 3px 9px;
  font-size: 13px; color:#333; }
.fact b { font-weight: 600; color: var(--ink); }
.sub { color: var(--muted); font-size: 13px; margin: 4px 0 0; }
main { padding: 0 20px 30px; }
.note { color: var(--muted); font-size: 13px; margin: 0 4px 10px; }
.grid { display:grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; }
.panel { background:#fff; border:1px solid var(--line); border-radius: 10px; padding: 4px 6px;
  min-width: 0; }
.panel.wide { grid-column: 1 / -1; }
.control { position: sticky; top: 0; z-index: 10; display:flex; align-items:center; gap: 14px;
  background: rgba(255,255,255,0.96); border:1px solid var(--line); border-radius: 10px;
  padding: 8px 14px; margin: 0 0 12px; box-shadow: 0 2px 6px rgba(0,0,0,0.06); }
.control input[type=range] { flex: 1; accent-color: var(--accent); }
.control button { font: inherit; border:1px solid var(--line); background:#fff; border-radius: 6px;
  padding: 3px 12px; cursor:pointer; min-width: 74px; }
.control .epoch { font-variant-numeric: tabular-nums; min-width: 150px; font-weight: 600; }
.control .frames { color: var(--muted); font-size: 12px; }
table.runs { border-collapse: collapse; background:#fff; border:1px solid var(--line); width:100%;
  font-size: 13px; }
table.runs th, table.runs td { padding: 5px 10px; border-bottom:1px solid var(--line); text-align:left; }
table.runs th { background:#f0f3f6; font-weight: 600; }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 24px; }
"""

_JS = r"""
(function () {
  window.dashboardStart = performance.now();  // plotly.js parsed; timings for tests and curious users
  // Panels are drawn one at a time, those on screen first; the rest follow in the background
  // (and at once when scrolled to), so the first screen is ready long before the last panel.
  const CONFIG = {responsive: true, displaylogo: false,
    modeBarButtonsToRemove: ['select2d', 'lasso2d', 'autoScale2d'],
    toImageButtonOptions: {format: 'png', scale: 2}};
  const ANIMATE = {mode: 'immediate', frame: {duration: 0, redraw: true}, transition: {duration: 0}};
  function bytes(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function dequantise(o) {  // 8-bit levels of [lo, lo + 255 step] back to float rows
    const q = bytes(o.qz), r = o.shape[0], c = o.shape[1], rows = new Array(r);
    for (let i = 0; i < r; i++) {
      const row = new Float32Array(c);
      for (let j = 0; j < c; j++) row[j] = o.lo + o.step * q[i * c + j];
      rows[i] = row;
    }
    return rows;
  }
  function prepare(traces) {
    for (const t of traces || []) if (t.z && t.z.qz !== undefined) t.z = dequantise(t.z);
  }
  const figs = JSON.parse(document.getElementById('figures').textContent);
  const parsed = new Promise(function (r) {  // the heavy figures come after this script
    if (document.readyState !== 'loading') r(); else document.addEventListener('DOMContentLoaded', r);
  });
  async function spec(f) {
    let el = document.getElementById('spec-' + f.id);
    if (!el) { await parsed; el = document.getElementById('spec-' + f.id); }
    const s = JSON.parse(el.textContent);
    prepare(s.data);
    for (const fr of s.frames || []) prepare(fr.data);
    return s;
  }
  const slider = document.getElementById('epoch-slider');
  const epochs = slider ? JSON.parse(slider.dataset.epochs) : [];
  let current = epochs.length - 1, shownIndex = current;
  function apply(f, i) {  // show frame i on one drawn panel
    if (f.frames) return Plotly.animate(f.id, [String(epochs[i])], ANIMATE);
    if (f.marker !== null) {
      const u = {};
      u['shapes[' + f.marker + '].x0'] = epochs[i]; u['shapes[' + f.marker + '].x1'] = epochs[i];
      return Plotly.relayout(f.id, u);
    }
    return Promise.resolve();
  }
  function draw(f) {
    if (!f.drawn) {
      f.drawn = spec(f).then(s => Plotly.newPlot(f.id, {data: s.data, layout: s.layout,
        frames: s.frames || [], config: CONFIG})).then(function () {
        f.at = epochs.length - 1;
        if (current !== f.at) { f.at = current; return apply(f, current); }
      });
    }
    return f.drawn;
  }
  let busy = false;
  function show(i) {
    current = i;
    document.getElementById('epoch-label').textContent = 'epoch ' + epochs[i].toLocaleString('en-US');
    if (busy) return;  // the newest position is applied when the running update ends
    busy = true;
    const calls = [];
    for (const f of figs) if (f.drawn && (f.frames || f.marker !== null)) {
      calls.push(f.drawn.then(function () { if (f.at !== i) { f.at = i; return apply(f, i); } }));
    }
    Promise.all(calls).catch(function () {}).then(function () {
      busy = false;
      if (current !== i) show(current);
    });
  }
  if (slider) {
    slider.addEventListener('input', () => show(+slider.value));
    const play = document.getElementById('play');
    let timer = null;
    play.addEventListener('click', function () {
      if (timer) { clearInterval(timer); timer = null; play.textContent = '▶ play'; return; }
      if (+slider.value >= +slider.max) slider.value = 0;
      play.textContent = '❚❚ pause';
      timer = setInterval(function () {
        if (+slider.value >= +slider.max) { clearInterval(timer); timer = null; play.textContent = '▶ play'; return; }
        slider.value = +slider.value + 1; show(+slider.value);
      }, 250);
    });
  }
  const byId = {};
  for (const f of figs) byId[f.id] = f;
  if ('IntersectionObserver' in window) {
    const seen = new IntersectionObserver(function (entries) {
      for (const e of entries) if (e.isIntersecting) draw(byId[e.target.id]);
    }, {rootMargin: '300px'});
    for (const f of figs) seen.observe(document.getElementById(f.id));
  }
  function onScreen(f) {
    const r = document.getElementById(f.id).getBoundingClientRect();
    return r.top < window.innerHeight && r.bottom > 0;
  }
  const pause = () => new Promise(r => setTimeout(r, 0));
  (async function () {
    for (const f of figs.filter(onScreen)) await draw(f);
    window.dashboardReady = performance.now();
    await parsed;
    for (const f of figs) { await draw(f); await pause(); }
    window.dashboardComplete = performance.now();
  })();
})();
"""


def _json_script(obj: Any) -> str:
    """JSON safe to embed in a <script> element."""
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return text.replace("</", "<\\/")


def _add_epoch_marker(fig: go.Figure, epoch: int) -> int:
    """A dashed vertical line at the slider's epoch on a curve panel; returns its shape index."""
    fig.add_shape(type="line", x0=epoch, x1=epoch, y0=0, y1=1, xref="x", yref="paper",
                  line={"color": "#333", "width": 1.2, "dash": "dash"}, layer="above")
    return len(fig.layout.shapes) - 1


_VERSION_RE = r"plotly\.js(?: \([a-z -]+\))? v(\d+\.\d+\.\d+)"


def plotly_js() -> str:
    """The plotly.js source to inline: the vendored cartesian bundle when it matches plotly.py.

    The cartesian bundle (1.5 MB) holds every trace type the dashboards use and parses about
    twice as fast as plotly.py's full 4.8 MB bundle; it is used only while its version equals
    that of the plotly.js inside the installed plotly.py, so the figure JSON always meets the
    library it was written for.
    """
    import re

    from plotly.offline import get_plotlyjs

    full = get_plotlyjs()
    vendored = Path(__file__).parent / "_vendor" / "plotly-cartesian.min.js"
    try:
        small = vendored.read_text(encoding="utf-8")
    except OSError:
        return full
    want = re.search(_VERSION_RE, full[:400])
    have = re.search(_VERSION_RE, small[:400])
    if want and have and want.group(1) == have.group(1):
        return small
    return full


def _render(title: str, subtitle: str, facts: list[str], sections: list[_Section], footer: str) -> str:
    """One HTML page: plotly.js inline, each figure as a JSON block, a small script to draw them.

    The drawing script sits between the light figures and the heavy per-checkpoint ones: the
    first screen is drawn while the browser is still reading the slider frames.
    """
    light: list[str] = []
    heavy: list[str] = []
    meta: list[dict[str, Any]] = []
    body: list[str] = []
    slider_epochs = next((x.slider for x in sections if x.slider), [])
    for s, section in enumerate(sections):
        body.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.note:
            body.append(f'<p class="note">{section.note}</p>')
        if section.slider:
            n = len(section.slider)
            body.append(
                '<div class="control"><button id="play" type="button">▶ play</button>'
                f'<input id="epoch-slider" type="range" min="0" max="{n - 1}" value="{n - 1}" step="1" '
                f"data-epochs='{json.dumps(section.slider)}' aria-label=\"epoch\">"
                f'<span class="epoch" id="epoch-label">epoch {section.slider[-1]:,}</span>'
                f'<span class="frames">{n} frames</span></div>'
            )
        body.append('<div class="grid">')
        for i, panel in enumerate(section.panels):
            div = f"fig-{s}-{i}-{panel.key}"
            cls = "panel wide" if panel.wide else "panel"
            body.append(f'<div class="{cls}"><div id="{div}" class="plot" data-panel="{panel.key}" '
                        f'data-slider="{int(bool(section.slider))}" style="height:{panel.height}px"></div></div>')
            marker = None
            if slider_epochs and not section.slider and panel.key in _CURVE_PANELS:
                marker = _add_epoch_marker(panel.fig, slider_epochs[-1])
            spec = _figure_json(panel.fig, panel.height, bool(section.slider))
            (heavy if section.slider else light).append(
                f'<script type="application/json" id="spec-{div}">{_json_script(spec)}</script>'
            )
            meta.append({"id": div, "frames": bool(section.slider), "marker": marker})
        body.append("</div></section>")
    fact_html = "".join(f'<span class="fact">{f}</span>' for f in facts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style>"
        f"<script>{plotly_js()}</script></head><body>"
        f"<header><h1>{title}<small>{subtitle}</small></h1><div class=\"facts\">{fact_html}</div></header>"
        f"<main>{''.join(body)}</main><footer>{footer}</footer>"
        f'{"".join(light)}<script type="application/json" id="figures">{_json_script(meta)}</script>'
        f"<script>{_JS}</script>{''.join(heavy)}</body></html>\n"
    )


_CURVE_PANELS = {"losses", "accuracies", "gini", "weight_norms", "key_share", "fourier_heatmap"}


def _write(path: Path, text: str) -> Path:
    from circuits.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


def _footer(extra: str = "") -> str:
    from circuits import __version__

    return (
        f"Made by circuits {__version__}. Measures: Nanda et al. (2023), “Progress measures for grokking "
        "via mechanistic interpretability”; definitions in docs/measures.md. Hover for values; "
        "drag to zoom, double-click to reset; the camera icon saves a panel as PNG. " + extra
    )


# ---- the run dashboard ----------------------------------------------------------------------------


def _read_config(run_path: str | Path | None) -> dict[str, Any] | None:
    if not run_path:
        return None
    try:
        data = json.loads((Path(run_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("config", data) if isinstance(data, dict) else None


def _fmt_epoch(e: int | None) -> str:
    return f"{e:,}" if e is not None else "not reached"


def _run_facts(analysis: Analysis, config: dict[str, Any] | None) -> list[str]:
    facts = []
    if config:
        t, mo, tr = config["task"], config["model"], config["train"]
        data = f"{t['train_size']} training pairs" if t.get("train_size") else f"{t['frac']:.0%} of pairs for training"
        facts += [
            f"<b>{OPS.get(t['op'], t['op'])} mod {t['p']}</b>",
            data,
            f"d_model {mo['d_model']} · {mo['n_heads']} heads · d_mlp {mo['d_mlp']} · {mo['act_fn']}",
            f"AdamW lr {tr['lr']:g} · weight decay {tr['weight_decay']:g}",
            f"seed {mo['seed']} · data seed {t['data_seed']}",
        ]
    s = analysis.summary
    facts.append(f"{s.get('n_checkpoints', len(analysis.measures))} checkpoints")
    key = ", ".join(str(k) for k in analysis.key_frequencies) or "none yet"
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
            f"epoch {final.get('epoch', 0):,}: train acc {final.get('train_acc', 0):.1%}, "
            f"test acc {final.get('test_acc', 0):.1%}, test loss {final.get('test_loss', 0):.2g}"
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
    if n_epochs == 0 or "embed_fourier_norms" not in analysis.arrays:
        # A run with no intact checkpoint yet: say so rather than draw empty axes.
        text = _render(
            f"circuits · {html.escape(name)}", "grokking dashboard", _run_facts(analysis, config),
            [_Section("No checkpoints analysed yet", [], "Run <code>circuits analyze</code> again once "
                      "the run has saved a checkpoint.")], _footer(),
        )
        return _write(out_path, text)
    neurons = choose_neurons(analysis, n_neurons)
    missing_grid = ""
    if grid is None and n_epochs and config is not None and neurons:
        from circuits.run import Run, load_run

        p = int(config["task"]["p"])
        frames = _frame_epochs(analysis, _frame_budget(p, len(neurons) + int(config["model"]["n_heads"]), max_frames))
        grid = grid_frames(run if isinstance(run, Run) else load_run(run_path), frames, [n for n, _ in neurons])
    elif grid is None:
        missing_grid = (" The neuron-activation and attention panels need the run's checkpoints, "
                        "which were not found; they are left out.")
    figs = run_figures(analysis, grid, max_frames, neurons)
    shown = [int(f.name) for f in figs["embed_fourier"].frames]
    curves = [
        _Panel("losses", figs["losses"]), _Panel("accuracies", figs["accuracies"]),
        _Panel("fourier_heatmap", figs["fourier_heatmap"]), _Panel("gini", figs["gini"]),
        _Panel("weight_norms", figs["weight_norms"]), _Panel("key_share", figs["key_share"]),
    ]
    for key in ("circuits", "circuit_details"):
        if key in figs:
            curves.append(_Panel(key, figs[key], wide=True, height=int(figs[key].layout.height)))
    frames_panels = [
        _Panel("embed_fourier", figs["embed_fourier"]),
        _Panel("neuron_logit_fourier", figs["neuron_logit_fourier"]),
    ]
    if "neurons" in figs:
        frames_panels.append(_Panel("neurons", figs["neurons"], wide=True, height=430))
        frames_panels.append(_Panel("attention", figs["attention"], wide=True, height=430))
    frames_panels.append(_Panel("clusters", figs["clusters"], wide=True, height=340))
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
        _Section("Over training", curves,
                 "Shaded: the phases of Nanda et al. (2023, §5.2), detected from the test loss and the "
                 "weight norm. Restricted loss keeps only the key frequencies' directions of the logits; "
                 "excluded loss removes them (§5.1)."),
        _Section("Through the checkpoints", frames_panels, note, slider=shown),
    ]
    text = _render(
        f"circuits · {html.escape(name)}", "grokking dashboard", _run_facts(analysis, config), sections,
        _footer(f"Analysis: {html.escape(str(analysis.path))}."),
    )
    return _write(out_path, text)


# ---- several runs -----------------------------------------------------------------------------


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            flat.update(values)
        else:
            flat[section] = values
    return flat


# Fields that say how a run was recorded, not what was trained: never worth a label.
_SCHEDULE = {"engine", "preset", "checkpoint_every", "checkpoint_early_every", "checkpoint_early_until", "log_every"}


def _labels(analyses: Sequence[Analysis]) -> list[str]:
    """Label runs by the config fields in which they differ (else by folder name)."""
    names = [Path(str(a.summary.get("run") or a.path)).name for a in analyses]
    configs = [_read_config(a.summary.get("run")) for a in analyses]
    if all(configs) and len(configs) > 1:
        flats = [_flatten(c) for c in configs]  # type: ignore[arg-type]
        keys = [k for k in flats[0] if k not in _SCHEDULE and len({repr(f.get(k)) for f in flats}) > 1]
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
                ", ".join(map(str, a.key_frequencies)) or "–",
                _fmt_epoch(ph.get("memorisation_end")), _fmt_epoch(ph.get("circuit_formation_end")),
                _fmt_epoch(ph.get("cleanup_end")), grok,
                f"{final.get('test_acc', float('nan')):.1%}" if final else "–",
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
        _Panel("test_loss", plots.plot_comparison(runs, ["test_loss", "train_loss"],
               "Loss: test (solid) and train (dashed), log scale", "loss (nats)", log_y=True)),
        _Panel("accuracy", plots.plot_comparison(runs, ["test_acc", "train_acc"],
               "Accuracy: test (solid) and train (dashed)", "accuracy", percent=True)),
        _Panel("restricted", plots.plot_comparison(runs, ["restricted_loss", "excluded_loss"],
               "Restricted (solid) and excluded (dashed) loss, log scale", "loss (nats)", log_y=True)),
        _Panel("weight_norm", plots.plot_comparison(runs, ["weight_norm_sq"],
               "Sum of squared weights, log scale", "Σ w²", log_y=True)),
        _Panel("gini", plots.plot_comparison(runs, ["gini_embed", "gini_neuron_logit"],
               "Gini of Fourier norms: W_E (solid), W_L (dashed)", "Gini")),
        _Panel("key_share", plots.plot_comparison(runs, ["key_logit_frac"],
               "Share of logit variance in the key frequencies", "share", percent=True)),
    ]
    # The circuit quantities every run has; norm and efficiency only, when there are such.
    common = set.intersection(*(set(plots.circuit_columns(m)) for m in runs.values())) if runs else set()
    main = {q for q in common if "norm" in q or "efficiency" in q}
    for suffix in sorted(main or common, key=lambda q: ("efficiency" not in q, q)):
        panels.append(_Panel(f"circuit_{suffix}", plots.plot_comparison(
            runs, [f"gen_{suffix}", f"mem_{suffix}"],
            f"{suffix.replace('_', ' ')}: generalising (solid), memorising (dashed)", suffix.replace("_", " "))))
    for panel in panels:
        panel.fig.update_layout(legend={"font": {"size": 11}})
    sections = [
        _Section("Runs", [], _runs_table(loaded, labels)),
        _Section("Curves", panels, "Each run keeps its colour on every panel. Hover to read all runs at one epoch."),
    ]
    text = _render("circuits · comparison", f"{len(loaded)} runs", [html.escape(x) for x in labels],
                   sections, _footer())
    return _write(Path(out), text)


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
    panels: list[_Panel] = []
    if efficiency is not None:
        panels.append(_Panel("efficiency", plots.plot_efficiency_vs_dataset_size(efficiency)))
    if ungrokking is not None:
        panels.append(_Panel("ungrokking", plots.plot_ungrokking(ungrokking, critical_size)))
    x, y = axes
    if sweep is not None:
        if "zone" in sweep:
            panels.append(_Panel("zones", plots.plot_zone_map(sweep, x, y)))
        cols = list(values) if values is not None else [
            c for c in sweep.columns
            if c not in (x, y, "seed", "zone") and pd.api.types.is_numeric_dtype(sweep[c])
        ]
        for c in cols:
            panels.append(_Panel(f"phase_{c}", plots.plot_phase_diagram(
                sweep, c, x, y, log_color=c.endswith("_epoch") and bool((sweep[c] > 0).all()))))
    if not panels:
        raise ValueError("write_experiment_dashboard needs at least one table")
    sections = [_Section("Results", panels,
                         "Efficiency and ungrokking after Varma et al. (2023); phase diagrams show the mean over seeds.")]
    text = _render(f"circuits · {html.escape(title)}", "experiment results", [], sections, _footer())
    return _write(Path(out), text)


def write_figure_page(
    out: str | Path, figures: go.Figure | Sequence[go.Figure], title: str = "circuits", note: str = ""
) -> Path:
    """One or more figures as one self-contained, offline HTML page (an experiment protocol's figure)."""
    figs = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figs:
        raise ValueError("write_figure_page needs at least one figure")
    panels = [_Panel(f"figure{i}", f, wide=True, height=480) for i, f in enumerate(figs)]
    text = _render(f"circuits · {html.escape(title)}", "experiment results", [],
                   [_Section("Results", panels, note)], _footer())
    return _write(Path(out), text)


def comparison_name(paths: Sequence[str | Path]) -> str:
    """A stable file name for a comparison of ``paths``: ``comparison-<hash>.html``."""
    digest = hashlib.sha256("\n".join(sorted(str(Path(p).resolve()) for p in paths)).encode()).hexdigest()
    return f"comparison-{digest[:8]}.html"
