"""Checkpoint store targets: the nanda run's trajectory under 0.5 GB, any checkpoint in < 20 ms.

Writes the nanda preset's full checkpoint schedule (441 files, real nanda-sized weights) into a
temporary run folder, then times loading random checkpoints: the raw state dict (read, sha256
check, parse) and a ready hooked model (``Run.model``). The baseline is ``torch.load`` of the
same weights saved with ``torch.save`` (what a notebook user would otherwise do).

    python benchmarks/checkpoints.py
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from circuits.config import preset
from circuits.model import make_model
from circuits.run import Run
from circuits.store import RunStore
from circuits.trainer import prepare_store


def main() -> None:
    cfg = preset("nanda")
    epochs = cfg.train.checkpoint_epochs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "nanda"
        store = RunStore(root)
        prepare_store(cfg, store)
        model = make_model(cfg)
        weights = {k: v for k, v in model.state_dict().items() if "W_" in k or "b_" in k}
        t0 = time.perf_counter()
        for e in epochs:
            store.write_checkpoint(e, weights)
        write_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in store.checkpoint_dir.iterdir())
        torch.save(weights, Path(tmp) / "baseline.pt")
        run = Run(root)
        rng = random.Random(0)
        sample = [rng.choice(epochs) for _ in range(50)]
        t_sd, t_model, t_base = [], [], []
        for e in sample:
            t0 = time.perf_counter()
            run.state_dict(e)
            t_sd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run.model(e, exact=True)
            t_model.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(Path(tmp) / "baseline.pt", weights_only=True)
            t_base.append(time.perf_counter() - t0)
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(f"checkpoints: {len(epochs)}, {size / 1e6:.1f} MB in all "
          f"({size / len(epochs) / 1e6:.2f} MB each), written in {write_s:.1f} s")
    print(f"load state dict (sha256-verified): {ms(t_sd):.2f} ms median; "
          f"torch.load baseline {ms(t_base):.2f} ms; ratio {ms(t_base) / ms(t_sd):.2f}x")
    print(f"load a ready hooked model (Run.model): {ms(t_model):.2f} ms median")


if __name__ == "__main__":
    main()
