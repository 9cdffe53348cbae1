"""Time ``circuits analyze`` on 500 checkpoints of the nanda configuration vs a plain loop.

The checkpoints are nanda-sized weights (p = 113, d_model 128, d_mlp 512): the initialisation
plus seeded perturbations, written through the run store, so the work per checkpoint is that of
a real run. Our path is :func:`circuits.report.report` (the batched analysis and the dashboard, as
``circuits analyze`` runs them). The baseline
is what a notebook does: for each checkpoint, load the hooked model, ``run_with_cache`` on all
p² inputs, and compute the same measures with the same functions, one checkpoint at a time.
The baseline is timed on ``--baseline-ckpts`` checkpoints and scaled to the full count.

    python benchmarks/analyze.py                 # 500 checkpoints, baseline on 25
    python benchmarks/analyze.py --lenses 20     # also each opt-in lens's cost per checkpoint
    python benchmarks/analyze.py --lenses 20 --ckpts 0   # the lenses only

``--lenses N`` times ``analyze(write=False)`` on N checkpoints with the default families, then
with the default families plus each opt-in lens in turn (alternated, median of 3), and prints
each lens's extra milliseconds per checkpoint and the ratio to the default analysis.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from circuits.report import report
from circuits.config import preset
from circuits.measures import (
    accuracy,
    cross_entropy,
    embed_fourier_norms,
    excluded_loss,
    gini,
    key_logit_fraction,
    neuron_clusters,
    neuron_frequency_fractions,
    neuron_logit_fourier_norms,
    restricted_loss,
    weight_norm_sq,
)
from circuits.model import make_model
from circuits.run import Run
from circuits.store import RunStore
from circuits.trainer import prepare_store


def make_fake_run(root: Path, n: int) -> Run:
    cfg = preset("nanda").replace(epochs=100 * (n - 1), checkpoint_early_until=0)
    store = RunStore(root)
    prepare_store(cfg, store)
    base = {k: v for k, v in make_model(cfg).state_dict().items() if "W_" in k or "b_" in k}
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) if "W_" in k else v for k, v in base.items()}
        store.write_checkpoint(100 * i, sd)
    return Run(root)


def baseline(run: Run, epochs: list[int], key: list[int]) -> float:
    task, p = run.task, run.config.task.p
    t0 = time.perf_counter()
    for e in epochs:
        model = run.model(e, exact=True)
        with torch.no_grad():
            logits, cache = model.run_with_cache(task.tokens)
        lg = logits[:, -1]
        post = cache["blocks.0.mlp.hook_post"][:, -1]
        for idx in (task.train_idx, task.test_idx):
            cross_entropy(lg[idx], task.labels[idx])
            accuracy(lg[idx], task.labels[idx])
        restricted_loss(lg, task.labels, p, key)
        excluded_loss(lg, task.labels, p, key, task.train_idx)
        key_logit_fraction(lg, p, key)
        gini(embed_fourier_norms(model.W_E.detach(), p)[1:])
        gini(neuron_logit_fourier_norms(model.blocks[0].mlp.W_out.detach(), model.W_U.detach())[1:])
        weight_norm_sq(model.state_dict())
        neuron_clusters(neuron_frequency_fractions(post, p))
    return time.perf_counter() - t0


def lens_costs(run: Run, n: int, repeats: int = 3) -> None:
    """Each opt-in lens's extra cost per checkpoint over the default analysis, on the ``n``
    checkpoints of ``run``."""
    import statistics

    from circuits.analysis import analyze
    from circuits.measures import families

    lenses = [f.name for f in families() if not f.default and f.name != "llc"]
    key = [14, 35, 41, 42, 52]

    def timed(measures: list[str]) -> float:
        t0 = time.perf_counter()
        analyze(run, measures=measures, key_freqs=key, write=False, batch_size=2)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in ["default", *lenses]}
    timed(["default"])  # warm-up
    for _ in range(repeats):
        for name in times:
            times[name].append(timed(["default"] if name == "default" else ["default", name]))
    base = statistics.median(times["default"])
    print(f"default analysis: {1000 * base / n:.0f} ms per checkpoint ({n} checkpoints, median of {repeats})")
    for name in lenses:
        extra = statistics.median(times[name]) - base
        print(f"  + {name:14} {1000 * extra / n:8.0f} ms per checkpoint ({extra / base:+.0%} of the default)")
    # The sampler is timed on its own, on one checkpoint (every other one skipped): its cost is
    # tens of seconds per checkpoint, so the alternation above would take an hour.
    t0 = time.perf_counter()
    analyze(run, measures=["llc"], options={"llc.every": n}, write=False)
    llc = time.perf_counter() - t0
    print(f"  + {'llc':14} {1000 * llc:8.0f} ms per checkpoint (one checkpoint, default sampler settings; "
          f"{llc / (base / n):.0f}x the default analysis)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpts", type=int, default=500)
    parser.add_argument("--baseline-ckpts", type=int, default=25)
    parser.add_argument("--lenses", type=int, default=0, metavar="N",
                        help="also time each opt-in lens on N checkpoints (0: skip)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.lenses:
        with tempfile.TemporaryDirectory() as tmp:
            lens_costs(make_fake_run(Path(tmp) / "nanda", args.lenses), args.lenses)
    if not args.ckpts:
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = make_fake_run(Path(tmp) / "nanda", args.ckpts)
        t0 = time.perf_counter()
        # report() = analyze() + the dashboard: the work `circuits analyze` does (before the
        # seams change analyze() drew the dashboard itself, so the two versions time the same).
        result = report(run, out=Path(tmp) / "analysis")
        ours = time.perf_counter() - t0
        key = result.key_frequencies or [14, 35, 41, 42, 52]
        sample = run.epochs[: args.baseline_ckpts]
        base = baseline(run, sample, key) * args.ckpts / len(sample)
    print(f"circuits analyze: {args.ckpts} checkpoints in {ours:.1f} s "
          f"({1000 * ours / args.ckpts:.0f} ms each)")
    print(f"plain per-checkpoint loop: {base:.1f} s (timed on {len(sample)}, scaled)")
    print(f"speed-up: {base / ours:.1f}x")


if __name__ == "__main__":
    main()
