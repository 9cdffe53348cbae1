"""Seed statistics of candidate `quick` presets (issue 21, item 8): does each one grok visibly and
finish all three phases inside its schedule, over many seeds?

Each candidate is the `quick` preset with overrides (``lr=2e-3,epochs=1500``). Its seeds s = 0..N-1
move both the model seed (999 + s) and the data split (598 + s), so the statistics cover both.
The seeds of one candidate train as one stack (the fused engine; each member float32-close to
its run trained alone, not bitwise: docs/benchmarks.md, so a phase boundary can move by one
checkpoint between the two), into
``--out/<candidate>/s<s>``; rerunning resumes. Each run is then analysed for its losses and
norms only (the phases need the test loss and the weight norm), and per seed it prints:

* ``train100``: first logged epoch with train accuracy 1;
* ``test99``: first logged epoch with test accuracy >= 0.99 (grokking);
* the three phase boundaries of circuits.measures.phases (memorisation end, circuit formation
  end, cleanup end; ``-`` when not reached inside the schedule).

and per candidate: seeds that grok, seeds with all three phases, the mean and 95% interval
(Student t) of test99 and of cleanup end over the seeds that reach them, and the smallest ratio
test99 / train100 (how visibly it groks: 1 would be no delay at all).
``train_stack_s`` is what this invocation trained: a resumed candidate reports only the rest.
The report (``--out/report.json``) keeps candidates of earlier invocations.

    python benchmarks/quick_preset.py --seeds 10 --candidate current= --candidate lr2e-3=lr=2e-3,epochs=1500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuits
from circuits.config import preset
from circuits.stats import mean_ci


def parse(spec: str) -> tuple[str, dict[str, object]]:
    name, _, rest = spec.partition("=")
    overrides: dict[str, object] = {}
    for key, value in (kv.split("=", 1) for kv in rest.split(",") if kv):
        overrides[key] = json.loads(value) if value[:1].isdigit() or value[:1] == "-" else value
    return name, overrides


def first(epochs: list[int], values: list[float], threshold: float) -> int | None:
    return next((e for e, v in zip(epochs, values) if v >= threshold), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--candidate", action="append", required=True, help="NAME=field=value,field=value")
    ap.add_argument("--out", type=Path, default=Path("/tmp/quick_preset"))
    args = ap.parse_args()
    # Candidates run on other days stay in the report beside the ones run now.
    report_path = args.out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for spec in args.candidate:
        name, overrides = parse(spec)
        base = preset("quick").replace(**overrides) if overrides else preset("quick")
        configs = [base.replace(seed=999 + s, data_seed=598 + s) for s in range(args.seeds)]
        outs = [args.out / name / f"s{s}" for s in range(args.seeds)]
        t0 = time.perf_counter()
        runs = circuits.train_ensemble(configs, outs)
        train_s = time.perf_counter() - t0
        rows = []
        for s, run in enumerate(runs):
            a = circuits.analyze(run, out=args.out / name / f"a{s}", measures=["losses", "norms"])
            m = run.metrics
            ph = a.summary["phases"] or {}
            train100 = first(m.epoch.tolist(), m.train_acc.tolist(), 1.0)
            rows.append({
                "seed": s,
                "train100": train100,
                "test_acc_at_train100": None if train100 is None else float(m.test_acc[m.epoch == train100].iloc[0]),
                "test99": first(m.epoch.tolist(), m.test_acc.tolist(), 0.99),
                "mem_end": ph.get("memorisation_end"),
                "formation_end": ph.get("circuit_formation_end"),
                "cleanup_end": ph.get("cleanup_end"),
                "final_test_acc": float(m.test_acc.iloc[-1]),
            })
        epochs = base.train.epochs
        print(f"\n== {name}: {overrides or 'the preset'} ({epochs} epochs, {args.seeds} seeds, "
              f"trained as one stack in {train_s:.0f} s)")
        print(f"{'seed':>4} {'train100':>8} {'test@100':>8} {'test99':>7} {'mem_end':>7} {'form_end':>8} "
              f"{'cleanup':>7} {'final_test':>10}")
        for r in rows:
            print(f"{r['seed']:>4} {'-' if r['train100'] is None else r['train100']:>8} "
                  f"{r['test_acc_at_train100'] or 0:>8.3f} "
                  + " ".join(f"{'-' if r[k] is None else r[k]:>{w}}" for k, w in
                             (("test99", 7), ("mem_end", 7), ("formation_end", 8), ("cleanup_end", 7)))
                  + f" {r['final_test_acc']:>10.4f}")
        grok = [r for r in rows if r["test99"] is not None]
        full = [r for r in rows if None not in (r["mem_end"], r["formation_end"], r["cleanup_end"])]
        # Phases in the order the curves show them: cleanup ends after the test accuracy is up.
        ordered = [r for r in full if r["test99"] is not None and r["cleanup_end"] >= r["test99"]]
        hidden = [r for r in rows if r["test_acc_at_train100"] is not None and r["test_acc_at_train100"] < 0.5]
        t99 = mean_ci([r["test99"] for r in grok]) if len(grok) > 1 else None
        cln = mean_ci([r["cleanup_end"] for r in full]) if len(full) > 1 else None
        delay = [r["test99"] / r["train100"] for r in grok if r["train100"]]
        summary = {
            "overrides": overrides, "epochs": epochs, "seeds": args.seeds, "grok": len(grok), "all_phases": len(full),
            "phases_after_grokking": len(ordered), "memorised_first": len(hidden),
            "test99_mean": t99[0] if t99 else None, "test99_ci95": t99[1] if t99 else None,
            "cleanup_mean": cln[0] if cln else None, "cleanup_ci95": cln[1] if cln else None,
            "min_delay_ratio": min(delay) if delay else None, "train_stack_s": round(train_s, 1), "rows": rows,
        }
        report[name] = summary
        print({k: v for k, v in summary.items() if k != "rows"})
        report_path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
