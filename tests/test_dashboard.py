"""The dashboards in a real browser: headless Chromium, network blocked, opened from file://.

Needs Debian's ``chromium`` (or ``CIRCUITS_CHROMIUM=/path/to/chrome``) and the ``playwright``
package, which drives that executable (no ``playwright install``). Without them the browser
tests skip on a developer machine and fail when ``CI`` is set (``.ci/run`` installs both).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import circuits
from circuits import plots
from circuits.analysis import MEASURE_COLUMNS, Analysis, default_analysis_dir
from circuits.report import report
from circuits.dashboard import (
    DASHBOARD_FILE,
    write_comparison_dashboard,
    write_experiment_dashboard,
    write_run_dashboard,
)
from tests.conftest import run_cli

MAX_BYTES = 15 * 10**6
RUN_PANELS = {
    "losses", "accuracies", "fourier_heatmap", "gini", "weight_norms", "key_share",
    "embed_fourier", "neuron_logit_fourier", "neurons", "attention", "clusters",
}
SLIDER_PANELS = {"embed_fourier", "neuron_logit_fourier", "neurons", "attention", "clusters"}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs Chromium)")
    pytest.skip(reason)


def _chromium() -> str | None:
    given = os.environ.get("CIRCUITS_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    exe = _chromium()
    if exe is None:
        _unavailable("no Chromium executable found (apt-get install chromium, or set CIRCUITS_CHROMIUM)")
    with sync_playwright() as pw:
        # --no-sandbox: containers and CI run as root, where Chromium's sandbox refuses to start.
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A dashboard opened offline at 1440x900, recording console errors and network attempts."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 900}, offline=True)
        self.errors: list[str] = []
        self.requests: list[str] = []

        def route(r: Any) -> None:
            if r.request.url.startswith(("file:", "data:", "blob:")):
                r.continue_()
            else:
                self.requests.append(r.request.url)
                r.abort()

        self.context.route("**/*", route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_function("window.dashboardComplete !== undefined", timeout=120_000)
        self.ready_ms = self.page.evaluate("window.dashboardReady")
        self.complete_ms = self.page.evaluate("window.dashboardComplete")

    def panels(self) -> dict[str, dict[str, int]]:
        """Per panel: SVG roots and drawn marks (line paths, bars, heatmap images), plotted traces."""
        return self.page.evaluate("""() => Object.fromEntries(
            Array.from(document.querySelectorAll('.plot')).map(d => [d.dataset.panel, {
              svg: d.querySelectorAll('svg.main-svg').length,
              lines: Array.from(d.querySelectorAll('.scatterlayer path.js-line'))
                .filter(p => (p.getAttribute('d') || '').length > 10).length,
              bars: d.querySelectorAll('.barlayer .point path').length,
              heatmaps: d.querySelectorAll('.heatmaplayer image').length,
              traces: (d.data || []).length,
            }]))""")

    def look(self, key: str) -> str:
        """What a panel shows: its title plus every drawn mark's geometry and image."""
        return self.page.evaluate("""(key) => {
            const d = document.querySelector(`.plot[data-panel="${key}"]`);
            const parts = [d.querySelector('.gtitle') ? d.querySelector('.gtitle').textContent : ''];
            d.querySelectorAll('.barlayer .point path').forEach(p => parts.push(p.getAttribute('d')));
            d.querySelectorAll('.heatmaplayer image').forEach(i => parts.push(i.getAttribute('href')));
            return parts.join('|');
        }""", key)

    def close(self) -> None:
        self.context.close()


def _with_circuits(expected: set[str], measures: pd.DataFrame) -> set[str]:
    """The run panels plus the circuit panels that the table's mem_*/gen_* columns call for."""
    main, rest = plots.circuit_quantities(measures)
    return expected | ({"circuits"} if main or rest else set()) | ({"circuit_details"} if main and rest else set())


def _assert_drawn(page: Page, expected: set[str]) -> None:
    panels = page.panels()
    assert set(panels) == expected
    for key, info in panels.items():
        assert info["svg"] >= 1 and info["traces"] >= 1, (key, info)
        assert info["lines"] + info["bars"] + info["heatmaps"] >= 1, (key, info)
    assert page.errors == [], page.errors
    assert page.requests == [], f"the page tried to reach the network: {page.requests}"


def _self_contained(path: Path) -> None:
    """No element loads anything from elsewhere (plotly.js is inline), and the size limit holds."""
    from html.parser import HTMLParser

    external: list[str] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            for name, value in attrs:
                if name in ("src", "href") and value and not value.startswith(("#", "data:")):
                    external.append(f"<{tag} {name}={value}>")

    Tags().feed(path.read_text())
    assert external == []
    assert path.stat().st_size < MAX_BYTES


@pytest.fixture(scope="module")
def run_dashboard(tiny_run: circuits.Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # report() writes the dashboard beside measures.csv.
    out = tmp_path_factory.mktemp("dash") / "tiny"
    result = report(tiny_run, out=out, key_freqs=[1, 3])
    path = result.path / DASHBOARD_FILE
    assert path.is_file() and (result.path / "measures.csv").is_file()
    return path


def test_run_dashboard_renders_offline_and_the_slider_moves_the_panels(browser: Any, run_dashboard: Path) -> None:
    from circuits.analysis import load_analysis

    _self_contained(run_dashboard)
    page = Page(browser, run_dashboard)
    try:
        _assert_drawn(page, _with_circuits(RUN_PANELS, load_analysis(run_dashboard.parent).measures))
        epochs = page.page.evaluate("JSON.parse(document.getElementById('epoch-slider').dataset.epochs)")
        assert page.page.inner_text("#epoch-label") == f"epoch {epochs[-1]:,}"
        before = {k: page.look(k) for k in SLIDER_PANELS}
        # Drag the slider to the start with the keyboard, as a user would.
        page.page.focus("#epoch-slider")
        page.page.keyboard.press("Home")
        # Wait for the page's state, never for a fixed time: every slider panel retitled.
        page.page.wait_for_function(
            """([keys, e]) => keys.every(k => {
                const t = document.querySelector(`.plot[data-panel="${k}"] .gtitle`);
                return t && t.textContent.includes(e); })""",
            arg=[sorted(SLIDER_PANELS), f"epoch {epochs[0]:,}"], timeout=20_000,
        )
        assert page.page.inner_text("#epoch-label") == f"epoch {epochs[0]:,}"
        for key in SLIDER_PANELS:
            assert f"epoch {epochs[0]:,}" in page.look(key), key
        changed = {k for k in SLIDER_PANELS if page.look(k) != before[k]}
        assert changed == SLIDER_PANELS
        # The dashed epoch marker on the curves follows the slider.
        x0 = page.page.evaluate("""() => {
            const d = document.querySelector('.plot[data-panel="losses"]');
            return d.layout.shapes[d.layout.shapes.length - 1].x0; }""")
        assert x0 == epochs[0]
        assert page.errors == []
    finally:
        page.close()


def _synthetic_analysis(root: Path, n: int = 500, p: int = 113, d_mlp: int = 512) -> tuple[Analysis, dict[str, Any]]:
    """A nanda-sized analysis (500 checkpoints, p = 113) of random numbers: the size worst case."""
    rng = np.random.default_rng(0)
    epochs = np.linspace(0, 50_000, n).astype(np.int64)
    decay = np.exp(-epochs / 10_000)
    data = {c: rng.uniform(0.01, 1, n) for c in MEASURE_COLUMNS}
    data.update(epoch=epochs, train_loss=1e-7 + decay, test_loss=1e-6 + 5 * decay, weight_norm_sq=500 * decay + 100)
    for circuit in ("mem", "gen"):  # the circuit panels, drawn whatever MEASURE_COLUMNS holds
        data.update({f"{circuit}_norm_sq": rng.uniform(1, 100, n), f"{circuit}_efficiency": rng.uniform(0, 3, n),
                     f"{circuit}_margin_test": rng.uniform(-5, 50, n)})
    for name in ("embed.W_E", "pos_embed.W_pos", "blocks.0.attn.W_Q", "blocks.0.mlp.W_in", "unembed.W_U"):
        data[f"norm_sq.{name}"] = rng.uniform(1, 100, n)
    arrays = {
        "epochs": torch.from_numpy(epochs),
        "embed_fourier_norms": torch.rand(n, p),
        "neuron_logit_fourier_norms": torch.rand(n, p),
        "neuron_cluster": torch.randint(-1, (p - 1) // 2 + 1, (n, d_mlp)),
        "neuron_best_frac": torch.rand(n, d_mlp),
        "neuron_key_frac": torch.rand(n, d_mlp),
    }
    summary = {
        "n_checkpoints": n, "key_frequencies": [14, 35, 41, 42, 52], "run": None,
        "phases": {"memorisation_end": int(epochs[14]), "circuit_formation_end": int(epochs[94]), "cleanup_end": int(epochs[140])},
        "final": {"epoch": int(epochs[-1]), "train_acc": 1.0, "test_acc": 1.0, "test_loss": 1e-6},
    }
    analysis = Analysis(root, pd.DataFrame(data), arrays, summary)
    shown = [int(epochs[i]) for i in plots.frame_indices(n, 50)]
    grid = {
        "epochs": shown,
        "acts": rng.uniform(0, 5, (len(shown), p, p, 4)).astype(np.float32),
        "attention": rng.uniform(0, 1, (len(shown), p, p, 4)).astype(np.float32),
    }
    return analysis, grid


def test_a_500_checkpoint_dashboard_is_small_and_fast(browser: Any, tmp_path: Path) -> None:
    analysis, grid = _synthetic_analysis(tmp_path)
    path = write_run_dashboard(analysis, out=tmp_path / "big.html", grid=grid)
    size = path.stat().st_size
    _self_contained(path)
    assert size < MAX_BYTES, f"{size / 1e6:.1f} MB"
    pages = []
    try:
        for _ in range(2):  # the faster of two loads: one slow start on a busy machine is no verdict
            pages.append(Page(browser, path))
        _assert_drawn(pages[0], _with_circuits(RUN_PANELS, analysis.measures))
        ready = min(pg.ready_ms for pg in pages)
        complete = min(pg.complete_ms for pg in pages)
        print(f"500-checkpoint dashboard: {size / 1e6:.1f} MB, first screen {ready:.0f} ms, all panels {complete:.0f} ms")
        assert ready < 3000, f"first screen drawn after {ready:.0f} ms"
        assert "50 of 500 checkpoints" in pages[0].page.inner_text("main")
    finally:
        for pg in pages:
            pg.close()


def test_comparison_and_experiment_pages_render(browser: Any, run_dashboard: Path, tmp_path: Path) -> None:
    from circuits.analysis import load_analysis

    one = load_analysis(run_dashboard.parent)
    other = Analysis(one.path, one.measures.assign(test_loss=one.measures.test_loss * 3), one.arrays, one.summary)
    comparison = write_comparison_dashboard([one, other], tmp_path / "cmp.html", labels=["seed 0", "seed 1"])
    sizes = [200, 400, 800, 1600]
    experiment = write_experiment_dashboard(
        tmp_path / "exp.html",
        efficiency=pd.DataFrame(
            [{"dataset_size": d, "circuit": c, "efficiency": 3000 / d if c == "mem" else 2.0} for d in sizes for c in ("mem", "gen")]
        ),
        ungrokking=pd.DataFrame({"dataset_size": sizes, "test_acc": [0.05, 0.3, 0.95, 1.0]}),
        sweep=pd.DataFrame([
            {"dataset_size": d, "weight_decay": wd, "zone": "grokking" if d * wd > 300 else "memorisation",
             "grok_epoch": 10_000 / (d * wd), "final_test_acc": min(1.0, d * wd / 500)}
            for d in sizes for wd in (0.3, 1.0, 3.0)
        ]),
        critical_size=700,
    )
    main, rest = plots.circuit_quantities(one.measures)
    circuit_panels = {f"circuit_{q}" for q in (main or rest)}
    for path, expected in (
        (comparison, {"test_loss", "accuracy", "restricted", "weight_norm", "gini", "key_share"} | circuit_panels),
        (experiment, {"efficiency", "ungrokking", "zones", "phase_grok_epoch", "phase_final_test_acc"}),
    ):
        _self_contained(path)
        page = Page(browser, path)
        try:
            _assert_drawn(page, expected)
        finally:
            page.close()
    with pytest.raises(ValueError, match="at least one"):
        write_experiment_dashboard(tmp_path / "empty.html")


def test_cli_dashboard(tiny_run: circuits.Run, run_dashboard: Path, tmp_path: Path) -> None:
    # An analysis folder, read as it is.
    result = run_cli("dashboard", str(run_dashboard.parent), "--out", str(tmp_path / "a.html"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.html").is_file() and "dashboard:" in result.stdout
    # A run folder: analysed first (into analyses/ under the working directory), then drawn.
    result = run_cli("dashboard", str(tiny_run.path.resolve()), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / default_analysis_dir(tiny_run) / DASHBOARD_FILE
    assert written.parent.name.startswith(f"{tiny_run.path.name}-")  # named for its run's path
    assert written.is_file() and (written.parent / "measures.csv").is_file()
    # Several: a comparison.
    result = run_cli("dashboard", str(tiny_run.path.resolve()), str(run_dashboard.parent), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "analyses").glob("comparison-*.html"))) == 1
    for args, needle in (
        (["dashboard", str(tmp_path / "missing")], "does not exist"),
        (["dashboard", str(tmp_path)], "neither a run folder"),
        (["dashboard"], "Missing argument"),
    ):
        bad = run_cli(*args)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("circuits: error:")


def test_without_checkpoints_the_page_says_what_is_missing(run_dashboard: Path, tmp_path: Path) -> None:
    from circuits.analysis import load_analysis

    one = load_analysis(run_dashboard.parent)
    no_run = Analysis(one.path, one.measures, one.arrays, {**one.summary, "run": None})
    text = write_run_dashboard(no_run, out=tmp_path / "no-run.html").read_text()
    assert "left out" in text and 'data-panel="neurons"' not in text and 'data-panel="clusters"' in text
    empty = Analysis(tmp_path, pd.DataFrame(columns=list(MEASURE_COLUMNS)),
                     {"epochs": torch.zeros(0, dtype=torch.int64)}, {"key_frequencies": [], "phases": None})
    text = write_run_dashboard(empty).read_text()
    assert "No checkpoints analysed yet" in text and 'class="plot"' not in text


def test_the_small_plotly_bundle_is_used_only_when_it_matches_plotly_py(monkeypatch: pytest.MonkeyPatch) -> None:
    import plotly.offline

    from circuits.dashboard import plotly_js

    vendored = (Path(circuits.__file__).parent / "_vendor" / "plotly-cartesian.min.js").read_text()
    version = vendored[:200].split(" v", 1)[1].split()[0]
    monkeypatch.setattr(plotly.offline, "get_plotlyjs", lambda: f"/**\n* plotly.js v{version}\n*/ full")
    assert plotly_js() == vendored
    monkeypatch.setattr(plotly.offline, "get_plotlyjs", lambda: "/**\n* plotly.js v9.9.9\n*/ full")
    assert plotly_js().endswith("full")


def test_browser_tests_fail_rather_than_skip_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        _unavailable("no browser")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _unavailable("no browser")

