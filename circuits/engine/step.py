"""One full-batch update of a stack of models, as the training loop runs it.

On the CPU the update runs eagerly. On a GPU one update of a single Nanda-sized run is a few
hundred small kernels (forward, backward, loss and AdamW), most of them far shorter than
its launch: the device would mostly wait on Python. So on CUDA the update is captured once
into a CUDA graph (``torch.cuda.CUDAGraph``) and replayed each epoch, with one launch from the
host. Replay runs the captured kernels on the same buffers, so it computes exactly what the
eager update computes (checked bit for bit on a GPU in ``tests/test_ensemble.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.engine.loss import stacked_loss
from circuits.engine.fused import has_shared_query, stacked_last_logits
from circuits.engine.stacked import StackedOptimizer

__all__ = ["TrainStep"]

#: Eager updates before the capture: the first calls set up cuBLAS handles and workspaces,
#: which must not happen inside a capture (PyTorch's CUDA-graph guide does the same).
WARMUP_STEPS = 3


class TrainStep:
    """Calling it takes one update of every member on its own full batch.

    ``graph``: capture the update into a CUDA graph (default: on CUDA devices). The first
    :data:`WARMUP_STEPS` calls run eagerly on a side stream, the next one captures and
    replays. If the capture fails the step warns once and stays eager. ``forward`` replaces
    the fused forward (``params, tokens -> last-position logits``): benchmarks train the hooked
    model's own forward with it.
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        opt: StackedOptimizer,
        tokens: Int[Tensor, "model batch pos"],
        labels: Int[Tensor, "model batch"],
        weights: Float[Tensor, "model batch"],
        act_fn: str,
        graph: bool | None = None,
        forward: Callable[[dict[str, Tensor], Tensor], Tensor] | None = None,
    ) -> None:
        self.params, self.opt, self.act_fn, self.forward = params, opt, act_fn, forward
        self.tokens, self.labels, self.weights = tokens, labels, weights
        # Read once here: inside the step it would be a host sync, which a capture forbids.
        self.shared_query = has_shared_query(tokens)
        on_cuda = tokens.device.type == "cuda"
        if graph and not on_cuda:
            raise ValueError("CUDA graphs need the stack on a CUDA device")
        # Grokfast's filters and SGD's first momentum step keep state on the host: eager.
        self.use_graph = (on_cuda and opt.capturable) if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def _update(self) -> None:
        if self.forward is not None:
            logits = self.forward(self.params, self.tokens)
        else:
            logits = stacked_last_logits(
                self.params, self.tokens, self.act_fn, shared_query=self.shared_query
            )
        stacked_loss(logits, self.labels, self.weights).backward()
        self.opt.step()

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.use_graph:
            self._update()
            self.opt.zero_grad()
            return
        if self.calls <= WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._update()
                self.opt.zero_grad()
            torch.cuda.current_stream().wait_stream(side)
            return
        # Gradients set to None now are allocated inside the capture, in the graph's own memory
        # pool, so every replay writes them at the same addresses.
        self.opt.zero_grad()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._update()
        except RuntimeError as err:  # a capture runs nothing, so no update was taken
            warnings.warn(f"CUDA graph capture failed, training eagerly: {err}", stacklevel=2)
            self.use_graph = False
            self.opt.zero_grad()
            self._update()
            self.opt.zero_grad()
            return
        self.graph = graph
        graph.replay()
