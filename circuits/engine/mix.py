"""Per-token contraction of the MLP input and the unembedding: the CPU kernels of the fused step.

Before the block, the residual stream at each position is one of ``n_ctx * d_vocab`` vectors,
and the last position's ``resid_mid`` is its own residual plus a softmax-weighted sum of
per-(position, token, head) value vectors, each mapped by ``W_O``. Anything linear in
``resid_mid`` (the MLP's pre-activation, the unembedding's direct path) is then the same
weighted sum of small per-token tables:

    mix[b] = base[t_last] + sum_{h, p} pattern[b, p, h] * table[h, p, t_p]

with ``table[h, p, t] = V[p, t, h] W_O[h] [W_in | W_U]`` and ``base`` the last token's own
residual (plus biases) through ``[W_in | W_U]``. That replaces the ``d_model``-deep matmul over
the batch (and its two backward products) by a few weighted row gathers per example, which is
the issue's "apply W_in per token before the mixing" (Nanda et al. 2023 architecture; the
factorisation is exact, only float32 rounding differs). When every example shares its last
token (the "=" of every task here), the caller folds that position into ``base`` (see
:func:`circuits.engine.fused.stacked_last_logits`), leaving ``2 * n_heads`` rows per example.

PyTorch has no fast fused op for a weighted gather and its backward (``embedding_bag`` with
per-sample weights took 43 ms forward and backward at the Nanda size, against 8-11 ms for these
kernels inside the training step on the same 2-core machine), so they are small Numba kernels:
the forward, one pass for the table and pattern gradients, and the base rows' sums.
Every output element is computed by one thread in a fixed order, so the kernels give the same
bits for any thread count. CPU only: on CUDA the fused step uses dense matmuls.
"""

from __future__ import annotations

import math
from typing import no_type_check

import numba
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["MixMLPUnembed", "gather_rows"]


# Fused multiply-adds everywhere ("contract"). Reassociation only where one thread owns a whole
# row (_mix_grad_tables, whose dot products it lets LLVM vectorise with partial sums): the
# order is then fixed by the compiled code, so the bits depend on the CPU's vector width, as
# MKL's do, but never on the thread count. Kernels that split rows into column ranges by thread
# count (_mix_grad_base) must not reassociate: LLVM may then order a sum differently in its
# vector loop and its scalar tail, and an element's bits would depend on where the split put it.
# No other fast-math flag: NaN and inf behave as in torch.
# Kernels carry @no_type_check: the tests' jaxtyping import hook would otherwise wrap them in a
# runtime checker that Numba can neither compile nor cache.
_JIT = {"nogil": True, "cache": True, "fastmath": {"contract"}, "error_model": "numpy"}
_JIT_REDUCE = {**_JIT, "fastmath": {"reassoc", "contract"}}


@numba.njit(parallel=True, **_JIT)
@no_type_check
def _mix_forward(pattern, tokens, table, base, base_tokens, post, rest):  # pragma: no cover
    # Writes relu(mix[:, :d_mlp]) to post and mix[:, d_mlp:] to rest: two contiguous buffers,
    # so the W_L matmuls read post at full speed.
    n_models, batch, n_pos, n_heads = pattern.shape
    n_relu = post.shape[-1]
    for r in numba.prange(n_models * batch):
        e, b = r // batch, r % batch
        o1, o2 = post[e, b], rest[e, b]
        src = base[e, base_tokens[e, b]]
        o1[:] = src[:n_relu]
        o2[:] = src[n_relu:]
        for p in range(n_pos):
            t, w = tokens[e, b, p], pattern[e, b, p]
            h = 0
            while h + 4 <= n_heads:
                r0, r1, r2, r3 = table[e, h, p, t], table[e, h + 1, p, t], table[e, h + 2, p, t], table[e, h + 3, p, t]
                w0, w1, w2, w3 = w[h], w[h + 1], w[h + 2], w[h + 3]
                _axpy4(w0, w1, w2, w3, r0[:n_relu], r1[:n_relu], r2[:n_relu], r3[:n_relu], o1)
                _axpy4(w0, w1, w2, w3, r0[n_relu:], r1[n_relu:], r2[n_relu:], r3[n_relu:], o2)
                h += 4
            for h in range(h, n_heads):
                row = table[e, h, p, t]
                _axpy(w[h], row[:n_relu], o1)
                _axpy(w[h], row[n_relu:], o2)
        for j in range(n_relu):
            o1[j] = max(o1[j], np.float32(0.0))


@numba.njit(parallel=True, **_JIT_REDUCE)
@no_type_check
def _mix_grad_tables(
    g_post, g_rest, post, pattern, order, starts, table, g_table, g_pattern
):  # pragma: no cover
    # g_table and g_pattern together: the rows of g_mix that feed one table row are the ones
    # whose dot products with it are g_pattern, so one pass over them does both. Also masks
    # g_post in place by the ReLU (post > 0), for _mix_grad_base. The rows with token t at
    # position p are order[e, p, starts[e, p, t]:starts[e, p, t + 1]] (see _group_rows).
    n_models, _, n_pos, _ = pattern.shape
    n_vocab = table.shape[3]
    if n_pos == 0:
        return
    # One work item per (model, position, token), each a whole gradient row. Position 0 first:
    # its items visit every row of the batch once, so they apply the ReLU mask while the rows
    # are in cache, and the later positions read masked rows.
    for q in numba.prange(n_models * n_vocab):
        _table_item(
            g_post, g_rest, post, pattern, order, starts, table, g_table, g_pattern,
            q // n_vocab, 0, q % n_vocab, True,
        )
    for q in numba.prange(n_models * (n_pos - 1) * n_vocab):
        e, p, t = q // (n_vocab * (n_pos - 1)), 1 + (q // n_vocab) % (n_pos - 1), q % n_vocab
        _table_item(
            g_post, g_rest, post, pattern, order, starts, table, g_table, g_pattern, e, p, t, False
        )


@numba.njit(**_JIT_REDUCE)
@no_type_check
def _table_item(
    g_post, g_rest, post, pattern, order, starts, table, g_table, g_pattern, e, p, t, mask
):  # pragma: no cover
    n_heads, n_relu = table.shape[1], g_post.shape[-1]
    for h in range(n_heads):
        g_table[e, h, p, t] = 0
    # Four batch rows per pass: each gradient element is loaded and stored once per four
    # products (2x faster at the Nanda size than one row at a time), in batch order.
    k, last = starts[e, p, t], starts[e, p, t + 1]
    while k + 4 <= last:
        b0, b1, b2, b3 = order[e, p, k], order[e, p, k + 1], order[e, p, k + 2], order[e, p, k + 3]
        p0, p1, p2, p3 = g_post[e, b0], g_post[e, b1], g_post[e, b2], g_post[e, b3]
        q0, q1, q2, q3 = g_rest[e, b0], g_rest[e, b1], g_rest[e, b2], g_rest[e, b3]
        if mask:
            _relu_mask(p0, post[e, b0])
            _relu_mask(p1, post[e, b1])
            _relu_mask(p2, post[e, b2])
            _relu_mask(p3, post[e, b3])
        for h in range(n_heads):
            w0, w1 = pattern[e, b0, p, h], pattern[e, b1, p, h]
            w2, w3 = pattern[e, b2, p, h], pattern[e, b3, p, h]
            row, acc = table[e, h, p, t], g_table[e, h, p, t]
            s0, s1, s2, s3 = _axpy4_dot4(w0, w1, w2, w3, p0, p1, p2, p3, row[:n_relu], acc[:n_relu])
            c0, c1, c2, c3 = _axpy4_dot4(w0, w1, w2, w3, q0, q1, q2, q3, row[n_relu:], acc[n_relu:])
            g_pattern[e, b0, p, h] = s0 + c0
            g_pattern[e, b1, p, h] = s1 + c1
            g_pattern[e, b2, p, h] = s2 + c2
            g_pattern[e, b3, p, h] = s3 + c3
        k += 4
    for k in range(k, last):
        b = order[e, p, k]
        gp, gr = g_post[e, b], g_rest[e, b]
        if mask:
            _relu_mask(gp, post[e, b])
        for h in range(n_heads):
            row, acc = table[e, h, p, t], g_table[e, h, p, t]
            _axpy(pattern[e, b, p, h], gp, acc[:n_relu])
            _axpy(pattern[e, b, p, h], gr, acc[n_relu:])
            g_pattern[e, b, p, h] = _dot(gp, row[:n_relu]) + _dot(gr, row[n_relu:])


@numba.njit(parallel=True, **_JIT)
@no_type_check
def _mix_grad_base(g_post, g_rest, post, order, starts, n_split, mask, g_base):  # pragma: no cover
    # Sums the rows of g_mix per base token (masking g_post by the ReLU first if asked); the
    # rows with base token t are order[e, starts[e, t]:starts[e, t + 1]] (see _group_rows).
    n_models, _, n_relu = g_post.shape
    n_base, width = g_base.shape[1], g_base.shape[2]
    # Work items are (column range, model, token), range outermost: numba gives each thread a
    # contiguous run of items, so a batch sharing one base token is split across threads by its
    # columns. Each element is summed by one thread in batch order, however many ranges.
    step = ((width + n_split - 1) // n_split + 15) // 16 * 16
    for q in numba.prange(n_split * n_models * n_base):
        t, e, c = q % n_base, (q // n_base) % n_models, q // (n_base * n_models)
        lo, hi = min(width, c * step), min(width, (c + 1) * step)
        r_lo, r_hi = min(lo, n_relu), min(hi, n_relu)  # the range's ReLU columns: g_post
        u_lo, u_hi = max(lo, n_relu) - n_relu, max(hi, n_relu) - n_relu  # the rest: g_rest
        acc = g_base[e, t, lo:hi]
        acc[:] = 0
        for k in range(starts[e, t], starts[e, t + 1]):
            b = order[e, k]
            gp = g_post[e, b, r_lo:r_hi]
            if mask:
                _relu_mask(gp, post[e, b, r_lo:r_hi])
            _axpy(np.float32(1.0), gp, acc[: r_hi - r_lo])
            _axpy(np.float32(1.0), g_rest[e, b, u_lo:u_hi], acc[r_hi - r_lo :])


@numba.njit(inline="always", **_JIT)
@no_type_check
def _relu_mask(g, post):  # pragma: no cover
    # A select, not a branch, so it vectorises. NaN in post masks, as (post > 0) does in torch.
    for j in range(g.shape[0]):
        g[j] = g[j] if post[j] > 0 else np.float32(0.0)


@numba.njit(inline="always", **_JIT)
@no_type_check
def _axpy(a, x, y):
    # y += a * x. The kernels' ReLU and logits columns live in separate buffers, so each
    # 625-wide row update is two of these.
    for j in range(y.shape[0]):
        y[j] += a * x[j]


@numba.njit(inline="always", **_JIT)
@no_type_check
def _axpy4(a0, a1, a2, a3, x0, x1, x2, x3, y):
    # y += a0 x0 + ... + a3 x3, added in that order: one load and store of y per four
    # products, where four _axpy calls are bound by y's traffic (2x faster at the Nanda size).
    for j in range(y.shape[0]):
        y[j] = (((y[j] + a0 * x0[j]) + a1 * x1[j]) + a2 * x2[j]) + a3 * x3[j]


@numba.njit(inline="always", **_JIT_REDUCE)
@no_type_check
def _dot(x, y):
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += x[j] * y[j]
    return acc


@numba.njit(inline="always", **_JIT_REDUCE)
@no_type_check
def _axpy4_dot4(a0, a1, a2, a3, x0, x1, x2, x3, t, y):  # pragma: no cover
    # y += a0 x0 + ... + a3 x3, and returns the dot products x_i . t, in one pass over columns.
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(y.shape[0]):
        y[j] = (((y[j] + a0 * x0[j]) + a1 * x1[j]) + a2 * x2[j]) + a3 * x3[j]
        s0 += x0[j] * t[j]
        s1 += x1[j] * t[j]
        s2 += x2[j] * t[j]
        s3 += x3[j] * t[j]
    return s0, s1, s2, s3


def _group_rows(keys: Int[Tensor, "... batch"], n_keys: int) -> tuple[Tensor, Tensor]:
    """Rows grouped by key, in batch order within a key: the rows with key t are
    ``order[..., starts[..., t]:starts[..., t + 1]]``."""
    flat = keys.reshape(math.prod(keys.shape[:-1]), keys.shape[-1]).contiguous()
    order = torch.empty_like(flat)
    starts = torch.zeros(flat.shape[0], n_keys + 1, dtype=torch.int64)
    _counting_sort(flat.numpy(), order.numpy(), starts.numpy())
    return order.view(keys.shape), starts.view(*keys.shape[:-1], n_keys + 1)


@numba.njit(**_JIT)
@no_type_check
def _counting_sort(keys, order, starts):  # pragma: no cover
    # A stable counting sort per row of keys: microseconds, where torch's argsort took ~0.6 ms.
    n_keys = starts.shape[1] - 1
    for i in range(keys.shape[0]):
        for b in range(keys.shape[1]):
            starts[i, keys[i, b] + 1] += 1
        for t in range(n_keys):
            starts[i, t + 1] += starts[i, t]
        fill = starts[i, :n_keys].copy()
        for b in range(keys.shape[1]):
            order[i, fill[keys[i, b]]] = b
            fill[keys[i, b]] += 1


def _threads() -> None:
    # Numba's pool runs between torch's ops, never beside them: give it torch's thread count.
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


class MixMLPUnembed(torch.autograd.Function):
    """Last-position logits ``mix[:, d_mlp:] + relu(mix[:, :d_mlp]) W_L``, with ``W_L = W_out
    W_U`` (the MLP's path to the logits folded into one matrix) and

        mix[b] = base[base_tokens[b]] + sum_{h, p} pattern[b, p, h] * table[h, p, tokens[b, p]]

    Inputs: ``pattern [model, batch, pos, head]``, ``table [model, head, pos, vocab, width]``,
    ``base [model, n_base, width]`` (width = d_mlp + d_vocab_out), ``W_L [model, d_mlp,
    d_vocab_out]``, ``tokens [model, batch, pos]``, ``base_tokens [model, batch]``.
    Differentiable in the first four.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        pattern: Float[Tensor, "model batch pos head"],
        table: Float[Tensor, "model head pos vocab width"],
        base: Float[Tensor, "model n_base width"],
        W_L: Float[Tensor, "model d_mlp d_vocab_out"],
        tokens: Int[Tensor, "model batch pos"],
        base_tokens: Int[Tensor, "model batch"],
    ) -> Float[Tensor, "model batch d_vocab_out"]:
        _threads()
        n_models, batch = tokens.shape[:2]
        d_mlp = W_L.shape[1]
        pattern, table, base, tokens, base_tokens = (
            x.detach().contiguous() for x in (pattern, table, base, tokens, base_tokens)
        )
        post = torch.empty(n_models, batch, d_mlp, dtype=table.dtype)
        logits = torch.empty(n_models, batch, table.shape[-1] - d_mlp, dtype=table.dtype)
        _mix_forward(
            pattern.numpy(), tokens.numpy(), table.numpy(), base.numpy(), base_tokens.numpy(),
            post.numpy(), logits.numpy(),
        )
        logits.baddbmm_(post, W_L.detach())
        ctx.n_base = base.shape[1]
        ctx.save_for_backward(pattern, table, tokens, base_tokens, post, W_L)
        return logits

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_logits: Tensor
    ) -> tuple[Tensor | None, ...]:
        _threads()
        pattern, table, tokens, base_tokens, post, W_L = ctx.saved_tensors
        g_logits = g_logits.contiguous()
        g_W_L = torch.bmm(post.transpose(1, 2), g_logits)
        g_post = torch.bmm(g_logits, W_L.transpose(1, 2))
        g_pattern, g_table = torch.empty_like(pattern), torch.empty_like(table)
        g_base = torch.empty(table.shape[0], ctx.n_base, table.shape[4], dtype=table.dtype)
        order, starts = _group_rows(tokens.transpose(1, 2), table.shape[3])
        _mix_grad_tables(
            g_post.numpy(), g_logits.numpy(), post.numpy(), pattern.numpy(), order.numpy(),
            starts.numpy(), table.numpy(), g_table.numpy(), g_pattern.numpy(),
        )
        # _mix_grad_tables masked g_post, unless there was no position to do it in.
        n_split = max(1, -(-numba.get_num_threads() // table.shape[0]))
        order, starts = _group_rows(base_tokens, ctx.n_base)
        _mix_grad_base(
            g_post.numpy(), g_logits.numpy(), post.numpy(), order.numpy(), starts.numpy(),
            n_split, pattern.shape[2] == 0, g_base.numpy(),
        )
        return g_pattern, g_table, g_base, g_W_L, None, None


def gather_rows(
    idx: Int[Tensor, "*index"], table: Float[Tensor, "n width"]
) -> Float[Tensor, "*index width"]:
    """``F.embedding(idx, table)`` for the CPU, with a fast deterministic backward.

    The backward sums each table row's gradient over its indices in index order (a counting
    sort, then one thread per row), so its bits depend on neither the thread count nor the
    rest of the batch. At the Nanda size (11,490 indices into 39k four-wide rows of attention
    scores) torch's embedding took about 2 ms forward and backward, mostly its sort-based
    deterministic backward; this takes well under 0.1 ms.
    """
    return _GatherRows.apply(idx, table)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, idx: Tensor, table: Tensor
    ) -> Tensor:
        flat = idx.reshape(-1).contiguous()
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < table.shape[0]):
            raise IndexError(f"gather_rows: index out of range for a table of {table.shape[0]} rows")
        out = torch.empty(flat.numel(), table.shape[1], dtype=table.dtype)
        _gather(table.detach().contiguous().numpy(), flat.numpy(), out.numpy())
        ctx.save_for_backward(flat)
        ctx.n_rows = table.shape[0]
        return out.view(*idx.shape, table.shape[1])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_out: Tensor
    ) -> tuple[None, Tensor]:
        _threads()
        (flat,) = ctx.saved_tensors
        g = g_out.reshape(flat.numel(), g_out.shape[-1]).contiguous()
        order, starts = _group_rows(flat, ctx.n_rows)
        g_table = torch.empty(ctx.n_rows, g.shape[1], dtype=g.dtype)
        _scatter_rows(g.numpy(), order.numpy(), starts.numpy(), g_table.numpy())
        return None, g_table


@numba.njit(**_JIT)
@no_type_check
def _gather(table, idx, out):  # pragma: no cover
    for i in range(idx.shape[0]):
        out[i] = table[idx[i]]


@numba.njit(parallel=True, **_JIT)
@no_type_check
def _scatter_rows(g, order, starts, g_table):  # pragma: no cover
    for n in numba.prange(g_table.shape[0]):
        acc = g_table[n]
        acc[:] = 0
        for k in range(starts[n], starts[n + 1]):
            acc += g[order[k]]
