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
per-sample weights took 43 ms forward and backward at the Nanda size, against 9-16 ms for these
kernels on the same 2-core machine), so the three loops are small Numba kernels.
Every output element is computed by one thread in a fixed order, so the kernels give the same
bits for any thread count. CPU only: on CUDA the fused step uses dense matmuls.
"""

from __future__ import annotations

from typing import no_type_check

import numba
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["MixMLPUnembed"]


# Fused multiply-adds everywhere ("contract"). Reassociation only where a thread reduces a
# whole row (the dot products of _mix_grad_pattern): it lets LLVM vectorise them with 8 partial
# sums on AVX2, an order fixed by the compiled code, so the bits depend on the CPU's vector width,
# as MKL's do, but never on the thread count. The row updates need no reassociation to vectorise,
# and must not have it: _mix_grad_tables splits rows into column ranges by thread count, and
# with reassociation LLVM may order _axpy4's four products differently in its vector loop and
# its scalar tail, so an element's bits would depend on where the split put it. No other
# fast-math flag: NaN and inf behave as in torch.
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
def _mix_grad_pattern(g_post, g_rest, post, tokens, table, g_pattern):  # pragma: no cover
    # Also masks g_post in place by the ReLU (post > 0), for _mix_grad_tables.
    n_models, batch, n_pos, n_heads = g_pattern.shape
    n_relu = g_post.shape[-1]
    for r in numba.prange(n_models * batch):
        e, b = r // batch, r % batch
        gp, gr, o = g_post[e, b], g_rest[e, b], post[e, b]
        for j in range(n_relu):
            if not o[j] > 0:
                gp[j] = 0
        for p in range(n_pos):
            t, out = tokens[e, b, p], g_pattern[e, b, p]
            h = 0
            while h + 4 <= n_heads:
                r0, r1, r2, r3 = table[e, h, p, t], table[e, h + 1, p, t], table[e, h + 2, p, t], table[e, h + 3, p, t]
                a0, a1, a2, a3 = _dot4(gp, r0[:n_relu], r1[:n_relu], r2[:n_relu], r3[:n_relu])
                c0, c1, c2, c3 = _dot4(gr, r0[n_relu:], r1[n_relu:], r2[n_relu:], r3[n_relu:])
                out[h], out[h + 1], out[h + 2], out[h + 3] = a0 + c0, a1 + c1, a2 + c2, a3 + c3
                h += 4
            for h in range(h, n_heads):
                row = table[e, h, p, t]
                out[h] = _dot(gp, row[:n_relu]) + _dot(gr, row[n_relu:])


@numba.njit(parallel=True, **_JIT)
@no_type_check
def _mix_grad_tables(
    g_post, g_rest, pattern, tokens, base_tokens, n_split, g_table, g_base
):  # pragma: no cover
    n_models, batch, n_pos, n_heads = pattern.shape
    n_keys = max(g_table.shape[3], g_base.shape[1])
    n_relu, width = g_post.shape[-1], g_table.shape[-1]
    # Rows grouped by token, per (model, position), and by base token as position n_pos:
    # a counting sort that keeps batch order.
    order = np.empty((n_models, n_pos + 1, batch), np.int64)
    starts = np.zeros((n_models, n_pos + 1, n_keys + 1), np.int64)
    for q in numba.prange(n_models * (n_pos + 1)):
        e, p = q // (n_pos + 1), q % (n_pos + 1)
        keys = tokens[e, :, p] if p < n_pos else base_tokens[e]
        for b in range(batch):
            starts[e, p, keys[b] + 1] += 1
        for t in range(n_keys):
            starts[e, p, t + 1] += starts[e, p, t]
        fill = starts[e, p, :n_keys].copy()
        for b in range(batch):
            order[e, p, fill[keys[b]]] = b
            fill[keys[b]] += 1
    # Work items are (column range, model, position, token), range outermost: numba gives each
    # thread a contiguous run of items, so a position with one token in every row is split
    # across threads by its columns. One thread owns each gradient row's range and adds rows in
    # batch order: every element's sum has the same order however many ranges there are.
    step = ((width + n_split - 1) // n_split + 15) // 16 * 16
    for q in numba.prange(n_split * n_models * (n_pos + 1) * n_keys):
        t = q % n_keys
        p = (q // n_keys) % (n_pos + 1)
        e = (q // (n_keys * (n_pos + 1))) % n_models
        c = q // (n_keys * (n_pos + 1) * n_models)
        lo, hi = min(width, c * step), min(width, (c + 1) * step)
        r_lo, r_hi = min(lo, n_relu), min(hi, n_relu)  # the range's ReLU columns: g_post
        u_lo, u_hi = max(lo, n_relu) - n_relu, max(hi, n_relu) - n_relu  # the rest: g_rest
        n_r = r_hi - r_lo
        if p < n_pos:
            if t >= g_table.shape[3]:
                continue
            n_rows = n_heads
        elif t < g_base.shape[1]:
            n_rows = 1
        else:
            continue
        for h in range(n_rows):
            _row(g_table, g_base, e, h, p, t, lo, hi)[:] = 0
        # Four batch rows per pass: each gradient element is loaded and stored once per four
        # products, not once per product (2x faster at the Nanda size), and the sum's order is
        # still batch order.
        k, last = starts[e, p, t], starts[e, p, t + 1]
        while k + 4 <= last:
            b0, b1, b2, b3 = order[e, p, k], order[e, p, k + 1], order[e, p, k + 2], order[e, p, k + 3]
            p0, p1 = g_post[e, b0, r_lo:r_hi], g_post[e, b1, r_lo:r_hi]
            p2, p3 = g_post[e, b2, r_lo:r_hi], g_post[e, b3, r_lo:r_hi]
            q0, q1 = g_rest[e, b0, u_lo:u_hi], g_rest[e, b1, u_lo:u_hi]
            q2, q3 = g_rest[e, b2, u_lo:u_hi], g_rest[e, b3, u_lo:u_hi]
            for h in range(n_rows):
                acc = _row(g_table, g_base, e, h, p, t, lo, hi)
                if p < n_pos:
                    w0, w1, w2, w3 = pattern[e, b0, p, h], pattern[e, b1, p, h], pattern[e, b2, p, h], pattern[e, b3, p, h]
                else:
                    w0 = w1 = w2 = w3 = np.float32(1.0)
                _axpy4(w0, w1, w2, w3, p0, p1, p2, p3, acc[:n_r])
                _axpy4(w0, w1, w2, w3, q0, q1, q2, q3, acc[n_r:])
            k += 4
        for k in range(k, last):
            b = order[e, p, k]
            for h in range(n_rows):
                acc = _row(g_table, g_base, e, h, p, t, lo, hi)
                w0 = pattern[e, b, p, h] if p < n_pos else np.float32(1.0)
                _axpy(w0, g_post[e, b, r_lo:r_hi], acc[:n_r])
                _axpy(w0, g_rest[e, b, u_lo:u_hi], acc[n_r:])


@numba.njit(inline="always", **_JIT)
@no_type_check
def _row(g_table, g_base, e, h, p, t, lo, hi):
    # The gradient row a _mix_grad_tables work item accumulates: a table row, or the base
    # row for position n_pos.
    return g_table[e, h, p, t, lo:hi] if p < g_table.shape[2] else g_base[e, t, lo:hi]


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
def _dot4(x, y0, y1, y2, y3):
    # Four dot products sharing x: one load of x per four products.
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(x.shape[0]):
        s0 += x[j] * y0[j]
        s1 += x[j] * y1[j]
        s2 += x[j] * y2[j]
        s3 += x[j] * y3[j]
    return s0, s1, s2, s3


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
        g_pattern = torch.empty_like(pattern)
        _mix_grad_pattern(
            g_post.numpy(), g_logits.numpy(), post.numpy(), tokens.numpy(), table.numpy(),
            g_pattern.numpy(),
        )
        g_table = torch.empty_like(table)
        g_base = torch.empty(table.shape[0], ctx.n_base, table.shape[4], dtype=table.dtype)
        n_split = max(1, -(-numba.get_num_threads() // table.shape[0]))
        _mix_grad_tables(
            g_post.numpy(), g_logits.numpy(), pattern.numpy(), tokens.numpy(),
            base_tokens.numpy(), n_split, g_table.numpy(), g_base.numpy(),
        )
        return g_pattern, g_table, g_base, g_W_L, None, None
