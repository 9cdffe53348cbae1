"""The `nanda` run over several model seeds, as one stacked ensemble (issue 20).

    python docs/make_seeds.py train   --out checkpoints/nanda-seeds    # resumable; rerun to go on
    python docs/make_seeds.py summary --out checkpoints/nanda-seeds    # analyse, print the table
    python docs/make_seeds.py train   --out checkpoints/quick-ref --preset quick --engine reference
    python docs/make_seeds.py compare --out checkpoints/quick-fused --other checkpoints/quick-ref --preset quick

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


def configs(seeds: list[int], epochs: int, engine: str, name: str = "nanda") -> list:
    """The preset ``name`` with each model seed, ``epochs`` long."""
    base = preset(name)
    return [base.replace(seed=s, epochs=epochs, engine=engine) for s in seeds]


def grok_epoch(path: Path, level: float = 0.99) -> float | None:
    """First logged epoch with test accuracy >= ``level`` (None: not within the run)."""
    m = circuits.load_run(path).metrics
    hit = m[m.test_acc >= level]
    return None if hit.empty else float(hit.epoch.iloc[0])


def compare(out: Path, other: Path, seeds: list[int]) -> dict:
    """Grokking epoch per seed in two sets of runs (two engines), and the paired difference's
    mean with its 95% interval."""
    rows = {s: {"this": grok_epoch(out / f"seed-{s}"), "other": grok_epoch(other / f"seed-{s}")} for s in seeds}
    diffs = [r["this"] - r["other"] for r in rows.values() if r["this"] is not None and r["other"] is not None]
    mean, half, n = mean_ci(diffs)
    return {"seeds": rows, "difference": {"mean": mean, "ci95": half, "n": n, "of": len(seeds)}}


def first_below(m, col: str, level: float) -> float | None:  # noqa: ANN001
    """First epoch at which ``col`` is below ``level`` (None: never)."""
    hit = m[m[col] < level]
    return None if hit.empty else float(hit["epoch"].iloc[0])


def _circuit_landmarks(m, phases: dict) -> dict:  # noqa: ANN001
    """The circuit split at the end and at each phase boundary: efficiencies (scale-free),
    margins, the memorising part's excess over its initial value, the logit share."""
    out = {}
    at = {"end": m.iloc[-1]}
    for name in ("memorisation_end", "circuit_formation_end"):
        if phases.get(name) is not None:
            at[name] = m.iloc[(m.epoch - phases[name]).abs().argmin()]
    for where, row in at.items():
        for col in ("gen_efficiency", "mem_efficiency", "gen_margin_train", "mem_margin_train",
                    "mem_norm_sq_excess", "gen_norm_sq", "mem_norm_sq", "gen_share"):
            out[f"{col}@{where}"] = float(row[col])
    out["mem_norm_sq_init"] = float(m.mem_norm_sq_init.iloc[0])
    window = m[(m.train_acc > 0.999) & (m.test_acc < 0.99)]
    out["gen_more_efficient_in_window"] = (
        float((window.gen_efficiency > window.mem_efficiency).mean()) if len(window) else None)
    return out


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
            "grok_epoch": grok_epoch(path),
            **_circuit_landmarks(m, phases),
        }
    stats = {}
    keys = [k for k, v in next(iter(rows.values())).items() if isinstance(v, (int, float)) or v is None]
    for key in [k for k in keys if k not in ("last_epoch",)]:
        vals = [r[key] for r in rows.values() if r[key] is not None]
        mean, half, _ = mean_ci(vals)
        stats[key] = {"reached": len(vals), "of": len(rows), "mean": mean, "ci95": half}
    return {"seeds": rows, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train", "summary", "compare"))
    parser.add_argument("--preset", default="nanda")
    parser.add_argument("--other", type=Path, help="compare: the other engine's runs")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/nanda-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epochs", type=int, default=None, help="default: 20,000 (nanda), the preset's own otherwise")
    parser.add_argument("--engine", default="fused")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 20_000 if args.preset == "nanda" else preset(args.preset).train.epochs
    if args.what == "train":
        cfgs = configs(args.seeds, args.epochs, args.engine, args.preset)
        dirs = member_dirs(args.out, args.seeds)
        if args.engine == "fused":
            circuits.train_ensemble(cfgs, dirs)
        else:
            for cfg, d in zip(cfgs, dirs):
                circuits.train(cfg, out=d)
    elif args.what == "compare":
        print(json.dumps(compare(args.out, args.other, args.seeds), indent=1))
    else:
        print(json.dumps(summary(args.out, args.seeds), indent=1))


if __name__ == "__main__":
    main()
