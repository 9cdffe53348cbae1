"""Time one full-batch training epoch: our default (fused) path vs the plain hooked-model loop.

Baseline (design.md): the hooked model trained eagerly with ``torch.optim.AdamW`` and a float64
loss, train step only (forward, backward, optimizer), no evaluation on either side. Both run in
this process, on the same machine, interleaved, so the ratio is fair.

    python benchmarks/train_step.py                 # nanda and quick presets
    python benchmarks/train_step.py --preset nanda --steps 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from circuits.config import preset
from circuits.engine.fused import last_logits
from circuits.model import make_model
from circuits.tasks import make_task
from circuits.trainer import loss_fn


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0, foreach=False)


def time_steps(name: str, steps: int, repeats: int) -> dict[str, float]:
    cfg = preset(name)
    x, y = make_task(cfg.task).train_data()
    paths = {
        "baseline": lambda m: m(x)[:, -1],
        "fused": lambda m: last_logits(m, x),
    }
    models = {k: make_model(cfg) for k in paths}
    opts = {k: _optimizer(m) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for key, forward in paths.items():
            model, opt = models[key], opts[key]
            for _ in range(2):  # warm-up
                loss_fn(forward(model), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss_fn(forward(model), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[key].append((time.perf_counter() - t0) / steps * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=["nanda", "quick", "all"], default="all")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = ["nanda", "quick"] if args.preset == "all" else [args.preset]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'preset':<8} {'baseline ms/epoch':>18} {'fused ms/epoch':>15} {'speed-up':>9}")
    for name in names:
        t = time_steps(name, args.steps, args.repeats)
        print(f"{name:<8} {t['baseline']:>18.1f} {t['fused']:>15.1f} "
              f"{t['baseline'] / t['fused']:>8.2f}x")


if __name__ == "__main__":
    main()
