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

Every tensor carries a leading model axis, so an ensemble of E members is one computation; on
the CPU its matmuls run member by member (:func:`circuits.engine.stacked.member_bmm`), so each
member gets the bits it gets when trained alone. It computes the same function as
:class:`circuits.model.Transformer` up to float32 rounding (parity is tested, forward and
gradients).

Nanda et al. (2023) architecture: one block, no LayerNorm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuits.engine.mix import MixMLPUnembed, gather_rows
from circuits.engine.stacked import member_bmm
from circuits.model import Transformer

__all__ = ["last_logits", "stacked_last_logits", "has_shared_query", "supports", "model_params"]


def supports(model: Transformer) -> bool:
    """Whether the fused path implements this model (one block)."""
    return model.cfg.n_layers == 1


def model_params(model: Transformer) -> dict[str, Tensor]:
    """The model's parameters with a leading model axis of size 1 (views: gradients flow back)."""
    return {name: p.unsqueeze(0) for name, p in model.named_parameters()}


def last_logits(
    model: Transformer, tokens: Int[Tensor, "batch pos"], per_token: bool | None = None
) -> Float[Tensor, "batch d_vocab_out"]:
    """Logits at the last position, differentiable w.r.t. the model's parameters
    (``per_token``: see :func:`stacked_last_logits`)."""
    if not supports(model):
        raise ValueError("the fused engine supports n_layers = 1; use engine='reference'")
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
    rows: Int[Tensor, " model"] | None = None,
) -> Float[Tensor, "model batch d_vocab_out"]:
    """Last-position logits of a stack of one-block models.

    ``params`` maps the classic parameter names (``embed.W_E``, ``blocks.0.attn.W_Q``, ...) to
    tensors with a leading ``model`` axis; ``tokens`` holds each model's own batch (padding rows
    are fine: each row is computed independently); ``act_fn`` is the MLP's ``relu`` or ``gelu``.
    ``per_token`` picks how the MLP input and unembedding are applied: per token, before the
    attention mix (:mod:`circuits.engine.mix`; the default for a ReLU MLP on the CPU), or by
    dense matmuls over the batch (the default elsewhere). ``shared_query``: whether every
    example of each member has the same last token; ``None`` checks, which reads the tokens on
    the host (a training loop passes it once, so a CUDA graph can capture the step). ``rows``:
    each member's number of real examples when shorter batches are padded to the longest
    (default: all rows are real). On the per-token path, padding rows then get no gradient
    and leave the member's bits as they are in a stack of one.
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
    resid_rows = resid_table.reshape(n_models, n_pos * d_vocab, -1)
    k_table = _bmm(resid_rows, _heads_last(W_K)).view(n_models, n_pos, d_vocab, n_heads, d_head) + b_K[:, None, None]
    v_table = _bmm(resid_rows, _heads_last(W_V)).view(n_models, n_pos, d_vocab, n_heads, d_head) + b_V[:, None, None]
    # Keys as [model * head, d_head, pos * vocab]: one matrix per (member, head) to score against.
    keys = k_table.permute(0, 3, 4, 1, 2).reshape(n_models * n_heads, d_head, n_pos * d_vocab)

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
        q = _bmm(resid_table[member, last, query[:, 0]][:, None], _heads_last(W_Q)).view(b_Q.shape) + b_Q
        score_table = _bmm(q.reshape(n_models * n_heads, 1, d_head), keys, n_heads)
        score_table = score_table.view(n_models, n_heads, n_pos, d_vocab).permute(0, 2, 3, 1)
        score_idx = pos_tok
    else:
        q_table = _bmm(resid_table[:, last], _heads_last(W_Q)).view(n_models, d_vocab, n_heads, d_head)
        q_table = (q_table + b_Q[:, None]).permute(0, 2, 1, 3).reshape(n_models * n_heads, d_vocab, d_head)
        score_table = _bmm(q_table, keys, n_heads).view(n_models, n_heads, d_vocab, n_pos, d_vocab)
        score_table = score_table.permute(0, 2, 3, 4, 1)
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
            params, resid_table[:, last], v_table, pattern, tokens, shared_query, rows
        )
    v = F.embedding(pos_tok, v_table.reshape(-1, n_heads * d_head))
    v = v.view(n_models, batch, n_pos, n_heads, d_head)
    z = (pattern[..., None] * v).sum(dim=2)  # [model, batch, head, d_head]
    attn_out = member_bmm(
        z.reshape(n_models, batch, n_heads * d_head), W_O.reshape(n_models, n_heads * d_head, -1), b_O[:, None]
    )
    resid_last = F.embedding(
        model_idx[:, :, 0] * d_vocab + tokens[..., last], resid_table[:, last].reshape(-1, W_E.shape[2])
    )
    resid_mid = resid_last + attn_out
    if act_fn == "relu":
        return _ReluMLPUnembed.apply(resid_mid, W_in, b_in, W_out, b_out, W_U, b_U)
    post = F.gelu(member_bmm(resid_mid, W_in, b_in[:, None]))
    resid_post = resid_mid + member_bmm(post, W_out, b_out[:, None])
    return member_bmm(resid_post, W_U, b_U[:, None])


def _per_token_logits(
    params: Mapping[str, Tensor],
    resid_last_table: Float[Tensor, "model vocab d_model"],
    v_table: Float[Tensor, "model pos vocab head d_head"],
    pattern: Float[Tensor, "model batch pos head"],
    tokens: Int[Tensor, "model batch pos"],
    shared_query: bool,
    rows: Int[Tensor, " model"] | None,
) -> Float[Tensor, "model batch d_vocab_out"]:
    """The ReLU MLP and unembedding with W_in and W_U applied per token (circuits.engine.mix);
    ``shared_query``: every example of each member has the same last token; ``rows``: see
    :func:`stacked_last_logits`."""
    a, m = "blocks.0.attn.", "blocks.0.mlp."
    W_O, b_O = params[a + "W_O"], params[a + "b_O"]
    W_in, b_in, W_out, b_out = (params[m + n] for n in ("W_in", "b_in", "W_out", "b_out"))
    W_U, b_U = params["unembed.W_U"], params["unembed.b_U"]
    W_cat = torch.cat([W_in, W_U], dim=-1)  # everything linear in resid_mid, side by side
    # Each head's value vectors through W_O and on into [W_in | W_U].
    e, h, k, width = W_O.shape[0], W_O.shape[1], W_O.shape[2], W_cat.shape[2]
    head_out = _bmm(W_O.reshape(e, h * k, -1), W_cat).view(e * h, k, width)  # [model * head, ...]
    bias = torch.cat([b_in, member_bmm(b_out[:, None], W_U, b_U[:, None])[:, 0]], dim=-1)
    W_L = _bmm(W_out, W_U)
    n_models, last = tokens.shape[0], tokens.shape[2] - 1
    query = tokens[:, :1, last]  # [model, 1]
    if shared_query:
        # One query token per member (the "=" of every task here). The attention weights sum
        # to 1 over positions, so the last position's own value term folds into the base:
        # sum_p a_p T_p = T_last + sum_{p < last} a_p (T_p - T_last), one row of base, and 4
        # fewer weighted rows per example (the gradient through the softmax is unchanged).
        member = torch.arange(n_models, device=tokens.device)
        own_v = v_table[member, last, query[:, 0]]  # [model, head, d_head]
        own_out = _bmm(own_v.reshape(e * h, 1, k), head_out, h).view(e, h, width)
        # (T_p - T_last) = (v_p - v_last) W_O [W_in | W_U]: subtract d_head-wide vectors.
        table = _per_head_rows(v_table[:, :last] - own_v[:, None, None], head_out)
        resid = resid_last_table[member, query[:, 0]] + b_O  # [model, d_model]
        base = member_bmm(resid[:, None], W_cat, bias[:, None]) + own_out.sum(1, keepdim=True)
        base_tokens = torch.zeros_like(tokens[..., last])
        return MixMLPUnembed.apply(
            pattern[:, :, :last], table, base, W_L, tokens[..., :last], base_tokens, rows
        )
    table = _per_head_rows(v_table, head_out)
    base = member_bmm(resid_last_table + b_O[:, None], W_cat, bias[:, None])
    return MixMLPUnembed.apply(pattern, table, base, W_L, tokens, tokens[..., last], rows)


def _bmm(a: Tensor, b: Tensor, group: int = 1) -> Tensor:
    """:func:`member_bmm` on contiguous operands: the same kernel, so the same bits, for a
    member whatever the stack's size. (An einsum plans around size-1 axes, so a stack of one
    took differently strided matmuls than an ensemble, and its runs drifted apart.)"""
    return member_bmm(a.contiguous(), b.contiguous(), group=group)


def _heads_last(W: Float[Tensor, "model head d_model d_head"]) -> Float[Tensor, "model d_model head_x_d_head"]:
    """``W_Q``/``W_K``/``W_V`` as one matrix per member, heads side by side."""
    return W.permute(0, 2, 1, 3).reshape(W.shape[0], W.shape[2], -1)


def _per_head_rows(
    v: Float[Tensor, "model pos vocab head d_head"], head_out: Float[Tensor, "model_x_head d_head width"]
) -> Float[Tensor, "model head pos vocab width"]:
    """Each (position, token)'s value vector through its head's ``W_O [W_in | W_U]``."""
    e, p, n_vocab, h, k = v.shape
    rows = v.permute(0, 3, 1, 2, 4).reshape(e * h, p * n_vocab, k)
    return _bmm(rows, head_out, h).view(e, h, p, n_vocab, -1)


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
        post = member_bmm(resid_mid, W_in).add_(b_in[:, None]).relu_()
        resid_post = member_bmm(post, W_out, resid_mid).add_(b_out[:, None])
        logits = member_bmm(resid_post, W_U).add_(b_U[:, None])
        ctx.save_for_backward(resid_mid, post, resid_post, W_in, W_out, W_U)
        return logits

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_logits: Tensor
    ) -> tuple[Tensor | None, ...]:
        resid_mid, post, resid_post, W_in, W_out, W_U = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_resid_post = member_bmm(g_logits, _t(W_U))
        g_post = member_bmm(g_resid_post, _t(W_out))
        g_pre = torch.ops.aten.threshold_backward(g_post, post, 0)
        del g_post
        return (
            member_bmm(g_pre, _t(W_in), g_resid_post) if need[0] else None,
            member_bmm(_t(resid_mid), g_pre) if need[1] else None,
            g_pre.sum(1) if need[2] else None,
            member_bmm(_t(post), g_resid_post) if need[3] else None,
            g_resid_post.sum(1) if need[4] else None,
            member_bmm(_t(resid_post), g_logits) if need[5] else None,
            g_logits.sum(1) if need[6] else None,
        )
