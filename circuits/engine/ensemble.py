"""The fused step of a stack of runs: many models as one stacked computation.

Members share shapes (p and the model widths) and the schedule (epochs, checkpoints, logging)
and may differ in everything else: seeds, split, training-set size, operation, random labels,
learning rate, weight decay, betas, warm-up, minibatch size. Each member's batch is padded to the largest
training set with zero-weight rows, and its loss is its own mean cross-entropy (float64
log-softmax), so no member's gradient depends on another's. A single fused run is a stack of
one. The loop that drives it, saves and resumes is :mod:`circuits.trainer`'s, the same for
both engines; this module only computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from circuits.config import RunConfig
from circuits.engine.fused import stacked_last_logits
from circuits.engine.loss import split_metrics, stacked_loss
from circuits.engine.optim import Batches
from circuits.engine.stacked import StackedOptimizer, member_state, stack_models
from circuits.engine.step import TrainStep
from circuits.model import Transformer
from circuits.tasks import Task

__all__ = ["FusedStack", "stacked_loss", "evaluate_stack", "resolve_device"]

#: Bytes of MLP activations one evaluation chunk may hold; members are evaluated in chunks.
EVAL_CHUNK_BYTES = 256 * 2**20


def resolve_device(device: str | torch.device | None, engine: str = "fused") -> torch.device:
    """The torch device to train on (default CPU); a clear error when it is not available, or
    when it is not the CPU and ``engine`` is not the fused one (the hooked model trains on CPU).

    On CUDA, deterministic mode needs cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG), set
    here when the user has not chosen one, before the first cuBLAS call reads it.
    """
    try:
        dev = torch.device("cpu" if device is None else device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use cpu or cuda[:N]") from None
    if dev.type != "cpu" and engine != "fused":
        raise ValueError(f"device {str(dev)!r} needs the fused engine; the reference engine runs on the CPU")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} requested but this torch build sees no CUDA GPU; "
                             "use --device cpu")
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(dev)!r} is not supported; use cpu or cuda[:N]")
    return dev


@torch.no_grad()
def evaluate_stack(
    params: dict[str, Tensor], tasks: Sequence[Task], act_fn: str
) -> list[dict[str, float]]:
    """Each member's train/test loss (float64) and accuracy over its own split of the full grid."""
    grid = tasks[0].tokens.to(next(iter(params.values())).device)
    d_mlp = params["blocks.0.mlp.W_in"].shape[-1]
    chunk = max(1, EVAL_CHUNK_BYTES // (grid.shape[0] * d_mlp * 4))
    out: list[dict[str, float]] = []
    for lo in range(0, len(tasks), chunk):
        sub = {k: v[lo : lo + chunk] for k, v in params.items()}
        n = next(iter(sub.values())).shape[0]
        logits = stacked_last_logits(sub, grid.expand(n, -1, -1), act_fn)
        out += [split_metrics(logits[i], tasks[lo + i]) for i in range(n)]
    return out


class FusedStack:
    """One AdamW update of every member per call, as one stacked computation (the fused engine).

    Built from the members' models (their weights are copied into the stack), configs, resume
    optimizer states (empty before the first update) and tasks; ``device`` is where the stack
    lives. The same interface as :class:`circuits.engine.hooked.HookedStep`.
    """

    def __init__(
        self,
        models: Sequence[Transformer],
        configs: Sequence[RunConfig],
        opt_tensors: Sequence[dict[str, Tensor]],
        tasks: Sequence[Task],
        device: torch.device,
    ) -> None:
        self.tasks, self.act_fn = list(tasks), configs[0].model.act_fn
        self.params = stack_models(models, device)
        self.opt = StackedOptimizer(self.params, configs)
        for i, state in enumerate(opt_tensors):
            self.opt.load_member(i, state)
        x, y, w = (t.to(device) for t in _batches(self.tasks))
        self._step = TrainStep(self.params, self.opt, x, y, w, self.act_fn)  # a CUDA graph on a GPU
        # Minibatches: each update re-weights the padded training rows (1 / batch on the batch,
        # 0 elsewhere), so the loss is the batch's mean and the stacked shapes never change.
        self.batches = [Batches(len(t.train_idx), c.batch, c.model.seed) for t, c in zip(self.tasks, configs)]
        self.minibatch = not all(b.full for b in self.batches)
        self.updates = [int(c) for c in self.opt.step_count.tolist()]

    def __call__(self) -> None:
        if self.minibatch:
            w = torch.zeros_like(self._step.weights, device="cpu")
            for i, (b, u) in enumerate(zip(self.batches, self.updates)):
                idx = b.indices(u)
                w[i, idx] = 1.0 / len(idx)
            self._step.weights.copy_(w)
        self._step()
        self.updates = [u + 1 for u in self.updates]

    def evaluate(self) -> list[dict[str, float]]:
        """Each member's train/test metrics on its own split."""
        return evaluate_stack(self.params, self.tasks, self.act_fn)

    def weights(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s parameters as CPU copies."""
        return member_state(self.params, i)

    def optimizer_state(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s AdamW moments and step count in the run folder's resume layout."""
        return self.opt.member_tensors(i)


def _batches(tasks: Sequence[Task]) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked training inputs, labels and loss weights, padded to the largest training set."""
    n_max = max(len(t.train_idx) for t in tasks)
    xs, ys, ws = [], [], []
    for task in tasks:
        x, y = task.train_data()
        pad = n_max - len(y)
        xs.append(torch.cat([x, x[:1].expand(pad, -1)]))
        ys.append(torch.cat([y, y[:1].expand(pad)]))
        w = torch.full((n_max,), 1.0 / len(y), dtype=torch.float64)
        w[len(y) :] = 0.0
        ws.append(w)
    return torch.stack(xs), torch.stack(ys), torch.stack(ws)


