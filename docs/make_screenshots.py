"""Regenerate the dashboard screenshots in docs/img/ from a real `quick`-preset run.

    python docs/make_screenshots.py                      # trains a quick run in /tmp first if needed (~5 min)
    python docs/make_screenshots.py --run checkpoints/quick-9b4c2266

Trains (or resumes) the run, analyses it (which writes its dashboard.html), opens the dashboard
in headless Chromium (Debian's `chromium`, driven by Playwright, network blocked) at 1440x900,
and saves:

* docs/img/dashboard-curves.png       the top of the page: losses with phases, accuracy, ...
* docs/img/dashboard-checkpoints.png  the epoch-slider panels at the last checkpoint
* docs/img/dashboard-formation.png    the same panels with the slider at the end of circuit formation
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import circuits
from circuits.run import default_run_dir

DOCS = Path(__file__).resolve().parent
VIEWPORT = {"width": 1440, "height": 900}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get install chromium")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_run = default_run_dir(circuits.preset("quick"), root=Path(tempfile.gettempdir()) / "circuits-shots")
    parser.add_argument("--run", type=Path, default=default_run, help=f"quick-preset run folder ({default_run})")
    parser.add_argument("--analysis", type=Path, default=None, help="analysis folder (default: RUN + '_analysis')")
    parser.add_argument("--out", type=Path, default=DOCS / "img", help="where the PNGs go")
    args = parser.parse_args()

    run = circuits.train(circuits.preset("quick"), out=args.run)  # resumes; a finished run returns at once
    analysis = circuits.analyze(run, out=args.analysis or args.run.with_name(args.run.name + "_analysis"))
    # The library's analyze writes the tables; the page is the dashboard's (the CLI writes both).
    from circuits.dashboard import write_run_dashboard

    page_path = Path(write_run_dashboard(analysis, out=analysis.path / "dashboard.html", run=run))
    print(f"dashboard: {page_path} ({page_path.stat().st_size / 1e6:.1f} MB)")

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        context = browser.new_context(viewport=VIEWPORT, offline=True)
        page = context.new_page()
        page.goto(page_path.resolve().as_uri())
        page.wait_for_function("window.dashboardComplete !== undefined", timeout=120_000)
        print(f"first screen drawn after {page.evaluate('window.dashboardReady'):.0f} ms, "
              f"all panels after {page.evaluate('window.dashboardComplete'):.0f} ms")
        page.screenshot(path=args.out / "dashboard-curves.png")

        page.evaluate("document.querySelectorAll('section')[1].scrollIntoView()")
        page.wait_for_timeout(500)
        page.screenshot(path=args.out / "dashboard-checkpoints.png")

        # The slider at the end of circuit formation: the Fourier structure is there, the test
        # loss has not yet fallen (Nanda et al. 2023, §5.2).
        formation = (analysis.summary.get("phases") or {}).get("circuit_formation_end")
        epochs = page.evaluate("JSON.parse(document.getElementById('epoch-slider').dataset.epochs)")
        target = formation if formation in epochs else epochs[len(epochs) // 2]
        page.evaluate(
            "(i) => { const s = document.getElementById('epoch-slider'); s.value = i;"
            " s.dispatchEvent(new Event('input')); }", epochs.index(target),
        )
        page.wait_for_function(
            "(e) => document.querySelector('.plot[data-panel=\"clusters\"] .gtitle').textContent.includes(e)",
            arg=f"epoch {target:,}",
        )
        page.wait_for_timeout(800)
        page.screenshot(path=args.out / "dashboard-formation.png")
        browser.close()
    for name in ("dashboard-curves.png", "dashboard-checkpoints.png", "dashboard-formation.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
