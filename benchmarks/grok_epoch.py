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
    parser.add_argument("--seeds", type=int, default=1,
                        help="model seeds per engine (seed s: model seed 999 + s); the comparison is of the means")
    args = parser.parse_args()
    results: dict[str, list[int | None]] = {}
    for engine in ("fused", "reference"):
        epochs = []
        for s in range(args.seeds):
            cfg = circuits.preset("quick").replace(engine=engine, seed=999 + s)
            t = time.perf_counter()
            run = circuits.train(cfg, out=args.out / f"{engine}-s{s}")
            wall = time.perf_counter() - t
            m = run.metrics
            fit, grok = first_epoch(m, "train_acc", 1.0), first_epoch(m, "test_acc", 0.99)
            epochs.append(grok)
            print(f"{engine:<10} seed {s}: train 100% at {fit}, test >= 99% at {grok}, {wall:.0f} s", flush=True)
        results[engine] = epochs
    f, r = results["fused"], results["reference"]
    if all(e is not None for e in f + r):
        mf, mr = sum(f) / len(f), sum(r) / len(r)
        per_seed = [abs(a - b) / b for a, b in zip(f, r)]
        print(f"mean grokking epoch: fused {mf:.0f}, reference {mr:.0f}: differ by {abs(mf - mr) / mr:.1%} "
              f"(target <= 5%); per seed {', '.join(f'{d:.1%}' for d in per_seed)}")
        spread = (max(r) - min(r)) / mr if len(r) > 1 else 0.0
        print(f"seed-to-seed spread of the reference engine: {spread:.1%} of its mean")


if __name__ == "__main__":
    main()
