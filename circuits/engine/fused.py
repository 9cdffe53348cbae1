"""Fused last-position forward for training, over a stack of models (same math, less work).

The loss reads only the logits at the last position, and before the block the residual stream
at each position takes one of only ``n_ctx * d_vocab`` values. So, for one model or for a stack
of ``model`` models with the same shapes (an ensemble):

* queries, keys and values come from small per-(position, token) tables;
* attention scores come from a table over (query token, key position, key token, head), so the
  per-example work is a gather of ``pos * head`` scalars instead of a batched dot product; when
  every example shares its query token (the "=" of every task here), only that token's slice;
* the value mix is an elementwise weighted sum, then one matmul with ``W_O`` over all heads;
* the MLP and unembedding run on one row per example instead of ``n_ctx``; on the CPU, their
  input side (``W_in``, and ``W_U``'s direct path) is applied per token before the attention
  mix, and ``W_out W_U`` is one matrix (:mod:`circuits.engine.mix`).

Every matmul over the batch is a batched matmul over the model axis, so an ensemble of E
members is one computation. It computes the same function as :class:`circuits.model.Transformer`
up to float32 rounding (parity is tested, forward and gradients).

Nanda et al. (2023) architecture: one block, no LayerNorm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuits.engine.mix import MixMLPUnembed, gather_rows
from circuits.model import Model, Transformer

__all__ = ["last_logits", "stacked_last_logits", "has_shared_query", "supports", "model_params"]


def supports(model: Model) -> bool:
    """Whether the fused path implements this model (a transformer of one block, no LayerNorm,
    no dropout)."""
    c = model.config
    return c.arch == "transformer" and c.n_layers == 1 and c.normalization == "none" and not c.dropout


def model_params(model: Transformer) -> dict[str, Tensor]:
    """The model's parameters with a leading model axis of size 1 (views: gradients flow back)."""
    return {name: p.unsqueeze(0) for name, p in model.named_parameters()}


def last_logits(
    model: Transformer, tokens: Int[Tensor, "batch pos"], per_token: bool | None = None
) -> Float[Tensor, "batch d_vocab_out"]:
    """Logits at the last position, differentiable w.r.t. the model's parameters
    (``per_token``: see :func:`stacked_last_logits`)."""
    if not supports(model):
        raise ValueError("the fused engine supports one block without LayerNorm or dropout; use engine='reference'")
    act_fn = model.cfg.act_fn
    return stacked_last_logits(model_params(model), tokens.unsqueeze(0), act_fn, per_token)[0]


def has_shared_query(tokens: Int[Tensor, "model batch pos"]) -> bool:
    """Whether each member's examples all end in the same token (one host read of the batch)."""
    if tokens.shape[1] == 0:
        return False
    return bool((tokens[..., -1] == tokens[:, :1, -1]).all())


def stacked_last_logits(
    params: Mapping[str, Tensor],
    tokens: Int[Tensor, "model batch pos"],
    act_fn: str = "relu",
    per_token: bool | None = None,
    shared_query: bool | None = None,
) -> Float[Tensor, "model batch d_vocab_out"]:
    """Last-position logits of a stack of one-block models.

    ``params`` maps the classic parameter names (``embed.W_E``, ``blocks.0.attn.W_Q``, ...) to
    tensors with a leading ``model`` axis; ``tokens`` holds each model's own batch (padding rows
    are fine: each row is computed independently); ``act_fn`` is the MLP's ``relu`` or ``gelu``.
    ``per_token`` picks how the MLP input and unembedding are applied: per token, before the
    attention mix (:mod:`circuits.engine.mix`; the default for a ReLU MLP on the CPU), or by
    dense matmuls over the batch (the default elsewhere). ``shared_query``: whether every
    example of each member has the same last token; ``None`` checks, which reads the tokens on
    the host (a training loop passes it once, so a CUDA graph can capture the step).
    """
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    a = "blocks.0.attn."
    W_Q, W_K, W_V, W_O = (params[a + n] for n in ("W_Q", "W_K", "W_V", "W_O"))
    b_Q, b_K, b_V, b_O = (params[a + n] for n in ("b_Q", "b_K", "b_V", "b_O"))
    m = "blocks.0.mlp."
    W_in, b_in, W_out, b_out = (params[m + n] for n in ("W_in", "b_in", "W_out", "b_out"))
    W_U, b_U = params["unembed.W_U"], params["unembed.b_U"]

    n_models, batch, n_pos = tokens.shape
    d_vocab = W_E.shape[1]
    n_heads, d_head = W_Q.shape[1], W_Q.shape[3]
    last = n_pos - 1
    # Residual stream before the block for every (position, token): [model, pos, vocab, d_model].
    resid_table = W_E[:, None] + W_pos[:, :n_pos, None]
    k_table = einops.einsum(resid_table, W_K, "e p v d, e h d k -> e p v h k") + b_K[:, None, None]
    v_table = einops.einsum(resid_table, W_V, "e p v d, e h d k -> e p v h k") + b_V[:, None, None]

    # Flat row indices into the tables: (model, position, token) and (model, query token, ...).
    model_idx = torch.arange(n_models, device=tokens.device)[:, None, None]
    pos_idx = torch.arange(n_pos, device=tokens.device)
    pos_tok = (model_idx * n_pos + pos_idx) * d_vocab + tokens  # [model, batch, pos]
    query = tokens[:, :1, last]  # [model, 1]
    # One query token per member (the "=" of every task here)? Checked once: the per-token
    # path folds on the same condition.
    if shared_query is None:
        shared_query = has_shared_query(tokens)
    if shared_query:
        # Score only the query token's row, not every query token's (1/d_vocab of the table,
        # its einsum and its gather backward).
        member = torch.arange(n_models, device=tokens.device)
        q = einops.einsum(resid_table[member, last, query[:, 0]], W_Q, "e d, e h d k -> e h k")
        score_table = einops.einsum(q + b_Q, k_table, "e h k, e p vk h k -> e p vk h")
        score_idx = pos_tok
    else:
        q_table = einops.einsum(resid_table[:, last], W_Q, "e v d, e h d k -> e v h k") + b_Q[:, None]
        score_table = einops.einsum(q_table, k_table, "e vq h k, e p vk h k -> e vq p vk h")
        score_idx = ((model_idx * d_vocab + tokens[..., last:]) * n_pos + pos_idx) * d_vocab + tokens
    score_table = score_table / math.sqrt(d_head)
    # Both give a deterministic row accumulation backward; torch's CPU one is a sort that took
    # ~2 ms an epoch at the Nanda size, against well under 0.1 ms for gather_rows.
    gather = gather_rows if tokens.device.type == "cpu" else F.embedding
    scores = gather(score_idx, score_table.reshape(-1, n_heads))  # [model, batch, pos, head]
    # The last query sees every key under the causal mask, so no masking is needed.
    pattern = scores.softmax(dim=2)
    if per_token is None:
        per_token = act_fn == "relu" and tokens.device.type == "cpu"
    if per_token:
        if act_fn != "relu" or tokens.device.type != "cpu":
            raise ValueError("the per-token MLP runs a ReLU MLP on the CPU; pass per_token=False")
        return _per_token_logits(
            params, resid_table[:, last], v_table, pattern, tokens, shared_query
        )
    v = F.embedding(pos_tok, v_table.reshape(-1, n_heads * d_head))
    v = v.view(n_models, batch, n_pos, n_heads, d_head)
    z = (pattern[..., None] * v).sum(dim=2)  # [model, batch, head, d_head]
    attn_out = torch.baddbmm(
        b_O[:, None], z.reshape(n_models, batch, n_heads * d_head),
        W_O.reshape(n_models, n_heads * d_head, -1),
    )
    resid_last = F.embedding(
        model_idx[:, :, 0] * d_vocab + tokens[..., last], resid_table[:, last].reshape(-1, W_E.shape[2])
    )
    resid_mid = resid_last + attn_out
    if act_fn == "relu":
        return _ReluMLPUnembed.apply(resid_mid, W_in, b_in, W_out, b_out, W_U, b_U)
    post = F.gelu(torch.baddbmm(b_in[:, None], resid_mid, W_in))
    resid_post = resid_mid + torch.baddbmm(b_out[:, None], post, W_out)
    return torch.baddbmm(b_U[:, None], resid_post, W_U)


def _per_token_logits(
    params: Mapping[str, Tensor],
    resid_last_table: Float[Tensor, "model vocab d_model"],
    v_table: Float[Tensor, "model pos vocab head d_head"],
    pattern: Float[Tensor, "model batch pos head"],
    tokens: Int[Tensor, "model batch pos"],
    shared_query: bool,
) -> Float[Tensor, "model batch d_vocab_out"]:
    """The ReLU MLP and unembedding with W_in and W_U applied per token (circuits.engine.mix);
    ``shared_query``: every example of each member has the same last token."""
    a, m = "blocks.0.attn.", "blocks.0.mlp."
    W_O, b_O = params[a + "W_O"], params[a + "b_O"]
    W_in, b_in, W_out, b_out = (params[m + n] for n in ("W_in", "b_in", "W_out", "b_out"))
    W_U, b_U = params["unembed.W_U"], params["unembed.b_U"]
    W_cat = torch.cat([W_in, W_U], dim=-1)  # everything linear in resid_mid, side by side
    # Each head's value vectors through W_O and on into [W_in | W_U].
    head_out = einops.einsum(W_O, W_cat, "e h k d, e d w -> e h k w")
    bias = torch.cat([b_in, torch.baddbmm(b_U[:, None], b_out[:, None], W_U)[:, 0]], dim=-1)
    W_L = torch.bmm(W_out, W_U)
    n_models, last = tokens.shape[0], tokens.shape[2] - 1
    query = tokens[:, :1, last]  # [model, 1]
    if shared_query:
        # One query token per member (the "=" of every task here). The attention weights sum
        # to 1 over positions, so the last position's own value term folds into the base:
        # sum_p a_p T_p = T_last + sum_{p < last} a_p (T_p - T_last), one row of base, and 4
        # fewer weighted rows per example (the gradient through the softmax is unchanged).
        member = torch.arange(n_models, device=tokens.device)
        own_v = v_table[member, last, query[:, 0]]  # [model, head, d_head]
        own_out = einops.einsum(own_v, head_out, "e h k, e h k w -> e h w")
        # (T_p - T_last) = (v_p - v_last) W_O [W_in | W_U]: subtract d_head-wide vectors.
        table = einops.einsum(
            v_table[:, :last] - own_v[:, None, None], head_out, "e p v h k, e h k w -> e h p v w"
        )
        resid = resid_last_table[member, query[:, 0]] + b_O  # [model, d_model]
        base = torch.baddbmm(bias[:, None], resid[:, None], W_cat) + own_out.sum(1, keepdim=True)
        base_tokens = torch.zeros_like(tokens[..., last])
        return MixMLPUnembed.apply(
            pattern[:, :, :last], table, base, W_L, tokens[..., :last], base_tokens
        )
    table = einops.einsum(v_table, head_out, "e p v h k, e h k w -> e h p v w")
    base = torch.baddbmm(bias[:, None], resid_last_table + b_O[:, None], W_cat)
    return MixMLPUnembed.apply(pattern, table, base, W_L, tokens, tokens[..., last])


def _t(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


class _ReluMLPUnembed(torch.autograd.Function):
    """``(resid_mid + relu(resid_mid W_in + b_in) W_out + b_out) W_U + b_U``, hand-differentiated.

    The same products autograd would form, but activations are updated in place and only
    ``post`` is kept for the ReLU mask (post > 0 exactly where pre > 0), which saves a few
    full-size passes over the largest activation per step (measured in benchmarks/train_step.py).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        resid_mid: Tensor, W_in: Tensor, b_in: Tensor, W_out: Tensor, b_out: Tensor,
        W_U: Tensor, b_U: Tensor,
    ) -> Tensor:
        post = torch.bmm(resid_mid, W_in).add_(b_in[:, None]).relu_()
        resid_post = torch.baddbmm(resid_mid, post, W_out).add_(b_out[:, None])
        logits = torch.bmm(resid_post, W_U).add_(b_U[:, None])
        ctx.save_for_backward(resid_mid, post, resid_post, W_in, W_out, W_U)
        return logits

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_logits: Tensor
    ) -> tuple[Tensor | None, ...]:
        resid_mid, post, resid_post, W_in, W_out, W_U = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_resid_post = torch.bmm(g_logits, _t(W_U))
        g_post = torch.bmm(g_resid_post, _t(W_out))
        g_pre = torch.ops.aten.threshold_backward(g_post, post, 0)
        del g_post
        return (
            torch.baddbmm(g_resid_post, g_pre, _t(W_in)) if need[0] else None,
            torch.bmm(_t(resid_mid), g_pre) if need[1] else None,
            g_pre.sum(1) if need[2] else None,
            torch.bmm(_t(post), g_resid_post) if need[3] else None,
            g_resid_post.sum(1) if need[4] else None,
            torch.bmm(_t(resid_post), g_logits) if need[5] else None,
            g_logits.sum(1) if need[6] else None,
        )
