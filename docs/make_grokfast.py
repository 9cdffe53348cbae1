"""Grokfast against an honest baseline on the `quick` preset (issue 22's reproduction).

Arms, each over the same seeds s = 0..N-1 (model seed 999 + s, data seed 598 + s):

* ``adamw lr=X`` for every X of ``--lrs`` (AdamW, the preset's weight decay): the baseline, and
  its learning rate tuned over the same epoch budget (Grokfast's gain lambda changes the
  effective learning rate, lucidrains/grokfast-pytorch#1, so the fair comparison is against the
  best-tuned AdamW, not the default one);
* ``grokfast ema`` (alpha 0.98, lambda 2) and ``grokfast ma`` (window 100, lambda 5) at the
  preset's learning rate: science.md's defaults.

The members of one arm train as one stack (the fused engine). Per arm it prints how many seeds
reach 95% test accuracy within the budget, the mean epoch with its Student-t 95% interval over
those, and the median with the others counted as "> budget"; then Grokfast's speed-up against
the default AdamW and against the tuned one (the arm with the lowest median). Every run folder
is resumable: rerun the same command after a stop. The same comparison at full size is the
same script with ``--preset nanda`` on a GPU.

    python docs/make_grokfast.py --seeds 5 --out checkpoints/grokfast
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import circuits
from circuits.config import preset
from circuits.stats import mean_ci


def epochs_to(run: circuits.Run, level: float) -> int | None:
    m = run.metrics
    hit = m.epoch[m.test_acc >= level]
    return int(hit.iloc[0]) if len(hit) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--lrs", type=float, nargs="*", default=[5e-4, 1e-3, 2e-3, 3e-3])
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/grokfast"))
    args = ap.parse_args()
    base = preset(args.preset)
    arms = {f"adamw lr={lr:g}": {"lr": lr} for lr in args.lrs}
    arms["grokfast ema"] = {"grokfast": "ema"}
    arms["grokfast ma"] = {"grokfast": "ma"}
    budget = base.train.epochs
    report: dict[str, dict] = {}
    for name, knobs in arms.items():
        configs = [base.replace(seed=999 + s, data_seed=598 + s, **knobs) for s in range(args.seeds)]
        folder = args.out / name.replace(" ", "_").replace("=", "")
        runs = circuits.train_ensemble(configs, [folder / f"s{s}" for s in range(args.seeds)], device=args.device)
        reached = [epochs_to(r, args.level) for r in runs]
        hits = [e for e in reached if e is not None]
        mean, ci, _ = mean_ci(hits)
        # The median with the runs that missed counted as beyond the budget.
        median = statistics.median([e if e is not None else budget + 1 for e in reached])
        report[name] = {"knobs": knobs, "reached": len(hits), "of": len(reached), "epochs": reached,
                        "mean": mean, "ci95": ci, "median": median}
        print(f"{name:16} reached {len(hits)}/{len(reached)}  mean {mean:.0f} ± {ci:.0f}  median "
              f"{'> budget' if median > budget else f'{median:.0f}'}  {reached}", flush=True)
    default = report[f"adamw lr={base.train.lr:g}"]["median"] if f"adamw lr={base.train.lr:g}" in report else None
    tuned_name = min((k for k in report if k.startswith("adamw")), key=lambda k: report[k]["median"])
    tuned = report[tuned_name]["median"]
    for name in ("grokfast ema", "grokfast ma"):
        med = report[name]["median"]
        vs_default = f"{default / med:.2f}x" if default else "n/a"
        print(f"{name}: median speed-up {vs_default} against the default AdamW, {tuned / med:.2f}x against "
              f"the tuned one ({tuned_name})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grokfast.json").write_text(json.dumps({"level": args.level, "budget": budget, "seeds": args.seeds,
                                                         "tuned": tuned_name, "arms": report}, indent=2))


if __name__ == "__main__":
    main()
