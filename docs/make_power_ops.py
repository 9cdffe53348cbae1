"""Which of Power et al.'s (2022) operations generalise at one training fraction (issue 22).

Power et al. ("Grokking: Generalization Beyond Overfitting on Small Algorithmic Datasets",
Fig. 1 and their appendix) train a 2-layer transformer on binary-operation tables over Z_97
and S5 and find that the operations differ: x+y, x-y, x/y, x²+y² and S5's x·y generalise at
about half the table as training data, while x³+xy²+y does not at any fraction they tried.

Reduced version, every change from their setup stated: p = 59 (their 97), the `quick` preset's
1-layer model (d_model 128, 4 heads, d_mlp 512, ReLU, no LayerNorm; theirs: 2 layers with
LayerNorm and dropout 0), full-batch AdamW lr 1e-3, weight decay 1, betas (0.9, 0.98), no
warm-up (theirs: minibatch 512, 10 warm-up steps, 10^5 steps), ``--frac`` of each table as
training data (default 0.5), ``--epochs`` per run. S5 has its own 120-element table at the same
fraction. Each operation trains over seeds s = 0..N-1 (model seed 999 + s, data seed 598 + s);
the members that share a table size train as one stack. Printed and written to
``--out/report.json`` per operation: seeds whose test accuracy reaches 99% within the budget,
the epoch it does (mean and Student-t 95% interval over those seeds), and the final test
accuracy (mean and interval over all seeds). Resumable: rerun the same command after a stop.

    python docs/make_power_ops.py --seeds 3 --out checkpoints/power-ops
    # their scale (a GPU): --p 97 --epochs 100000 (their model: --n-layers 2 --normalization LN
    # --engine reference --batch-size 512 --warmup-steps 10)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import circuits
from circuits.config import S5_OPS, preset
from circuits.stats import interval

#: Power et al.'s names for the operations run here.
NAMES = {"add": "x+y", "sub": "x-y", "div": "x/y", "x2_y2": "x²+y²", "x3_xy2_y": "x³+xy²+y", "s5": "x·y (S5)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", nargs="*", default=list(NAMES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--frac", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=6000)
    ap.add_argument("--level", type=float, default=0.99)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/power-ops"))
    args = ap.parse_args()
    base = preset("quick").replace(
        p=args.p, frac=args.frac, weight_decay=1.0, epochs=args.epochs, checkpoint_every=500,
        checkpoint_early_every=50, checkpoint_early_until=500, log_every=50, preset="power-ops",
    )
    groups = [[op for op in args.ops if op not in S5_OPS], [op for op in args.ops if op in S5_OPS]]
    report: dict[str, dict] = {}
    for ops in (g for g in groups if g):
        members = [(op, s) for op in ops for s in range(args.seeds)]
        configs = [base.replace(op=op, seed=999 + s, data_seed=598 + s) for op, s in members]
        outs = [args.out / op / f"s{s}" for op, s in members]
        runs = circuits.train_ensemble(configs, outs, device=args.device)
        for op in ops:
            mine = [r for (o, _), r in zip(members, runs) if o == op]
            hits = [e for e in (r.first_epoch("test_acc", args.level) for r in mine) if e is not None]
            finals = [float(r.metrics.test_acc.iloc[-1]) for r in mine]
            t, f = interval(hits), interval(finals)
            report[op] = {
                "name": NAMES.get(op, op), "seeds": len(mine), "generalised": len(hits),
                "epoch_mean": t["mean"], "epoch_ci95": t["ci95"], "epochs_per_seed": [r.first_epoch("test_acc", args.level) for r in mine],
                "final_test_acc_mean": f["mean"], "final_test_acc_ci95": f["ci95"], "final_test_acc": finals,
                "n_train": mine[0].config.task.n_train,
            }
            print(op, json.dumps(report[op], ensure_ascii=False), flush=True)
    summary = {"p": args.p, "frac": args.frac, "epochs": args.epochs, "level": args.level, "ops": report}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
