"""One self-contained HTML page from figures: plotly.js inline, figures as compact JSON, one
shared epoch slider, large heatmap frames quantised to 8-bit levels of their own range.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go


@dataclass
class Panel:
    """One figure on a page: ``key`` names it (``data-panel``), ``wide`` spans both columns."""

    key: str
    fig: go.Figure
    wide: bool = False
    height: int = 400
    marker: bool = False
    """A curve over epochs: a page with a slider draws its epoch on it as a dashed line."""


@dataclass
class Section:
    """A titled group of panels; a section with ``slider`` epochs drives its panels' frames."""

    title: str
    panels: list[Panel]
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
    vendored = Path(__file__).parent.parent / "_vendor" / "plotly-cartesian.min.js"
    try:
        small = vendored.read_text(encoding="utf-8")
    except OSError:
        return full
    want = re.search(_VERSION_RE, full[:400])
    have = re.search(_VERSION_RE, small[:400])
    if want and have and want.group(1) == have.group(1):
        return small
    return full


def render_page(title: str, subtitle: str, facts: list[str], sections: list[Section], footer: str) -> str:
    """One HTML page: plotly.js inline, each figure as a JSON block, a small script to draw them.

    ``title``, ``subtitle`` and section titles are plain text (escaped here); ``facts``, section
    notes and ``footer`` are HTML, so their callers escape every value they put in them.

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
            if slider_epochs and not section.slider and panel.marker:
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
        f"<header><h1>{html.escape(title)}<small>{html.escape(subtitle)}</small></h1><div class=\"facts\">{fact_html}</div></header>"
        f"<main>{''.join(body)}</main><footer>{footer}</footer>"
        f'{"".join(light)}<script type="application/json" id="figures">{_json_script(meta)}</script>'
        f"<script>{_JS}</script>{''.join(heavy)}</body></html>\n"
    )


def write_page(path: Path, text: str) -> Path:
    """Write a page atomically (a reader never sees half a dashboard); returns ``path``."""
    from circuits.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


def page_footer(extra: str = "") -> str:
    """The footer every page carries: version, the paper the measures come from, how to use the panels."""
    from circuits import __version__

    return (
        f"Made by circuits {__version__}. Measures: Nanda et al. (2023), “Progress measures for grokking "
        "via mechanistic interpretability”; definitions in docs/measures.md. Hover for values; "
        "drag to zoom, double-click to reset; the camera icon saves a panel as PNG. " + extra
    )
