"""All p^2 inputs of many checkpoints at once: the forward pass behind every progress measure.

Analysis evaluates each checkpoint on the full (a, b) grid with the '=' token last. On that grid
the residual stream at position 0 depends on a only, at position 1 on b only, and at position 2
is constant, so attention needs no per-input work beyond its softmax:

    resid_mid[a, b] = r2 + b_O + Σ_h pattern[a, b, h, 0] VO0[a, h]
                      + pattern[a, b, h, 1] VO1[b, h] + pattern[a, b, h, 2] VO2[h]

with VO_pos[tok, h] = (r_pos(tok) W_V^h + b_V^h) W_O^h, a table of (p + 1) x heads rows. Only the
query of the last position is formed. The MLP and unembedding then run as batched matmuls over
a leading checkpoint axis, the logits through W_L = W_out W_U. (Contracting W_in per token as
well was measured slower on a CPU: the outputs are 4x wider than the residual, and the
[.., d_model] x [d_model, d_mlp] matmul runs near peak while the 4-term sums are memory-bound.)
The result equals the hooked model's last-position logits and MLP activations (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.model import is_buffer_key

if TYPE_CHECKING:
    from circuits.config import RunConfig
    from circuits.tasks import Task

__all__ = ["grid_blocks", "grid_forward", "grid_layout", "grid_problem", "grid_pattern", "grid_resid_mid", "stack_state_dicts", "Layout"]


def stack_state_dicts(state_dicts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack checkpoints' weights along a new leading ``ckpt`` axis."""
    keys = [k for k in state_dicts[0] if not is_buffer_key(k)]
    return {k: torch.stack([sd[k] for sd in state_dicts]) for k in keys}


class _AttentionTables(NamedTuple):
    pattern: Tensor  # [ckpt, a, b, head, pos]: the last query's attention over positions 0-2
    vo0: Tensor  # [ckpt, a, head, d_model]: head outputs for token a at position 0
    vo1: Tensor  # [ckpt, b, head, d_model]
    vo2: Tensor  # [ckpt, head, d_model]: the '=' token at position 2
    const: Tensor  # [ckpt, d_model]: '=' residual + b_O


Layout = Union[int, "Task"]
"""Whose grid: a :class:`circuits.tasks.Task` (its elements and '=' token), or for a modular
task its p (elements 0..p-1, '=' is token p)."""


def grid_problem(config: RunConfig) -> str | None:
    """Why the grid forward cannot read runs of ``config`` (None: it can). It is the one-block
    computation above: a one-layer transformer, no LayerNorm, inputs ``[a, b, =]``."""
    if config.model.arch != "transformer":
        return f"it reads a one-layer transformer (the grid forward); this model is arch {config.model.arch}"
    if config.model.n_layers != 1:
        return f"it reads a one-layer transformer (the grid forward, blocks.0); this model has n_layers = {config.model.n_layers}"
    if config.model.normalization != "none":
        return "it reads a transformer without LayerNorm (the grid forward); this model has LayerNorm"
    if config.task.n_ctx != 3:
        return (f"it reads inputs [a, b, =] (the grid forward); this task's inputs have {config.task.n_ctx} tokens "
                "([a, op, b, =]: a mixture)")
    return None


def grid_layout(of: Layout) -> tuple[int, int]:
    """``(n_elements, eq_token)`` of a task, or of the modular task of modulus ``of``."""
    if isinstance(of, int):
        return of, of
    if of.n_ctx != 3:
        raise ValueError(f"the grid forward reads inputs [a, b, =]; this task's have {of.n_ctx} tokens")
    return of.n_elements, of.eq_token


def grid_pattern(params: Mapping[str, Tensor], task: Layout) -> Float[Tensor, "ckpt n n head pos"]:
    """The '=' query's attention over the three key positions on the (a, b) grid.

    The key at position 0 depends on a only and the key at position 1 on b only, so the scores
    are per-token tables broadcast over the grid; equal to the hooked model's
    ``blocks.0.attn.hook_pattern[:, :, -1]`` for every input (tested).
    """
    n, eq = grid_layout(task)
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_Q, W_K = params["blocks.0.attn.W_Q"], params["blocks.0.attn.W_K"]
    b_Q, b_K = params["blocks.0.attn.b_Q"], params["blocks.0.attn.b_K"]
    scale = math.sqrt(W_Q.shape[-1])
    r0 = W_E[:, :n] + W_pos[:, None, 0]  # a at position 0: [ckpt, n, d]
    r1 = W_E[:, :n] + W_pos[:, None, 1]  # b at position 1
    r2 = W_E[:, eq] + W_pos[:, 2]  # '=' at position 2: [ckpt, d]
    q = torch.einsum("kd,khde->khe", r2, W_Q) + b_Q
    k0 = torch.einsum("ktd,khde->kthe", r0, W_K) + b_K[:, None]
    k1 = torch.einsum("ktd,khde->kthe", r1, W_K) + b_K[:, None]
    k2 = torch.einsum("kd,khde->khe", r2, W_K) + b_K
    s0 = torch.einsum("khe,kthe->kth", q, k0) / scale  # [ckpt, a, h]
    s1 = torch.einsum("khe,kthe->kth", q, k1) / scale  # [ckpt, b, h]
    s2 = torch.einsum("khe,khe->kh", q, k2) / scale
    scores = torch.stack(
        torch.broadcast_tensors(s0[:, :, None], s1[:, None, :], s2[:, None, None]), dim=-1
    )  # [ckpt, a, b, h, pos]; the last query sees every position
    return torch.softmax(scores, dim=-1)


def _attention_tables(params: Mapping[str, Tensor], task: Layout) -> _AttentionTables:
    n, eq = grid_layout(task)
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_V, W_O = params["blocks.0.attn.W_V"], params["blocks.0.attn.W_O"]
    b_V, b_O = params["blocks.0.attn.b_V"], params["blocks.0.attn.b_O"]
    r0 = W_E[:, :n] + W_pos[:, None, 0]
    r1 = W_E[:, :n] + W_pos[:, None, 1]
    r2 = W_E[:, eq] + W_pos[:, 2]
    bvo = torch.einsum("khe,khem->khm", b_V, W_O)
    return _AttentionTables(
        pattern=grid_pattern(params, task),
        vo0=torch.einsum("ktd,khde,khem->kthm", r0, W_V, W_O) + bvo[:, None],
        vo1=torch.einsum("ktd,khde,khem->kthm", r1, W_V, W_O) + bvo[:, None],
        vo2=torch.einsum("kd,khde,khem->khm", r2, W_V, W_O) + bvo,
        const=r2 + b_O,
    )


def _resid_rows(t: _AttentionTables, a0: int, a1: int) -> Float[Tensor, "ckpt rows d_model"]:
    """Residual stream after attention for the pairs a0 <= a < a1, all b (canonical order)."""
    pattern = t.pattern[:, a0:a1]  # [k, m, b, h, pos]
    out = torch.matmul(pattern[..., 0], t.vo0[:, a0:a1])  # [k,m,b,h] @ [k,m,h,d]
    out += torch.matmul(pattern[..., 1].transpose(1, 2), t.vo1).transpose(1, 2)
    out += torch.matmul(pattern[..., 2], t.vo2[:, None])
    out += t.const[:, None, None]
    return out.reshape(out.shape[0], -1, out.shape[-1])


def grid_resid_mid(params: Mapping[str, Tensor], task: Layout) -> Float[Tensor, "ckpt pp d_model"]:
    """Residual stream at the last position after attention, for every (a, b)."""
    return _resid_rows(_attention_tables(params, task), 0, grid_layout(task)[0])


def grid_blocks(
    params: Mapping[str, Tensor], task: Layout, act_fn: str = "relu", block_rows: int | None = None
) -> Iterator[tuple[int, int, Float[Tensor, "ckpt rows cls"], Float[Tensor, "ckpt rows neuron"]]]:
    """The grid forward in blocks of ``block_rows`` values of a: ``(a0, a1, logits, post)``.

    Each block holds the pairs a0 <= a < a1 (rows ``a0 * p`` to ``a1 * p`` of the canonical
    order). A consumer that reduces each block before asking for the next keeps the
    [ckpt, p^2, d_mlp] activations out of main memory altogether: on a CPU the per-pair
    reductions of the analysis are memory-bound, and a block that fits the cache makes them
    several times cheaper than passes over the whole grid (benchmarks/analyze.py).
    Default: the whole grid in one block.
    """
    n, _ = grid_layout(task)
    tables = _attention_tables(params, task)
    W_in, b_in = params["blocks.0.mlp.W_in"], params["blocks.0.mlp.b_in"]
    W_out, b_out = params["blocks.0.mlp.W_out"], params["blocks.0.mlp.b_out"]
    W_U, b_U = params["unembed.W_U"], params["unembed.b_U"]
    W_L = W_out @ W_U
    bias = (b_U + torch.einsum("kd,kdc->kc", b_out, W_U))[:, None]
    step = n if block_rows is None else max(1, block_rows)
    for a0 in range(0, n, step):
        a1 = min(n, a0 + step)
        r = _resid_rows(tables, a0, a1)
        pre = torch.baddbmm(b_in[:, None], r, W_in)
        post = pre.relu_() if act_fn == "relu" else F.gelu(pre)
        logits = torch.baddbmm(torch.baddbmm(bias, r, W_U), post, W_L)
        yield a0, a1, logits, post


def grid_forward(
    params: Mapping[str, Tensor], task: Layout, act_fn: str = "relu"
) -> tuple[Float[Tensor, "ckpt pp cls"], Float[Tensor, "ckpt pp neuron"]]:
    """Last-position logits and MLP activations for every (a, b), for stacked checkpoints.

    ``params`` are stacked one-layer state dicts (:func:`stack_state_dicts`). Returns
    ``(logits [ckpt, p^2, d_vocab_out], post [ckpt, p^2, d_mlp])`` in canonical order a*p + b.
    """
    _, _, logits, post = next(grid_blocks(params, task, act_fn))
    return logits, post
