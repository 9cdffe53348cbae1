"""Does the fused engine grok when the reference engine does? Train `quick` on both and compare.

The engines compute the same function (parity tests), so float32 rounding is the only
difference; over thousands of epochs it must not move the grokking epoch by more than 5%
(issue 7). Prints, per engine, the first epoch with train accuracy 100% and with test accuracy
>= 99%, the wall time, and the relative difference.

    python benchmarks/grok_epoch.py                  # both engines, runs under /tmp
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import circuits


def first_epoch(metrics, column: str, level: float) -> int | None:  # noqa: ANN001
    hit = metrics.epoch[metrics[column] >= level]
    return int(hit.iloc[0]) if len(hit) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "circuits-grok-epoch")
    args = parser.parse_args()
    results = {}
    for engine in ("fused", "reference"):
        cfg = circuits.preset("quick").replace(engine=engine)
        t = time.perf_counter()
        run = circuits.train(cfg, out=args.out / engine)
        wall = time.perf_counter() - t
        m = run.metrics
        results[engine] = (first_epoch(m, "train_acc", 1.0), first_epoch(m, "test_acc", 0.99), wall)
        print(f"{engine:<10} train 100% at {results[engine][0]}, test >= 99% at "
              f"{results[engine][1]}, {wall:.0f} s")
    f, r = results["fused"][1], results["reference"][1]
    if f is not None and r is not None:
        print(f"grokking epoch differs by {abs(f - r) / r:.1%} (target <= 5%)")


if __name__ == "__main__":
    main()
