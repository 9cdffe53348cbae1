"""Same bits out: train and analyse fixed configs with two versions of circuits and compare.

The seams refactor (issue 18) promises that it changes no result (design.md, "Contract
details, continued"): today's ``quick`` config on both engines and a short run of today's
``nanda`` config, each given as a JSON config file (not by preset name), give byte-identical
checkpoints and ``metrics.csv``, ``measures.csv`` and the arrays equal to 1e-9 relative, and
``summary.json`` equal on every key the baseline has.

Each version runs in its own process with its own source tree first on ``PYTHONPATH``: the
baseline from a git worktree of ``--base`` (default: the commit before the refactor), ours from
this checkout. Baseline outputs are kept in ``--work`` and reused on a rerun.

    python benchmarks/same_bits.py --base 2f61d5a          # all cases
    python benchmarks/same_bits.py --base 2f61d5a --cases quick-fused nanda-300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

#: name -> (preset, overrides). The configs are written out whole, so a later change of a
#: preset's defaults cannot change what is compared.
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "quick-fused": ("quick", {"engine": "fused"}),
    "quick-reference": ("quick", {"engine": "reference", "epochs": 600}),
    "nanda-300": ("nanda", {"epochs": 300, "checkpoint_early_every": 20, "checkpoint_early_until": 300}),
    "nanda-300-reference": ("nanda", {"epochs": 60, "engine": "reference",
                                      "checkpoint_early_every": 20, "checkpoint_early_until": 60}),
}

#: Written as JSON by ``circuits.config`` of the baseline, so both versions read the same file.
_WRITE_CONFIG = """
import json, sys
from circuits.config import preset
cfg = preset(sys.argv[1]).replace(**json.loads(sys.argv[2]))
print(json.dumps(cfg.to_dict()))
"""


def _run(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)


def _produce(tree: Path, out: Path, case: str) -> None:
    """Train and analyse ``case`` with the circuits of ``tree`` into ``out`` (skipped if done)."""
    if (out / "analysis" / "summary.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    name, overrides = CASES[case]
    cfg = out / "config.json"
    if not cfg.is_file():
        made = _run(tree, "-c", _WRITE_CONFIG, name, json.dumps(overrides))
        if made.returncode:
            raise SystemExit(made.stderr)
        cfg.write_text(made.stdout)
    for cmd in (["train", "--config", str(cfg), "--out", str(out / "run")],
                ["analyze", str(out / "run"), "--out", str(out / "analysis")]):
        done = _run(tree, "-m", "circuits.cli", *cmd)
        if done.returncode:
            raise SystemExit(f"{tree}: circuits {' '.join(cmd)} failed:\n{done.stderr}")


def _close(a: float, b: float, rel: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


def compare(base: Path, ours: Path, rel: float = 1e-9) -> list[str]:
    """Every difference between two produced cases, as lines (empty: the same)."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    diffs: list[str] = []
    b_run, o_run = base / "run", ours / "run"
    b_files = sorted(p.relative_to(b_run) for p in (b_run / "checkpoints").iterdir())
    o_files = sorted(p.relative_to(o_run) for p in (o_run / "checkpoints").iterdir())
    if b_files != o_files:
        diffs.append(f"checkpoint files differ: {len(b_files)} vs {len(o_files)}")
    for rel_path in [*b_files, Path("metrics.csv"), Path("split.safetensors"), Path("manifest.json")]:
        if (b_run / rel_path).read_bytes() != (o_run / rel_path).read_bytes():
            diffs.append(f"{rel_path} is not byte-identical")
    # The resume file's bytes are not reproducible in any version: safetensors writes its metadata
    # in hash-map order, and rng.torch is the process's global generator, seeded at random (no
    # draw is taken from it in training). Its weights, moments and step counts must be equal.
    b_res, o_res = (load_file(str(r / "resume.safetensors")) for r in (b_run, o_run))
    for key in sorted((set(b_res) | set(o_res)) - {"rng.torch"}):
        if key not in b_res or key not in o_res or not torch.equal(b_res[key], o_res[key]):
            diffs.append(f"resume.safetensors {key} differs")
    b_a, o_a = base / "analysis", ours / "analysis"
    bm, om = pd.read_csv(b_a / "measures.csv"), pd.read_csv(o_a / "measures.csv")
    missing = [c for c in bm.columns if c not in om.columns]
    if missing:
        diffs.append(f"measures.csv lacks {missing}")
    if len(bm) != len(om):
        diffs.append(f"measures.csv has {len(om)} rows, the baseline {len(bm)}")
    else:
        for col in bm.columns:
            if col in om.columns:
                bad = [i for i, (x, y) in enumerate(zip(bm[col], om[col])) if not _close(float(x), float(y), rel)]
                if bad:
                    diffs.append(f"measures.csv {col}: {len(bad)} rows differ beyond {rel} (first: row {bad[0]}, "
                                 f"{bm[col][bad[0]]!r} vs {om[col][bad[0]]!r})")
    ba, oa = load_file(str(b_a / "arrays.safetensors")), load_file(str(o_a / "arrays.safetensors"))
    for key, value in ba.items():
        if key not in oa:
            diffs.append(f"arrays lack {key}")
        elif value.shape != oa[key].shape:
            diffs.append(f"array {key}: shape {tuple(oa[key].shape)} vs {tuple(value.shape)}")
        else:
            a, b = value.double(), oa[key].double()
            both_nan = torch.isnan(a) & torch.isnan(b)
            err = ((a - b).abs() > rel * torch.maximum(a.abs(), b.abs())) & ~both_nan & (a != b)
            if bool(err.any()):
                diffs.append(f"array {key}: {int(err.sum())} entries differ beyond {rel}")
    bs = json.loads((b_a / "summary.json").read_text())
    os_ = json.loads((o_a / "summary.json").read_text())
    # Where the files were written and which version wrote them are expected to differ.
    skip = {"inputs", "run", "tables", "created", "circuits_version", "version"}
    for key, value in bs.items():
        if key in skip:
            continue
        if key not in os_:
            diffs.append(f"summary.json lacks {key}")
        elif not _json_close(value, os_[key], rel):
            diffs.append(f"summary.json {key}: {os_[key]!r} vs the baseline's {value!r}")
    return diffs


def _json_close(a: object, b: object, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return _close(a, float(b), rel)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() <= b.keys() and all(_json_close(v, b[k], rel) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_close(x, y, rel) for x, y in zip(a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision of the baseline")
    ap.add_argument("--work", type=Path, default=Path("/tmp/circuits-same-bits"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", args.base],
                         capture_output=True, text=True, check=True).stdout.strip()
    tree = args.work / f"tree-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), rev],
                       check=True, capture_output=True)
    failed = 0
    for case in args.cases:
        base_out, ours_out = args.work / f"base-{rev}" / case, args.work / "ours" / case
        _produce(tree, base_out, case)
        if ours_out.exists():
            import shutil

            shutil.rmtree(ours_out)
        _produce(HERE, ours_out, case)
        diffs = compare(base_out, ours_out)
        n = len(list((base_out / "run" / "checkpoints").iterdir()))
        print(f"{case}: {'SAME' if not diffs else 'DIFFERENT'} ({n} checkpoints, base {rev})")
        for d in diffs:
            print(f"  {d}")
        failed += bool(diffs)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
