"""Fused last-position forward for training (same math as the hooked model, less work).

The loss only reads the logits at the last position, and the residual stream at each position
takes one of only ``n_ctx * d_vocab`` values. So: queries come from a per-token table for the
last position only, keys and values from per-(position, token) tables gathered per example, and
the MLP and unembedding run on one row per example instead of ``n_ctx``. This cuts the largest
matmuls by ``n_ctx`` (3x) while computing the same function as
:class:`circuits.model.Transformer` up to float32 rounding (parity is tested).

Nanda et al. (2023) architecture: one block, no LayerNorm.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuits.model import Transformer

__all__ = ["last_logits", "supports"]


def supports(model: Transformer) -> bool:
    """Whether the fused path implements this model (one block)."""
    return model.cfg.n_layers == 1


def last_logits(
    model: Transformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch d_vocab_out"]:
    """Logits at the last position, differentiable w.r.t. the model's parameters."""
    if not supports(model):
        raise ValueError("the fused engine supports n_layers = 1; use engine='reference'")
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    n_pos = tokens.shape[1]
    # Residual stream before the block, for every (position, token): [pos, vocab, d_model].
    resid_table = model.embed.W_E[None, :, :] + model.pos_embed.W_pos[:n_pos, None, :]
    k_table = einops.einsum(resid_table, attn.W_K, "pos v d, h d dh -> pos v h dh") + attn.b_K
    v_table = einops.einsum(resid_table, attn.W_V, "pos v d, h d dh -> pos v h dh") + attn.b_V
    last = n_pos - 1
    q_table = einops.einsum(resid_table[last], attn.W_Q, "v d, h d dh -> v h dh") + attn.b_Q
    pos_idx = torch.arange(n_pos, device=tokens.device)
    q = q_table[tokens[:, last]]  # [batch, h, dh]
    k = k_table[pos_idx, tokens]  # [batch, pos, h, dh]
    v = v_table[pos_idx, tokens]
    scores = einops.einsum(q, k, "b h dh, b k h dh -> b h k") / math.sqrt(attn.W_Q.shape[-1])
    # The last query sees every key under the causal mask, so no masking is needed.
    pattern = F.softmax(scores, dim=-1)
    z = einops.einsum(pattern, v, "b h k, b k h dh -> b h dh")
    attn_out = einops.einsum(z, attn.W_O, "b h dh, h dh d -> b d") + attn.b_O
    resid_mid = resid_table[last][tokens[:, last]] + attn_out
    post = mlp.act(resid_mid @ mlp.W_in + mlp.b_in)
    resid_post = resid_mid + post @ mlp.W_out + mlp.b_out
    return resid_post @ model.unembed.W_U + model.unembed.b_U
