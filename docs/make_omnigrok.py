"""Omnigrok on modular addition (Liu et al. 2022b, "Omnigrok: Grokking Beyond Algorithmic Data").

Their account: grokking is the slow walk of the weight norm from a large initialisation down to
the "Goldilocks zone" where generalising solutions live; so the delay grows with the
initialisation scale alpha, and training at a fixed, small enough norm (projecting the weights
back to it after every update, no weight decay) removes it: train and test accuracy rise
together.

Arms (each over seeds s = 0..N-1, model seed 999 + s and data seed 598 + s; all of them one
stacked ensemble, the fused engine; the `quick` preset's model, data and schedule):

* ``alpha=A`` for each A of ``--alphas``: the initial weights times A, the preset's AdamW and
  weight decay;
* ``constrained alpha=A`` for each A of ``--constrained``: the same initialisation, weight decay
  0, the weights held at their initial total norm after every update.

Per arm it prints the epochs at which train accuracy reaches 99% and test accuracy 95% (mean and
Student-t 95% interval over the seeds that reach them, with the count), the delay test - train
and the final test accuracy. Resumable: rerun the same command after a stop.

    python docs/make_omnigrok.py --seeds 5 --out checkpoints/omnigrok
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import circuits
from circuits.config import preset
from circuits.stats import interval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.5, 1.0, 2.0, 3.0])
    ap.add_argument("--constrained", type=float, nargs="*", default=[0.5, 1.0])
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/omnigrok"))
    args = ap.parse_args()
    base = preset(args.preset)
    if args.epochs is not None:
        base = base.replace(epochs=args.epochs)
    arms = {f"alpha={a:g}": {"init_scale": a} for a in args.alphas}
    arms.update({f"constrained alpha={a:g}": {"init_scale": a, "constrain_norm": True, "weight_decay": 0.0}
                 for a in args.constrained})
    members = [(name, s) for name in arms for s in range(args.seeds)]
    configs = [base.replace(seed=999 + s, data_seed=598 + s, **arms[name]) for name, s in members]
    outs = [args.out / name.replace(" ", "_").replace("=", "") / f"s{s}" for name, s in members]
    runs = circuits.train_ensemble(configs, outs, device=args.device)
    report = {}
    for name in arms:
        mine = [r for (n, _), r in zip(members, runs) if n == name]
        train = [r.first_epoch("train_acc", 0.99) for r in mine]
        test = [r.first_epoch("test_acc", 0.95) for r in mine]
        delays = [b - a for a, b in zip(train, test) if a is not None and b is not None]
        report[name] = {
            "train99": interval([e for e in train if e is not None]),
            "test95": interval([e for e in test if e is not None]),
            "delay": interval(delays),
            "final_test_acc": interval([float(r.metrics.test_acc.iloc[-1]) for r in mine]),
            "per_seed": {"train99": train, "test95": test},
        }
        print(name, json.dumps(report[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
