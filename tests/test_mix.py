"""The per-token kernels of the fused CPU step (circuits/engine/mix.py), against plain einsums.

The hooked-model parity tests run them at the shapes of real configs (four heads); these cover
the remainder paths too (head counts that are not a multiple of four, token groups of any size)
and the kernels' promise that the bits depend neither on the thread count (the column split of
the table gradient) nor on the other members of a stack.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.engine import mix


def _inputs(
    n_models: int, n_heads: int, dtype: np.dtype, seed: int = 0, n_pos: int = 2
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch, vocab, n_relu, n_rest, n_base = 37, 9, 21, 7, 2
    width = n_relu + n_rest
    return {
        "pattern": rng.random((n_models, batch, n_pos, n_heads)).astype(dtype),
        "tokens": rng.integers(0, vocab, (n_models, batch, n_pos)),
        "table": rng.standard_normal((n_models, n_heads, n_pos, vocab, width)).astype(dtype),
        "base": rng.standard_normal((n_models, n_base, width)).astype(dtype),
        "base_tokens": rng.integers(0, n_base, (n_models, batch)),
        "g_post": rng.standard_normal((n_models, batch, n_relu)).astype(dtype),
        "g_rest": rng.standard_normal((n_models, batch, n_rest)).astype(dtype),
    }


def _kernels(x: dict[str, np.ndarray], n_split: int) -> dict[str, np.ndarray]:
    n_models, batch, _, _ = x["pattern"].shape
    n_relu = x["g_post"].shape[-1]
    post = np.empty((n_models, batch, n_relu), x["table"].dtype)
    rest = np.empty((n_models, batch, x["g_rest"].shape[-1]), x["table"].dtype)
    mix._mix_forward(x["pattern"], x["tokens"], x["table"], x["base"], x["base_tokens"], post, rest)
    g_post, g_pattern = x["g_post"].copy(), np.empty_like(x["pattern"])
    g_table, g_base = np.empty_like(x["table"]), np.empty_like(x["base"])
    tokens = torch.from_numpy(x["tokens"]).transpose(1, 2)
    order, starts = (t.numpy() for t in mix._group_rows(tokens, x["table"].shape[3]))
    mix._mix_grad_tables(
        g_post, x["g_rest"], post, x["pattern"], order, starts, x["table"], g_table, g_pattern
    )
    order, starts = (t.numpy() for t in mix._group_rows(torch.from_numpy(x["base_tokens"]), x["base"].shape[1]))
    mask = x["pattern"].shape[2] == 0  # as MixMLPUnembed.backward calls it
    mix._mix_grad_base(g_post, x["g_rest"], post, order, starts, n_split, mask, g_base)
    return {"post": post, "rest": rest, "g_pattern": g_pattern, "g_table": g_table, "g_base": g_base}


def _reference(x: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    t = {k: v.double() if v.is_floating_point() else v for k, v in t.items()}
    n_models, _, n_pos, n_heads = t["pattern"].shape
    vocab, n_relu = t["table"].shape[3], t["g_post"].shape[-1]
    e = torch.arange(n_models)[:, None]
    # One-hot tokens make every gather and scatter a dense einsum.
    onehot = torch.nn.functional.one_hot(t["tokens"], vocab).double()  # e b p v
    base_onehot = torch.nn.functional.one_hot(t["base_tokens"], t["base"].shape[1]).double()
    mix_ = t["base"][e, t["base_tokens"]] + torch.einsum(
        "ebph,ebpv,ehpvw->ebw", t["pattern"], onehot, t["table"]
    )
    post = mix_[..., :n_relu].relu()
    g_mix = torch.cat([t["g_post"] * (post > 0), t["g_rest"]], dim=-1)
    return {
        "post": post,
        "rest": mix_[..., n_relu:],
        "g_pattern": torch.einsum("ebw,ebpv,ehpvw->ebph", g_mix, onehot, t["table"]),
        "g_table": torch.einsum("ebph,ebpv,ebw->ehpvw", t["pattern"], onehot, g_mix),
        "g_base": torch.einsum("ebn,ebw->enw", base_onehot, g_mix),
    }


@pytest.mark.parametrize(
    ("n_heads", "n_pos"), [(1, 2), (3, 2), (4, 2), (6, 2), (4, 3), (4, 0)],
    ids=["1 head", "3 heads", "4 heads", "6 heads", "3 positions", "no positions"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_equal_dense_einsums(n_heads: int, n_pos: int, dtype: np.dtype) -> None:
    x = _inputs(2, n_heads, dtype, n_pos=n_pos)
    ours, ref = _kernels(x, n_split=2), _reference(x)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for k, v in ref.items():
        torch.testing.assert_close(torch.from_numpy(ours[k]).double(), v, rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("n_heads", [3, 4])
def test_kernel_bits_depend_on_neither_thread_split_nor_stack(n_heads: int) -> None:
    alone = _inputs(1, n_heads, np.float32, seed=1)
    others = _inputs(2, n_heads, np.float32, seed=2)
    stack = {k: np.ascontiguousarray(np.concatenate([alone[k], others[k]])) for k in alone}
    base = _kernels(alone, n_split=1)
    for n_split in (2, 3):
        for k, v in _kernels(alone, n_split).items():
            assert np.array_equal(v, base[k]), (k, n_split)
    for k, v in _kernels(stack, n_split=1).items():
        assert np.array_equal(v[:1], base[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_rows_equals_embedding_forward_and_backward(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 4, generator=gen, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, 50, (2, 37, 3), generator=gen)
    idx[0, 0] = 49  # the last row, and rows no index picks
    g = torch.randn(2, 37, 3, 4, generator=gen, dtype=dtype)
    ours = mix.gather_rows(idx, table)
    (g_ours,) = torch.autograd.grad(ours, table, g)
    ref = torch.nn.functional.embedding(idx, table)
    (g_ref,) = torch.autograd.grad(ref, table, g)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-12)
    # The backward's bits depend only on each row's own indices, in order: rows of another
    # batch appended after these leave them unchanged.
    more = torch.cat([idx, torch.randint(0, 50, (1, 37, 3), generator=gen)])
    g_more = torch.cat([g, torch.zeros(1, 37, 3, 4, dtype=dtype)])
    (g_stack,) = torch.autograd.grad(mix.gather_rows(more, table), table, g_more)
    assert torch.equal(g_stack, g_ours)
    with pytest.raises(IndexError, match="out of range"):
        mix.gather_rows(torch.tensor([50]), table)
