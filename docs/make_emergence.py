"""Huang et al.'s (2024, §5 and App. B) emergence measurement at reduced scale (issue 22).

Their setting: (a + b) mod 113 with 3,000 training sums, mixed with 3,000-6,000 memorisation
pairs (other inputs under their own operator token, random labels); models from 1 layer with
d_h 64 to 8 layers with d_h 1,024; 3 seeds, best test accuracy. Generalisation on addition
appears at about 1,570 times the size it needs alone, nearly independent of the amount of
memorisation data; a split FFN (one half per task) brings it down.

Reduced here, every change stated: p = ``--p`` (default 31), ``--train-size`` sums (default 600,
62% of the table: Huang et al.'s 23% at p = 113 scaled up because a smaller table needs a larger
fraction; a first pass at 400 sums (42%) left the widths 16 and 32 at chance alone after 3,000
epochs, so it had no baseline to delay), memorisation pairs ``--mem-sizes`` (default 0, 600,
900: none, 1x and 1.5x the sums; theirs are 1x and 2x, but p = 31 has only 961 memorisation
inputs), one layer at widths
``--widths`` (d_mlp = 4 d_model, 4 heads), lr 3e-3, weight decay 1, ``--epochs`` full-batch
epochs, reference engine. Both variants: one shared MLP, and the split MLP (their App. B); the
runs alone are the same network in both, so the split pass trains only the mixtures (its rows
are read against the shared pass's runs alone). Resumable.

    python docs/make_emergence.py --seeds 3 --out checkpoints/emergence-600 [--workers N] [--widths 128]
    # docs/reproductions.md, "Multi-task emergence", lists every pass run
    # their scale (a GPU): --p 113 --train-size 3000 --mem-sizes 0 3000 6000 --widths 64 128 256 512 1024
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circuits.config import preset
from circuits.experiments import emergence
from circuits.experiments.executors import LocalExecutor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=31)
    ap.add_argument("--train-size", type=int, default=600)
    ap.add_argument("--mem-sizes", type=int, nargs="*", default=[0, 600, 900])
    ap.add_argument("--widths", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/emergence"))
    ap.add_argument("--variants", nargs="*", choices=["shared", "split"], default=["shared", "split"])
    ap.add_argument("--workers", type=int, default=1, help="worker processes (each run is a stack of one)")
    args = ap.parse_args()
    # Reference-engine runs cannot stack: on a machine with cores to spare they train side by side.
    executor = LocalExecutor(workers=args.workers, threads=1) if args.workers > 1 else None
    base = preset("quick-v1").replace(
        p=args.p, train_size=args.train_size, d_model=32, n_heads=4, d_mlp=128, lr=3e-3, epochs=args.epochs,
        checkpoint_every=500, checkpoint_early_until=0, log_every=50, preset="emergence",
    )
    report = {}
    for name in args.variants:
        split = name == "split"
        # The runs alone are not split: the split pass would train the shared pass's again.
        mem = [m for m in args.mem_sizes if m] if split else args.mem_sizes
        res = emergence(args.out / name, widths=args.widths, mem_sizes=mem, base=base, seeds=args.seeds,
                        split_mlp=split, executor=executor)
        report[name] = res.summary
        for m, info in res.summary["by_mem_size"].items():
            cells = {w: (round(c["mean"], 3), None if c["ci95"] is None else round(c["ci95"], 3))
                     for w, c in info["best_test_acc_by_width"].items()}
            print(f"{name} mem {m}: emergence width {info['emergence_width']} "
                  f"({info['params_vs_alone']} x alone); best test acc by width {cells}", flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
