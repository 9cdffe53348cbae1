"""The Ray executor's overhead per member against the local one, on the same sweep.

A sweep of ``--members`` small runs (p = 31, d_model 32, d_mlp 128: design.md's CI science
size, ``--epochs`` each) split into ``--stacks`` stacks by model width, trained three ways into
fresh folders, each timed from the call to its return:

* ``local``: ``--workers`` spawned worker processes, ``--threads`` torch threads per stack;
* ``ray``: one Ray task per stack on a local Ray started for the sweep (same threads), its
  start and shutdown included (what a user of ``--backend ray`` without a cluster pays);
* ``ray (warm)``: the same on a Ray instance already running (what a cluster user pays).

It prints each wall time, the overhead per member against ``local`` and the ratio, and checks
that the three index tables are the same bytes.

    python benchmarks/sweep.py --members 16 --stacks 4 --epochs 300
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import circuits
from circuits.config import preset


def _folder(name: str) -> str:
    return name.replace(" (", "-").rstrip(")")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--stacks", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base = preset("quick").replace(p=31, d_model=32, n_heads=4, d_mlp=128, lr=3e-3, epochs=args.epochs,
                                   checkpoint_every=50, preset="bench")
    per = args.members // args.stacks
    grid = {"d_mlp": [128 + 16 * i for i in range(args.stacks)], "weight_decay": [0.3 + 0.1 * j for j in range(per)]}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (("local", {"backend": "local", "workers": args.workers}),
                         ("ray", {"backend": "ray"}), ("ray (warm)", {"backend": "ray"})):
            if name == "ray (warm)":
                import ray

                ray.init(num_cpus=args.workers * args.threads, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
                ray.get(ray.remote(lambda: None).remote())  # a worker up before the clock starts
            t = time.perf_counter()
            circuits.sweep(Path(tmp) / _folder(name), grid, base=base, threads=args.threads, **kw)
            times[name] = time.perf_counter() - t
            if name == "ray (warm)":
                ray.shutdown()
        indexes = {n: (Path(tmp) / _folder(n) / "index.csv").read_bytes() for n in times}
    same = len(set(indexes.values())) == 1
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.members} members in "
          f"{args.stacks} stacks, {args.epochs} epochs, workers {args.workers} x threads {args.threads}")
    for name, t in times.items():
        extra = (t - times["local"]) / args.members
        print(f"{name:11} {t:7.1f} s   {extra * 1000:+8.0f} ms per member vs local   ratio {t / times['local']:.2f}")
    print(f"index tables identical: {same}")


if __name__ == "__main__":
    main()
