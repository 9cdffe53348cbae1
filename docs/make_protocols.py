"""Run every protocol of issue 5 at reduced scale and record tables, figures and timings.

    python docs/make_protocols.py --out /root/runs/protocols
    python docs/make_protocols.py --p 59 --seeds 5 --out checkpoints/protocols-p59   # issue 20's rerun

Scale: p = 31 (961 pairs) by default, d_model 32, d_mlp 128, 4 heads, AdamW lr 3e-3, weight
decay 1, betas (0.9, 0.98), full batch; fits this 2-core machine in well under an hour. With
``--p``, every training-set size is scaled by the number of pairs (p^2 / 961), so the same
fractions of the table are tried; ``--seeds`` sets the seeds of every protocol (issue 20 asks
for at least 5). Every run folder is resumable: rerun the same command after a stop. The same
protocols at full size are the CLI commands printed in docs/reproductions.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from circuits.config import preset
from circuits.experiments import (
    critical_dataset_size,
    memorisation_capacity,
    reference_circuits,
    semi_grokking,
    ungrokking,
    zones,
)


def base_config(epochs: int = 3000, p: int = 31):
    return preset("quick-v1").replace(
        p=p, d_model=32, n_heads=4, d_mlp=128, lr=3e-3, epochs=epochs, checkpoint_every=250,
        checkpoint_early_every=50, checkpoint_early_until=500, log_every=50, preset="protocols",
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("checkpoints/protocols"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--semi-sizes", type=int, nargs="*", default=[350, 420, 500],
                    help="semi-grokking sizes: between D_crit and the smallest D that groks in 3k epochs")
    ap.add_argument("--dcrit-sizes", type=int, nargs="*", default=[60, 100, 160, 250, 400, 640, 800, 900],
                    help="D_crit sizes at p = 31 (scaled); 800 and 900 were added after the first pass at "
                         "p = 59, where generalisation-only networks met Varma's criterion at two sizes only")
    ap.add_argument("--p", type=int, default=31, help="modulus (sizes scale with p^2 / 961)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per protocol (default: 2-3 as at p = 31)")
    args = ap.parse_args()
    scale = args.p**2 / 961

    def sizes(values: list[int]) -> list[int]:
        return sorted({max(2, round(v * scale)) for v in values})

    def seeds(default: int) -> int:
        return args.seeds if args.seeds is not None else default

    times: dict[str, float] = {}
    timing_file = args.out / "timings.json"
    if timing_file.exists():
        times = json.loads(timing_file.read_text())

    def step(name, func):
        if args.only and name not in args.only:
            return None
        t = time.perf_counter()
        result = func()
        # A resumed protocol adds this invocation's time to what the earlier ones spent (a rerun
        # of a finished protocol adds the seconds it takes to find every run complete).
        # Re-read the file: another invocation (a protocol extended beside a running one) may
        # have recorded its own steps meanwhile.
        if timing_file.exists():
            times.update({k: v for k, v in json.loads(timing_file.read_text()).items() if k != name})
        times[name] = round(times.get(name, 0.0) + time.perf_counter() - t, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(times, indent=2))
        print(name, times[name], "s", json.dumps(result.summary, default=str)[:2000], flush=True)
        return result

    base = base_config(p=args.p)
    step("reference", lambda: reference_circuits(args.out / "reference", base=base, mem_size=sizes([300])[0],
                                                  seeds=seeds(2)))
    dc = step("dcrit", lambda: critical_dataset_size(
        args.out / "dcrit", sizes=sizes(args.dcrit_sizes), base=base, seeds=seeds(3)))
    d_crit = (dc.summary["d_crit_mean"] if dc and dc.summary["d_crit_mean"] else 250 * scale)
    step("ungrok", lambda: ungrokking(
        args.out / "ungrok", sizes=sizes([40, 63, 100, 160, 250, 400, 640]), base=base, parent_frac=0.9,
        seeds=seeds(3), critical_size=d_crit))
    semi = sizes(args.semi_sizes)
    step("semigrok", lambda: semi_grokking(args.out / "semigrok", sizes=semi, base=base_config(20000, args.p),
                                           seeds=seeds(2)))
    cap = step("capacity", lambda: memorisation_capacity(args.out / "capacity", widths=[4, 8, 12, 16, 24, 32],
                                                         base=base, seeds=seeds(2)))
    # The measured capacities tell Huang's capacity-bound progression from Liu's comprehension.
    step("zones", lambda: zones(args.out / "zones", widths=[8, 16, 32], sizes=sizes([100, 200, 300, 450, 650, 860]),
                                base=base, seeds=seeds(1), capacity=cap.summary["capacity_by_width"] if cap else None))
    write_page(args.out, args.p)


def write_page(out: Path, p: int = 31) -> None:
    """One experiment page over the protocols' tables (circuits.dashboard.write_experiment_dashboard)."""
    import pandas as pd

    from circuits.dashboard import write_experiment_dashboard

    def table(rel: str) -> pd.DataFrame | None:
        path = out / rel
        return pd.read_csv(path) if path.exists() else None

    dcrit, ungrok, zone_table = table("dcrit/critical_dataset_size.csv"), table("ungrok/ungrokking.csv"), table("zones/zones.csv")
    if dcrit is not None:
        dcrit = dcrit[(dcrit.circuit == "mem") | dcrit.gen_only]
    summary = out / "ungrok" / "ungrokking.json"
    critical = None
    if (out / "dcrit" / "critical_dataset_size.json").exists():
        critical = json.loads((out / "dcrit" / "critical_dataset_size.json").read_text())["d_crit_mean"]
    sweep = zone_table[["dataset_size", "d_model", "zone", "test_acc", "weight_norm"]] if zone_table is not None else None
    page = write_experiment_dashboard(out / "experiments.html", efficiency=dcrit, ungrokking=ungrok, sweep=sweep,
                                      axes=("dataset_size", "d_model"), critical_size=critical,
                                      title=f"Protocols at p = {p}")
    print("page", page, summary.exists())


if __name__ == "__main__":
    main()
