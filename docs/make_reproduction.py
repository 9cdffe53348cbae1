"""Analyse a full `nanda` run and regenerate the figures and numbers of docs/reproductions.md.

    circuits train --preset nanda --out checkpoints/nanda          # ~40k epochs
    python docs/make_reproduction.py --run checkpoints/nanda

Writes docs/img/nanda-losses.png (train, test, restricted and excluded loss, phases shaded) and
docs/img/nanda-circuits.png (the two circuits' norms and efficiencies), rendered by the same
headless Chromium as the dashboard screenshots, and prints the table for the docs: key
frequencies, phase boundaries, and the curves' landmarks next to the paper's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import circuits
from circuits import plots

DOCS = Path(__file__).resolve().parent
PAPER = {"memorisation_end": 1400, "circuit_formation_end": 9400, "cleanup_end": 14000}


def render(fig, path: Path, width: int = 1100, height: int = 560) -> None:  # noqa: ANN001
    """PNG of one plotly figure, drawn offline by headless Chromium."""
    from playwright.sync_api import sync_playwright

    from make_screenshots import chromium  # this folder is on sys.path when run as a script

    fig.update_layout(width=width, height=height)
    with tempfile.TemporaryDirectory() as tmp:
        page_path = Path(tmp) / "fig.html"
        fig.write_html(page_path, include_plotlyjs=True, full_html=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": width, "height": height}, offline=True).new_page()
            page.goto(page_path.as_uri())
            page.wait_for_selector(".main-svg")
            page.wait_for_timeout(500)
            page.locator(".plotly-graph-div").screenshot(path=path)
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--analysis", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DOCS / "img")
    args = parser.parse_args()
    run = circuits.load_run(args.run)
    analysis = circuits.analyze(run, out=args.analysis)
    m, summary = analysis.measures, analysis.summary
    phases = summary.get("phases") or {}
    args.out.mkdir(parents=True, exist_ok=True)
    render(plots.plot_losses(m, phases), args.out / "nanda-losses.png")
    render(plots.plot_circuits(m, phases), args.out / "nanda-circuits.png")

    def at(epoch: int, col: str) -> float:
        return float(m.loc[(m.epoch - epoch).abs().idxmin(), col])

    first = lambda cond: int(m.epoch[cond].iloc[0]) if cond.any() else None  # noqa: E731
    report = {
        "checkpoints": len(m),
        "key_frequencies": analysis.key_frequencies,
        "phases": {k: phases.get(k) for k in PAPER},
        "paper_phases": PAPER,
        "train_acc_100": first(m.train_acc >= 1.0),
        "test_acc_99": first(m.test_acc >= 0.99),
        "test_loss_peak": {"epoch": int(m.epoch[m.test_loss.idxmax()]), "value": float(m.test_loss.max())},
        "excluded_loss_peak": {"epoch": int(m.epoch[m.excluded_loss.idxmax()]), "value": float(m.excluded_loss.max())},
        "restricted_below_0.1": first(m.restricted_loss < 0.1),
        "test_below_0.1": first(m.test_loss < 0.1),
        "weight_norm_sq": {e: at(e, "weight_norm_sq") for e in (0, 1400, 9400, 14000, int(m.epoch.iloc[-1]))},
        "final": {c: float(m[c].iloc[-1]) for c in ("train_loss", "test_loss", "gen_share", "gen_efficiency", "mem_efficiency")},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
