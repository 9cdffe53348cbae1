"""The `nanda` run over several model seeds, as one stacked ensemble (issue 20).

    python docs/make_seeds.py train   --out checkpoints/nanda-seeds    # resumable; rerun to go on
    python docs/make_seeds.py summary --out checkpoints/nanda-seeds    # analyse, print the table

Nanda et al.'s Fig. 2 rests on 5 seeds; one seed is chaotic, so a phase boundary read off one run
says little. ``train`` trains the nanda preset with the model seeds ``--seeds`` (data seed 598
kept: the split is the demo's) as one fused stack, ``--epochs`` long (cut from the preset's
40,000 to fit science.md's CPU budget; the paper's phases end by 14,000). Killed, it resumes
from each member's last checkpoint. ``summary`` analyses every member and prints, per seed and
as mean with a Student-t 95% interval: the phase boundaries, the number of key frequencies,
the epochs at which test loss and restricted loss first fall below thresholds, and the
restricted loss's lead over the test loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import circuits
from circuits.config import preset
from circuits.stats import mean_ci

SEEDS = (999, 1, 2, 3, 4)


def member_dirs(out: Path, seeds: list[int]) -> list[Path]:
    """One run folder per model seed."""
    return [out / f"seed-{s}" for s in seeds]


def configs(seeds: list[int], epochs: int, engine: str) -> list:
    """The nanda preset with each model seed, ``epochs`` long."""
    base = preset("nanda")
    return [base.replace(seed=s, epochs=epochs, engine=engine) for s in seeds]


def first_below(m, col: str, level: float) -> float | None:  # noqa: ANN001
    """First epoch at which ``col`` is below ``level`` (None: never)."""
    hit = m[m[col] < level]
    return None if hit.empty else float(hit["epoch"].iloc[0])


def summary(out: Path, seeds: list[int]) -> dict:
    """Per-seed landmarks and their means with 95% intervals."""
    rows = {}
    for seed, path in zip(seeds, member_dirs(out, seeds)):
        run = circuits.load_run(path)
        a = circuits.analyze(run)
        m, s = a.measures, a.summary
        phases = s.get("phases") or {}
        test_01 = first_below(m, "test_loss", 0.1)
        restr_01 = first_below(m, "restricted_loss", 0.1)
        rows[seed] = {
            "last_epoch": int(m["epoch"].iloc[-1]),
            "n_key": len(s.get("key_frequencies") or []),
            "key_frequencies": s.get("key_frequencies"),
            **{k: phases.get(k) for k in ("memorisation_end", "circuit_formation_end", "cleanup_end")},
            "test_loss_below_0.1": test_01,
            "restricted_loss_below_0.1": restr_01,
            "restricted_lead": (test_01 - restr_01) if test_01 is not None and restr_01 is not None else None,
            "final_test_loss": float(m["test_loss"].iloc[-1]),
        }
    stats = {}
    for key in ("n_key", "memorisation_end", "circuit_formation_end", "cleanup_end",
                "test_loss_below_0.1", "restricted_loss_below_0.1", "restricted_lead"):
        vals = [r[key] for r in rows.values() if r[key] is not None]
        mean, half, _ = mean_ci(vals)
        stats[key] = {"reached": len(vals), "of": len(rows), "mean": mean, "ci95": half}
    return {"seeds": rows, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train", "summary"))
    parser.add_argument("--out", type=Path, default=Path("checkpoints/nanda-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epochs", type=int, default=20_000)
    parser.add_argument("--engine", default="fused")
    args = parser.parse_args()
    if args.what == "train":
        cfgs = configs(args.seeds, args.epochs, args.engine)
        dirs = member_dirs(args.out, args.seeds)
        if args.engine == "fused":
            circuits.train_ensemble(cfgs, dirs)
        else:
            for cfg, d in zip(cfgs, dirs):
                circuits.train(cfg, out=d)
    else:
        print(json.dumps(summary(args.out, args.seeds), indent=1))


if __name__ == "__main__":
    main()
