"""Wall time of the README's main job, `circuits train` then `circuits analyze`, for the `quick`
preset against the preset it replaced (docs/presets/quick-v1.json), in one benchmark run.

Each arm is the two CLI commands as a user types them, in fresh processes, into a fresh folder:
one warm-up run per arm (it compiles the kernels and fills the OS caches), then ``--repeats``
timed runs per arm, alternating arms so a drift of the machine hits both. Printed: each time,
each arm's median, and the ratio of the medians (science.md, Decisions: "60 s means train plus
analyse after one warm-up run, median of 3, beside the old preset timed in the same run").

    python benchmarks/quick_wall.py --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"quick": ["--preset", "quick"], "quick-v1": ["--config", str(ROOT / "docs" / "presets" / "quick-v1.json")]}


def once(arm: str, scratch: Path) -> tuple[float, float]:
    run, analysis = scratch / f"{arm}-run", scratch / f"{arm}-analysis"
    for folder in (run, analysis):
        shutil.rmtree(folder, ignore_errors=True)
    cli = [sys.executable, "-m", "circuits.cli"]
    t0 = time.perf_counter()
    subprocess.run([*cli, "train", *ARMS[arm], "--out", str(run)], check=True, capture_output=True)
    t1 = time.perf_counter()
    subprocess.run([*cli, "analyze", str(run), "--out", str(analysis)], check=True, capture_output=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="quick_wall-"))
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in args.arms}
    for arm in args.arms:
        train, analyse = once(arm, scratch)
        print(f"warm-up {arm}: train {train:.1f} s, analyse {analyse:.1f} s", flush=True)
    for i in range(args.repeats):
        for arm in args.arms:
            train, analyse = once(arm, scratch)
            times[arm].append((train, analyse))
            print(f"run {i + 1} {arm}: train {train:.1f} s + analyse {analyse:.1f} s = {train + analyse:.1f} s", flush=True)
    medians = {}
    for arm, ts in times.items():
        total = statistics.median(t + a for t, a in ts)
        medians[arm] = total
        print(f"{arm}: median train {statistics.median(t for t, _ in ts):.1f} s, analyse "
              f"{statistics.median(a for _, a in ts):.1f} s, total {total:.1f} s")
    if len(medians) == 2:
        a, b = args.arms
        print(f"ratio {a} / {b}: {medians[a] / medians[b]:.2f}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
