"""Clauw et al.'s (2024) fully connected network: one hidden ReLU layer on concatenated one-hots.

f(a, b) = W_U^T ReLU(W_in^T [onehot(a); onehot(b)] + b_in): Clauw, Stramaglia and Marinazzo,
"Information-theoretic progress measures reveal grokking is an emergent phase transition"
(2024, §3; their ``fcn_250``: 250 hidden units, p = 97). Concatenated one-hots make W_in two
embedding tables, one per operand: row a of ``hidden.W_in`` and row n + b. Hooks, TransformerLens
style: ``hidden.hook_pre`` and ``hidden.hook_post`` (the activations their O-information reads).
It takes the tasks' ``[a, b, =]`` inputs and returns logits ``[batch, 1, classes]`` (one
position, the answer), so the training loop, ``run.model(epoch)`` and the analysis read it as
they read the transformer; the fused engine does not implement it (``--engine reference``).
Initialisation: PyTorch's ``nn.Linear`` default (uniform in +-1/sqrt(fan_in), weights and
b_in), seeded, which is what Clauw et al. trained; ``init_scale`` (Omnigrok's alpha) multiplies
the weights.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from circuits.config import ModelConfig, TaskConfig

__all__ = ["FullyConnected"]


class Hidden(nn.Module):
    """The hidden layer: ``W_in [2 n, d_mlp]`` (a's rows, then b's), ``b_in [d_mlp]``."""

    def __init__(self, n_inputs: int, d_mlp: int) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(n_inputs, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()


class Unembed(nn.Module):
    """The readout ``W_U [d_mlp, classes]`` (no bias: Clauw et al.'s f = W_2 ReLU(W_1 x + b_1))."""

    def __init__(self, d_mlp: int, d_vocab_out: int) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_mlp, d_vocab_out))


class FullyConnected(HookedRootModule):
    """Clauw et al.'s (2024) FCN for ``[a, b, =]`` tasks (module docstring). ``config``,
    ``task_config``, ``d_vocab``, ``d_vocab_out``, ``n_ctx`` and ``epoch`` as the transformer's."""

    def __init__(self, cfg: ModelConfig, d_vocab: int, d_vocab_out: int, n_ctx: int = 3,
                 task_config: TaskConfig | None = None) -> None:
        super().__init__()
        if n_ctx != 3:
            raise ValueError(f"the fully connected network reads inputs [a, b, =]; these have {n_ctx} tokens")
        self.config = cfg
        self.task_config = task_config
        self.epoch: int | None = None
        self.d_vocab, self.d_vocab_out, self.n_ctx = d_vocab, d_vocab_out, n_ctx
        self.n_elements = d_vocab - 1  # the element tokens; the last is '='
        self.hidden = Hidden(2 * self.n_elements, cfg.d_mlp)
        self.unembed = Unembed(cfg.d_mlp, d_vocab_out)
        self.init_weights()
        for name, param in self.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.requires_grad_(cfg.train_biases)
        self.setup()
        self.eval()

    def init_weights(self) -> None:
        """PyTorch's ``nn.Linear`` default: uniform in +-1/sqrt(fan_in) for the weights and
        b_in (fan_in 2n one-hot inputs, then d_mlp), drawn in ``named_parameters`` order from a
        generator seeded with ``cfg.seed``; then ``init_scale`` multiplies every weight."""
        gen = torch.Generator().manual_seed(self.config.seed)
        fan_in = {"hidden.W_in": 2 * self.n_elements, "hidden.b_in": 2 * self.n_elements,
                  "unembed.W_U": self.config.d_mlp}
        with torch.no_grad():
            for name, param in self.named_parameters():
                bound = 1.0 / math.sqrt(fan_in[name])
                param.copy_(torch.rand(param.shape, generator=gen, dtype=param.dtype) * 2 * bound - bound)
                if "W_" in name and self.config.init_scale != 1.0:
                    param.mul_(self.config.init_scale)

    @property
    def W_in(self) -> Float[Tensor, "inputs d_mlp"]:
        return self.hidden.W_in

    @property
    def W_U(self) -> Float[Tensor, "d_mlp d_vocab_out"]:
        return self.unembed.W_U

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        labels: Int[Tensor, " batch"] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Logits ``[batch, 1, classes]`` for inputs ``[a, b, =]``; ``return_type`` as the
        transformer's (``"logits"``, ``"loss"``, ``"both"``, None; float64 cross-entropy)."""
        check_return_type(return_type)
        a, b = tokens[:, 0], tokens[:, 1]
        W_in = self.hidden.W_in
        pre = self.hidden.hook_pre(W_in[a] + W_in[self.n_elements + b] + self.hidden.b_in)
        post = self.hidden.hook_post(F.relu(pre))
        logits = (post @ self.unembed.W_U)[:, None]
        return task_output(self, tokens, logits, return_type, loss_per_token, labels)

    def answers(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """The task's answer for each input ``[a, b, =]``, from its table."""
        if self.task_config is None:
            raise ValueError("this model does not know its task: pass labels=..., or build it with "
                             "make_model(config) or run.model(epoch)")
        n = self.n_elements
        a, b = tokens[:, 0].cpu(), tokens[:, 1].cpu()
        if bool(((a < 0) | (a >= n) | (b < 0) | (b >= n)).any()):
            raise ValueError(f"inputs must be [a, b, =] with a, b in 0..{n - 1}")
        return answer_table(self.task_config)[a * n + b]

    def run_with_cache(self, *args: object, **kwargs: object) -> tuple[object, object]:
        """``(output, cache)``: the cache a dict of hook name -> activation."""
        return super().run_with_cache(*args, **kwargs)


def check_return_type(return_type: str | None) -> None:
    """Refuse a ``return_type`` that ``forward`` of either architecture does not know."""
    if return_type not in ("logits", "loss", "both", None):
        raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")


def task_output(
    model: nn.Module, tokens: Int[Tensor, "batch pos"], logits: Float[Tensor, "batch out_pos cls"],
    return_type: str | None, loss_per_token: bool, labels: Int[Tensor, " batch"] | None,
) -> Tensor | tuple[Tensor, Tensor] | None:
    """What ``forward`` returns, for either architecture: the logits, the task's float64
    cross-entropy at the answer position against ``labels`` or ``model.answers(tokens)`` (mean,
    or per example), both, or None."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    y = model.answers(tokens) if labels is None else labels
    nll = F.cross_entropy(logits[:, -1].double(), y.to(logits.device), reduction="none")
    loss = nll if loss_per_token else nll.mean()
    return loss if return_type == "loss" else (logits, loss)


@lru_cache(maxsize=8)
def answer_table(task: TaskConfig) -> Tensor:
    """The task's answers on its canonical grid (what ``answers`` reads)."""
    from circuits.tasks import make_task

    return make_task(task).labels
