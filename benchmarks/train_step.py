"""Time one full-batch training epoch: our engine vs the plain hooked-model loop, same process.

Baseline (design.md): the hooked model trained eagerly with ``torch.optim.AdamW`` and a float64
loss, train step only (forward, backward, optimizer), no evaluation on either side. Ours: the
step ``circuits train`` runs (the fused stacked forward, stacked AdamW, float64 loss) for one
model, and for ensembles of E models (ms per model-epoch against E separate runs); on CUDA that
step is a replayed CUDA graph, and the eager step is timed beside it. The paths
run interleaved in one process on the same machine, so the ratios are fair. Also printed:
FLOPs per epoch (forward + backward, over the batch: matmuls and, on the CPU, the fused step's
weighted row gathers) and the machine's measured matmul rate.

    python benchmarks/train_step.py                       # nanda and quick, single runs
    python benchmarks/train_step.py --preset nanda --ensembles 8 64
    python benchmarks/train_step.py --memory 64            # peak RSS of a 64-member nanda ensemble
    python benchmarks/train_step.py --device cuda --preset nanda --ensembles 256 512 --tf32
    python benchmarks/train_step.py --run checkpoints/nanda-XXXX --at 0 2000 6000 10000 12000 30000

``--run``: time both paths from a real run's checkpoints (nearest to each ``--at`` epoch), where
a run spends its time: after memorisation the margins are large and, without flushing, float32
subnormals made the fused step several times slower (``circuits/engine/subnormal.py``). Each
path starts from the checkpoint's weights with fresh optimiser moments, as at the
initialisation. Ours runs under ``circuits.trainer.deterministic()``, as ``circuits train``
does (subnormals flushed on every thread); ``--no-flush`` times it without the flush, and the
row ``baseline+flush`` is the plain loop with the flush, to show what flushing alone buys it.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from circuits.config import RunConfig, preset
from circuits.engine.memory import keep_freed_memory
from circuits.engine.stacked import StackedAdamW, stack_models
from circuits.engine.subnormal import flush_subnormals
from circuits.engine.step import WARMUP_STEPS, TrainStep
from circuits.model import make_model
from circuits.run import load_run
from circuits.tasks import make_task
from circuits.trainer import loss_fn


def flops_per_epoch(cfg: RunConfig, engine: str, device: str = "cpu") -> float:
    """Multiply-add FLOPs over the batch of one epoch, forward + backward (backward = 2x
    forward): matmuls, and the fused step's weighted row gathers."""
    m, n = cfg.model, cfg.task.n_train
    d, dm, v = m.d_model, m.d_mlp, cfg.d_vocab_out
    if engine == "fused" and device != "cpu":  # last position, dense: W_O, the MLP, W_U
        per_example = m.n_heads * m.d_head * d + 2 * d * dm + d * v
        rows = n
    elif engine == "fused":  # last position only; per-token tables are O(vocab), not O(batch)
        # On the CPU: W_L = W_out W_U, and 2 * n_heads weighted rows of [W_in | W_U] per
        # example (circuits/engine/mix.py; the shared "=" folded into one base row).
        per_example = dm * v + 2 * m.n_heads * (dm + v)
        rows = n
    else:  # every position: Q, K, V, O, the MLP and the unembedding
        per_example = 4 * d * d + 2 * d * dm + d * v
        rows = n * 3
    return 2 * 3 * per_example * rows


def matmul_gflops(device: str = "cpu") -> float:
    """float32 rate of the Nanda MLP's matmul shape on ``device`` (E=64 stacked on a GPU)."""
    e = 1 if device == "cpu" else 64
    a, b = torch.randn(e, 3830, 128, device=device), torch.randn(e, 128, 512, device=device)
    for _ in range(3):
        a @ b
    _sync()
    t = time.perf_counter()
    for _ in range(30):
        a @ b
    _sync()
    return 2 * e * 3830 * 128 * 512 * 30 / (time.perf_counter() - t) / 1e9


def baseline_step(
    cfg: RunConfig, device: str = "cpu", weights: dict[str, torch.Tensor] | None = None
) -> Callable[[], None]:
    """The plain loop's step (``weights``: start from these instead of the initialisation)."""
    x, y = (t.to(device) for t in make_task(cfg.task).train_data())
    model = make_model(cfg)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)

    def step() -> None:
        loss_fn(model(x)[:, -1], y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def engine_step(
    cfg: RunConfig, n_models: int, device: str = "cpu", graph: bool | None = None, tf32: bool = False,
    weights: list[dict[str, torch.Tensor]] | None = None,
) -> Callable[[], None]:
    """The training step of circuits.engine.ensemble for ``n_models`` seeds of ``cfg``
    (``graph``: a CUDA graph, the default on CUDA; ``tf32``: TF32 matmuls, GPU only;
    ``weights``: each member's starting weights instead of its initialisation)."""
    configs = [cfg.replace(seed=cfg.model.seed + i) for i in range(n_models)]
    x, y = (t.to(device) for t in make_task(cfg.task).train_data())
    models = [make_model(c) for c in configs]
    for model, w in zip(models, weights or []):
        model.load_state_dict(w, strict=False)
    params = stack_models(models, device)
    opt = StackedAdamW(params, configs)
    xs, ys = x.expand(n_models, -1, -1), y.expand(n_models, -1)
    w = torch.full(ys.shape, 1.0 / len(y), dtype=torch.float64, device=device)
    train_step = TrainStep(params, opt, xs, ys, w, cfg.model.act_fn, graph=graph)

    def step() -> None:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32  # read when a matmul is issued or captured
        try:
            train_step()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(step: Callable[[], None], steps: int) -> float:
    for _ in range(WARMUP_STEPS + 2):  # on CUDA: the eager warm-up and the graph's capture
        step()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t) / steps * 1000


def peak_memory_mb(name: str, n_models: int, steps: int = 3) -> float:
    """Peak RSS of a fresh process that trains an ``n_models`` ensemble for a few steps."""
    code = (
        "import resource, torch;"
        "from benchmarks.train_step import engine_step;"
        "from circuits.config import preset;"
        "from circuits.engine.memory import keep_freed_memory;"
        f"keep_freed_memory(); s = engine_step(preset({name!r}), {n_models});"
        f"[s() for _ in range({steps})];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def _timed(step: Callable[[], None], steps: int, flush: bool) -> float:
    with flush_subnormals() if flush else contextlib.nullcontext():
        return time_ms(step, steps)


def time_phases(
    run_dir: str, at: list[int], steps: int, repeats: int, unflushed: bool, mixed: bool
) -> None:
    """Both paths from the checkpoints of a real run nearest to each epoch in ``at``."""
    run = load_run(run_dir)
    cfg = run.config
    print(f"\nrun {run.path} ({cfg.preset or 'custom'}, n_train {cfg.task.n_train}); "
          "fresh optimiser moments at each checkpoint; ours flushes subnormals (as circuits train)")
    init = run.state_dict(run.epochs[0])
    header = f"{'epoch':>7} {'path':<22} {'ms per model-epoch':>19} {'speed-up':>9}"
    print(header)
    for want in at:
        epoch = run.nearest_epoch(want)
        w = run.state_dict(epoch)
        # (step, flushed?) per row; the baseline is what a notebook runs: no flush.
        rows: dict[str, tuple[Callable[[], None], bool]] = {
            "baseline": (baseline_step(cfg, weights=w), False),
            "baseline+flush": (baseline_step(cfg, weights=w), True),
            "fused": (engine_step(cfg, 1, weights=[w]), True),
        }
        if unflushed:
            rows["fused, no flush"] = (engine_step(cfg, 1, weights=[w]), False)
        if mixed:  # a member at this epoch beside one at the initialisation
            rows["E=2 (with epoch 0)"] = (engine_step(cfg, 2, weights=[w, init]), True)
            if unflushed:
                rows["E=2, no flush"] = (engine_step(cfg, 2, weights=[w, init]), False)
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(repeats):
            for key, (step, flush) in rows.items():
                e = 2 if key.startswith("E=2") else 1
                times[key].append(_timed(step, max(3, steps // e), flush) / e)
        med = {k: statistics.median(v) for k, v in times.items()}
        for key, ms in med.items():
            print(f"{epoch:>7} {key:<22} {ms:>19.2f} {med['baseline'] / ms:>8.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=["nanda", "quick", "all"], default="all")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ensembles", type=int, nargs="*", default=[], metavar="E")
    parser.add_argument("--memory", type=int, nargs="*", default=[], metavar="E")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: both paths run there")
    parser.add_argument("--tf32", action="store_true",
                        help="also time each ensemble with TF32 matmuls (GPU; circuits train uses float32)")
    parser.add_argument("--run", help="time both paths from this run folder's checkpoints")
    parser.add_argument("--at", type=int, nargs="*", default=[0, 2000, 6000, 10000, 12000, 30000],
                        metavar="EPOCH", help="with --run: the checkpoints nearest these epochs")
    parser.add_argument("--unflushed", action="store_true",
                        help="with --run: also time our step without flushing subnormals")
    parser.add_argument("--mixed", action="store_true",
                        help="with --run: also an ensemble of that checkpoint and the initialisation")
    args = parser.parse_args()
    keep_freed_memory()  # process-wide: the baseline gets the same allocator behaviour
    # No deterministic mode here: the baseline is what a notebook runs (with it, the baseline's
    # embedding backward slows to ~300 ms and the ratio would flatter us). circuits train runs
    # under it; on our step its cost is within this machine's noise.
    names = ["nanda", "quick"] if args.preset == "all" else [args.preset]
    if args.run:
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        time_phases(args.run, args.at, args.steps, args.repeats, args.unflushed, args.mixed)
        return
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device} float32 matmul {matmul_gflops(args.device):.0f} GFLOP/s")
    for name in names:
        cfg = preset(name)
        dev = args.device
        steps = {"baseline": baseline_step(cfg, dev), "fused": engine_step(cfg, 1, dev)}
        if dev != "cpu":  # what the CUDA graph buys
            steps["eager"] = engine_step(cfg, 1, dev, graph=False)
        steps.update({f"E={e}": engine_step(cfg, e, dev) for e in args.ensembles})
        if args.tf32:
            steps.update({f"E={e} tf32": engine_step(cfg, e, dev, tf32=True) for e in args.ensembles})
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.repeats):
            for key, step in steps.items():
                e = int(key[2:].split()[0]) if key.startswith("E=") else 1
                times[key].append(time_ms(step, max(3, args.steps // e)) / e)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["baseline"]
        print(f"\n{name}: n_train {cfg.task.n_train}; FLOPs/epoch fused "
              f"{flops_per_epoch(cfg, 'fused', dev) / 1e9:.2f} G, baseline "
              f"{flops_per_epoch(cfg, 'baseline') / 1e9:.2f} G")
        print(f"{'path':<12} {'ms per model-epoch':>19} {'speed-up':>9} {'GFLOP/s':>8}")
        for key, ms in med.items():
            engine = "baseline" if key == "baseline" else "fused"
            rate = flops_per_epoch(cfg, engine, dev) / (ms / 1000) / 1e9
            print(f"{key:<12} {ms:>19.4f} {base / ms:>8.2f}x {rate:>8.1f}")
        if dev != "cpu":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        for e in args.memory:
            print(f"peak RSS, {e}-member {name} ensemble: {peak_memory_mb(name, e):.0f} MB")


if __name__ == "__main__":
    main()
