"""All p^2 inputs of many checkpoints at once: the forward pass behind every progress measure.

Analysis evaluates each checkpoint on the full (a, b) grid with the '=' token last. On that grid
the residual stream at position 0 depends on a only, at position 1 on b only, and at position 2
is constant, so attention and the first MLP matmul factor through per-token tables:

    pre[a, b] = c + Σ_h pattern[a, b, h, 0] T0[a, h] + pattern[a, b, h, 1] T1[b, h]
                  + pattern[a, b, h, 2] T2[h],       T_pos[tok, h] = V_h(tok) W_O^h W_in

which replaces the [p^2, d_model] x [d_model, d_mlp] matmul by a contraction over the heads,
an order of magnitude less work. The logits use W_L = W_out W_U the same way. The result is the
hooked model's last-position logits and MLP activations (parity is tested), for a leading
checkpoint axis ``ckpt`` of stacked weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

__all__ = ["grid_forward", "stack_state_dicts"]


def stack_state_dicts(state_dicts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack checkpoints' weights along a new leading ``ckpt`` axis."""
    keys = [k for k in state_dicts[0] if not k.endswith((".mask", ".IGNORE"))]
    return {k: torch.stack([sd[k] for sd in state_dicts]) for k in keys}


def grid_forward(
    params: Mapping[str, Tensor], p: int, act_fn: str = "relu"
) -> tuple[Float[Tensor, "ckpt pp cls"], Float[Tensor, "ckpt pp neuron"]]:
    """Last-position logits and MLP activations for every (a, b), for stacked checkpoints.

    ``params`` are stacked one-layer state dicts (:func:`stack_state_dicts`). Returns
    ``(logits [ckpt, p^2, d_vocab_out], post [ckpt, p^2, d_mlp])`` in canonical order a*p + b.
    """
    g = lambda name: params[name]  # noqa: E731
    W_E, W_pos = g("embed.W_E"), g("pos_embed.W_pos")
    W_Q, W_K, W_V, W_O = (g(f"blocks.0.attn.W_{x}") for x in "QKVO")
    b_Q, b_K, b_V, b_O = (g(f"blocks.0.attn.b_{x}") for x in "QKVO")
    W_in, b_in = g("blocks.0.mlp.W_in"), g("blocks.0.mlp.b_in")
    W_out, b_out = g("blocks.0.mlp.W_out"), g("blocks.0.mlp.b_out")
    W_U, b_U = g("unembed.W_U"), g("unembed.b_U")
    d_head = W_Q.shape[-1]
    # Residual stream before the block: a at pos 0, b at pos 1, '=' (token p) at pos 2.
    r0 = W_E[:, :p] + W_pos[:, None, 0]  # [ckpt, p, d]
    r1 = W_E[:, :p] + W_pos[:, None, 1]
    r2 = W_E[:, p] + W_pos[:, 2]  # [ckpt, d]
    q = torch.einsum("kd,khde->khe", r2, W_Q) + b_Q  # the one query that matters
    keys = [torch.einsum("ktd,khde->kthe", r, W_K) + b_K[:, None] for r in (r0, r1)]
    k2 = torch.einsum("kd,khde->khe", r2, W_K) + b_K
    s0 = torch.einsum("khe,kthe->kth", q, keys[0]) / math.sqrt(d_head)  # [ckpt, a, h]
    s1 = torch.einsum("khe,kthe->kth", q, keys[1]) / math.sqrt(d_head)  # [ckpt, b, h]
    s2 = torch.einsum("khe,khe->kh", q, k2) / math.sqrt(d_head)  # [ckpt, h]
    scores = torch.stack(
        torch.broadcast_tensors(s0[:, :, None, :], s1[:, None, :, :], s2[:, None, None, :]),
        dim=-1,
    )  # [ckpt, a, b, h, pos]
    pattern = torch.softmax(scores, dim=-1)
    # Value -> output per (position, token, head): [ckpt, tok, h, d]; pos 2 is one token.
    vo = [
        torch.einsum("ktd,khde,khem->kthm", r, W_V, W_O) + torch.einsum("khe,khem->khm", b_V, W_O)[:, None]
        for r in (r0, r1)
    ]
    vo2 = torch.einsum("kd,khde,khem->khm", r2, W_V, W_O) + torch.einsum("khe,khem->khm", b_V, W_O)
    base = r2 + b_O  # [ckpt, d]: residual at pos 2 before attention output is mixed in
    # Pre-activations through the per-token tables (see module docstring).
    t0 = torch.einsum("kthm,kmn->kthn", vo[0], W_in)
    t1 = torch.einsum("kthm,kmn->kthn", vo[1], W_in)
    t2 = torch.einsum("khm,kmn->khn", vo2, W_in)
    pre = (
        torch.einsum("kabh,kahn->kabn", pattern[..., 0], t0)
        + torch.einsum("kabh,kbhn->kabn", pattern[..., 1], t1)
        + torch.einsum("kabh,khn->kabn", pattern[..., 2], t2)
        + torch.einsum("kd,kdn->kn", base, W_in)[:, None, None]
        + b_in[:, None, None]
    )
    post = F.relu(pre) if act_fn == "relu" else F.gelu(pre)
    # Logits: direct path through the same tables, plus the MLP through W_L = W_out W_U.
    u0 = torch.einsum("kthm,kmc->kthc", vo[0], W_U)
    u1 = torch.einsum("kthm,kmc->kthc", vo[1], W_U)
    u2 = torch.einsum("khm,kmc->khc", vo2, W_U)
    direct = (
        torch.einsum("kabh,kahc->kabc", pattern[..., 0], u0)
        + torch.einsum("kabh,kbhc->kabc", pattern[..., 1], u1)
        + torch.einsum("kabh,khc->kabc", pattern[..., 2], u2)
        + (torch.einsum("kd,kdc->kc", base + b_out, W_U) + b_U)[:, None, None]
    )
    W_L = W_out @ W_U  # [ckpt, d_mlp, cls]
    n = post.shape[0]
    post = post.reshape(n, p * p, -1)
    logits = direct.reshape(n, p * p, -1) + torch.bmm(post, W_L)
    return logits, post
