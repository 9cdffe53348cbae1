"""Clauw et al.'s (2024) O-information over training in their own setting (issue 23).

Their claim (§5-6): in a fully connected network on (a + b) mod 97 with 40% of the pairs, the
synergy of the hidden layer's neuron groups peaks before the test accuracy rises when the run
groks (weight decay 2.0; 0.1 groks later through more phases), and runs that do not grok
(weight decay 10 and 50) show no such peak. Setting: ``--preset clauw`` (their FCN of 250 ReLU
units, full-batch AdamW lr 0.03, betas (0.9, 0.98)), weight decays ``--wds``, seeds s = 0..N-1
(model and data seed 100 s, their 0, 100, ..., 400), ``--epochs`` steps (theirs 4,000-6,000),
a checkpoint every 5 steps to 500 then every 20 (theirs: every 5). Each run is analysed with
O-information on every ``--every``-th checkpoint (10 Ward groups, fitted on the newest
checkpoint, as theirs).

Per run it records: the epoch of the synergy peak (the most negative O-information over the
analysed checkpoints) and its value, the epochs at which test accuracy first reaches 50% and 90%,
whether the peak comes first, the final test accuracy. Per weight decay: how many runs grok
(test >= 90% within the budget), how many peak before, and the peak's depth (mean and 95%
interval). Resumable: rerun the same command.

    python docs/make_clauw.py --seeds 5 --out checkpoints/clauw
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import circuits
from circuits.analysis import analyze
from circuits.config import preset
from circuits.stats import interval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--wds", type=float, nargs="*", default=[2.0, 10.0, 50.0, 0.1])
    ap.add_argument("--epochs", type=int, default=4000)
    ap.add_argument("--every", type=int, default=2, help="O-information on every k-th checkpoint")
    ap.add_argument("--out", type=Path, default=Path("checkpoints/clauw"))
    args = ap.parse_args()
    report: dict[str, dict] = {}
    for wd in args.wds:
        rows = []
        for s in range(args.seeds):
            cfg = preset("clauw").replace(weight_decay=wd, epochs=args.epochs, seed=100 * s, data_seed=100 * s)
            out = args.out / f"wd{wd:g}" / f"s{s}"
            run = circuits.train(cfg, out=out)
            a = analyze(run, out=args.out / "analyses" / f"wd{wd:g}-s{s}", measures=["losses", "norms", "oinfo"],
                        options={"oinfo.every": args.every})
            m = a.measures.dropna(subset=["oinfo_synergy"])
            i = int(np.argmin(m.oinfo_synergy.to_numpy()))
            peak_epoch, peak = int(m.epoch.iloc[i]), float(m.oinfo_synergy.iloc[i])
            # The random initialisation has synergy of its own: the peak that training makes is
            # the most negative value after epoch 0.
            trained = m[m.epoch > 0]
            j = int(np.argmin(trained.oinfo_synergy.to_numpy()))
            t_epoch, t_peak = int(trained.epoch.iloc[j]), float(trained.oinfo_synergy.iloc[j])
            t50, t90 = run.first_epoch("test_acc", 0.5), run.first_epoch("test_acc", 0.9)
            rows.append({"seed": s, "peak_epoch": peak_epoch, "peak_bits": peak,
                         "peak_size": int(m.oinfo_synergy_size.iloc[i]), "test50": t50, "test90": t90,
                         "train99": run.first_epoch("train_acc", 0.99),
                         "init_synergy": float(m.oinfo_synergy.iloc[0]) if m.epoch.iloc[0] == 0 else None,
                         "trained_peak_epoch": t_epoch, "trained_peak_bits": t_peak,
                         "trained_peak_before_test50": t50 is not None and t_epoch < t50,
                         "peak_before_test50": t50 is not None and peak_epoch < t50,
                         "final_test_acc": float(run.metrics.test_acc.iloc[-1]),
                         "max_redundancy": float(m.oinfo_redundancy.max())})
            print(f"wd {wd:g} seed {s}: {json.dumps(rows[-1])}", flush=True)
        grokked = [r for r in rows if r["test90"] is not None]
        report[f"{wd:g}"] = {
            "runs": len(rows), "grokked": len(grokked),
            "peak_before_test50": sum(r["peak_before_test50"] for r in rows),
            "trained_peak_before_test50": sum(r["trained_peak_before_test50"] for r in rows),
            "trained_peak_bits": interval([r["trained_peak_bits"] for r in rows]),
            "trained_peak_epoch": interval([r["trained_peak_epoch"] for r in rows]),
            "peak_bits": interval([r["peak_bits"] for r in rows]),
            "peak_epoch": interval([r["peak_epoch"] for r in rows]),
            "test90": interval([r["test90"] for r in grokked]) if grokked else None,
            "per_seed": rows,
        }
        print(f"wd {wd:g}: {json.dumps({k: v for k, v in report[f'{wd:g}'].items() if k != 'per_seed'})}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
