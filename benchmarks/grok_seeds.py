"""Grokking epochs of many seeds at once: the fused step against the hooked model's own forward.

``benchmarks/grok_epoch.py`` trains one seed per run through ``circuits train``: fair, but the
reference engine takes 23-41 min per `quick` seed on a 2-core CPU, too slow for the many seeds a
few-percent question needs. Here each arm trains E seeds (model seeds 999 + s, the preset's
data split) as one stack with the same StackedAdamW, and the arms advance in lockstep, so a run
cut short still compares them at the same epoch. Arms:

* ``fused``: the step ``circuits train`` runs (circuits.engine.step.TrainStep);
* ``reference``: the hooked model (circuits.model.Transformer, every position) through
  ``torch.func.functional_call``, vmapped over the stack: the reference engine's arithmetic;
* ``tf32`` (``--tf32``, GPU): the fused step with TF32 matmuls;
* ``unflushed``: the fused step with float32 subnormals kept (IEEE arithmetic, the bits of the
  code before circuits.engine.subnormal): what flushing them does to the science.

Every ``log_every`` epochs each member's test accuracy on its test split is taken (fused
forward, float32, no TF32), and the first epoch at >= 99% is its grokking epoch, as in
grok_epoch.py. Printed: per arm, how many seeds grok, and the mean grokking epoch over the seeds
that grok on both arms, with the paired difference's standard error.

    python benchmarks/grok_seeds.py --seeds 8 --device cpu        # small, slow
    python benchmarks/grok_seeds.py --seeds 256 --device cuda --tf32
    python benchmarks/grok_seeds.py --seeds 32 --device cpu --arms fused unflushed
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from circuits.config import preset
from circuits.engine.ensemble import resolve_device
from circuits.engine.fused import stacked_last_logits
from circuits.engine.stacked import StackedAdamW, stack_models
from circuits.engine.step import TrainStep
from circuits.engine.subnormal import flush_subnormals
from circuits.model import make_model
from circuits.tasks import make_task
from circuits.trainer import deterministic


def hooked_forward(template: torch.nn.Module):  # noqa: ANN201
    """``(stacked params, tokens) -> last-position logits`` of the hooked model, per member."""

    def one(params: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return functional_call(template, params, (tokens,))[:, -1]

    batched = vmap(one, in_dims=(0, 0))
    return lambda params, tokens: batched(dict(params), tokens)


def read_csv(path: Path) -> dict[int, dict[str, int]]:
    """Per-seed grokking epochs (-1: not within the schedule) of an earlier run's ``--out``."""
    head, *rows = path.read_text().split()
    cols = head.split(",")[1:]
    return {int(r.split(",")[0]): dict(zip(cols, map(int, r.split(",")[1:]))) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="quick-v1", help="the docs' numbers (docs/benchmarks.md) used quick-v1")
    parser.add_argument("--seeds", type=int, default=64, help="seeds per arm (one stack each)")
    parser.add_argument("--first-seed", type=int, default=0, help="seed index s: model seed 999 + s")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", action="store_true", help="add a fused arm with TF32 matmuls")
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="CSV of per-seed epochs")
    parser.add_argument("--arms", nargs="+", choices=["fused", "reference", "unflushed"], default=["fused", "reference"])
    parser.add_argument("--seeds-from", type=Path, default=None,
                        help="train the seeds that grokked on any arm of this earlier CSV instead")
    parser.add_argument("--against", type=Path, default=None,
                        help="also compare the fused arm with the reference column of this CSV "
                             "(e.g. this machine's CPU engine against a GPU run's reference)")
    args = parser.parse_args()

    base = preset(args.preset)
    epochs = args.epochs or base.train.epochs
    dev = resolve_device(args.device)  # sets cuBLAS's deterministic workspace before first use
    seeds = [999 + s for s in range(args.first_seed, args.first_seed + args.seeds)]
    if args.seeds_from:
        seeds = [s for s, row in read_csv(args.seeds_from).items() if max(row.values()) >= 0]
    earlier = read_csv(args.against) if args.against else {}
    configs = [base.replace(seed=s) for s in seeds]
    task = make_task(base.task)
    x, y = (t.to(dev) for t in task.train_data())
    grid, labels = task.tokens.to(dev), task.labels.to(dev)
    test_idx = task.test_idx.to(dev)
    n = len(configs)
    xs, ys = x.expand(n, -1, -1), y.expand(n, -1)
    w = torch.full(ys.shape, 1.0 / len(y), dtype=torch.float64, device=dev)
    act_fn = base.model.act_fn
    template = make_model(base).to(dev)

    arms: dict[str, tuple[dict[str, torch.Tensor], TrainStep, bool]] = {}
    names = list(args.arms) + (["tf32"] if args.tf32 else [])
    for name in names:
        params = stack_models([make_model(c) for c in configs], dev)
        forward = hooked_forward(template) if name == "reference" else None
        step = TrainStep(params, StackedAdamW(params, configs), xs, ys, w, act_fn, forward=forward)
        arms[name] = (params, step, name == "tf32")
    first = {name: torch.full((n,), -1, dtype=torch.long, device=dev) for name in names}
    # With an unflushed arm: the first logged epoch at which each seed's weights differ.
    diverged = torch.full((n,), -1, dtype=torch.long)

    def check_divergence(epoch: int) -> None:
        a, b = arms["fused"][0], arms["unflushed"][0]
        for i in range(n):
            if diverged[i] < 0 and not all(torch.equal(a[k][i], b[k][i]) for k in a):
                diverged[i] = epoch

    @torch.no_grad()
    def test_acc(params: dict[str, torch.Tensor]) -> torch.Tensor:
        accs = []
        for lo in range(0, n, 64):  # bounds the MLP activations held at once
            sub = {k: v[lo : lo + 64] for k, v in params.items()}
            m = next(iter(sub.values())).shape[0]
            pred = stacked_last_logits(sub, grid.expand(m, -1, -1), act_fn).argmax(-1)
            accs.append((pred[:, test_idx] == labels[test_idx]).float().mean(1))
        return torch.cat(accs)

    def compare(label: str, f: torch.Tensor, r: torch.Tensor) -> None:
        both = (f >= 0) & (r >= 0)
        if both.sum() < 2:
            return
        a, b = f[both].double(), r[both].double()
        d = a - b
        se = d.std().item() / math.sqrt(len(d))
        print(f"  {label}: {int(both.sum())} seeds grok on both; mean {a.mean():.0f} vs "
              f"{b.mean():.0f}: {(a.mean() - b.mean()) / b.mean():+.1%} "
              f"(paired s.e. {se / b.mean():.1%}); later on {int((d > 0).sum())}, "
              f"earlier on {int((d < 0).sum())}, same on {int((d == 0).sum())}", flush=True)

    def report(epoch: int, wall: float) -> None:
        got = {k: v.cpu() for k, v in first.items()}
        print(f"epoch {epoch}: {wall:.0f} s; grokked: "
              + ", ".join(f"{k} {int((v >= 0).sum())}/{n}" for k, v in got.items()), flush=True)
        if "fused" in got and "reference" in got:
            compare("fused vs reference", got["fused"], got["reference"])
        if "fused" in got and "tf32" in got:
            compare("tf32 vs fused", got["tf32"], got["fused"])
        if "fused" in got and "unflushed" in got:
            compare("fused vs unflushed", got["fused"], got["unflushed"])
            apart = diverged[diverged >= 0].tolist()
            print(f"  fused vs unflushed weights: bitwise equal on {n - len(apart)}/{n} seeds; "
                  f"the others first differ at epochs {sorted(apart)}", flush=True)
        if earlier and "fused" in got:
            # Seeds still short of 99% by this epoch count as not grokked on the other side too.
            ref = torch.tensor([earlier[s]["reference"] for s in seeds])
            ref = torch.where(ref <= epoch, ref, -1)
            compare(f"fused vs reference of {args.against.name}", got["fused"], ref)
        if args.out:
            lines = ["seed," + ",".join(names)]
            lines += [f"{s}," + ",".join(str(int(got[k][i])) for k in names) for i, s in enumerate(seeds)]
            args.out.write_text("\n".join(lines) + "\n")

    print(f"{args.preset}: {n} seeds per arm ({seeds[0]}-{seeds[-1]}), {epochs} epochs, "
          f"arms {names}, device {dev}", flush=True)
    t0 = time.perf_counter()
    # Each arm sets its own subnormal handling: flushed (as circuits train), or kept.
    with deterministic(flush=False):
        for epoch in range(1, epochs + 1):
            for name, (params, step, tf32) in arms.items():
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with flush_subnormals() if name != "unflushed" else contextlib.nullcontext():
                    step()
            torch.backends.cuda.matmul.allow_tf32 = False
            if epoch % base.train.log_every == 0:
                for name, (params, _, _) in arms.items():
                    hit = (test_acc(params) >= 0.99) & (first[name] < 0)
                    first[name] = torch.where(hit, epoch, first[name])
                if "fused" in arms and "unflushed" in arms:
                    check_divergence(epoch)
            if epoch % args.report_every == 0 or epoch == epochs:
                report(epoch, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
