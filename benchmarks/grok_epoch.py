"""Does the fused engine grok when the reference engine does? Train `quick-v1` on both and compare.

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
    parser.add_argument("--seeds", type=int, default=1,
                        help="model seeds per engine (seed s: model seed 999 + s); the comparison is of the means")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start at seed index s (model seed 999 + s), to extend an earlier comparison")
    parser.add_argument("--engines", nargs="+", choices=["fused", "reference"],
                        default=["fused", "reference"],
                        help="engines to train (a finished run already under --out is reused)")
    args = parser.parse_args()
    results: dict[str, list[int | None]] = {}
    for engine in args.engines:
        epochs = []
        for s in range(args.first_seed, args.first_seed + args.seeds):
            cfg = circuits.preset("quick-v1").replace(engine=engine, seed=999 + s)
            t = time.perf_counter()
            run = circuits.train(cfg, out=args.out / f"{engine}-s{s}")
            wall = time.perf_counter() - t
            m = run.metrics
            fit, grok = first_epoch(m, "train_acc", 1.0), first_epoch(m, "test_acc", 0.99)
            half = first_epoch(m, "test_acc", 0.5)
            epochs.append(grok)
            print(f"{engine:<10} seed {s}: train 100% at {fit}, test >= 50% at {half}, "
                  f">= 99% at {grok}; final test acc {m.test_acc.iloc[-1]:.3f}; {wall:.0f} s", flush=True)
        results[engine] = epochs
    if len(results) < 2:
        return
    f, r = results["fused"], results["reference"]
    both = [(a, b) for a, b in zip(f, r) if a is not None and b is not None]
    missed = len(f) - len(both)
    if missed:
        print(f"{missed} seed(s) did not reach 99% test accuracy on one engine within the schedule")
    if both:
        mf = sum(a for a, _ in both) / len(both)
        mr = sum(b for _, b in both) / len(both)
        print(f"mean grokking epoch over {len(both)} seed(s): fused {mf:.0f}, reference {mr:.0f}: "
              f"differ by {abs(mf - mr) / mr:.1%} (target <= 5%); per seed "
              + ", ".join(f"{abs(a - b) / b:.1%}" for a, b in both))
        rs = [b for _, b in both]
        if len(rs) > 1:
            print(f"seed-to-seed spread of the reference engine: {(max(rs) - min(rs)) / mr:.1%} of its mean")

if __name__ == "__main__":
    main()
