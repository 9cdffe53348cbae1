"""The hooked model: classic HookedTransformer names, hooks, a plain-torch parity reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import ActivationCache

from circuits.config import preset
from circuits.engine.fused import last_logits, stacked_last_logits
from circuits.model import make_model
from circuits.tasks import make_task
from tests.conftest import needs_cuda

# The parameter list of a HookedTransformer with normalization_type=None, 1 layer.
CLASSIC_PARAMS = {
    "embed.W_E": ("d_vocab", "d_model"),
    "pos_embed.W_pos": ("n_ctx", "d_model"),
    "blocks.0.attn.W_Q": ("n_heads", "d_model", "d_head"),
    "blocks.0.attn.W_K": ("n_heads", "d_model", "d_head"),
    "blocks.0.attn.W_V": ("n_heads", "d_model", "d_head"),
    "blocks.0.attn.W_O": ("n_heads", "d_head", "d_model"),
    "blocks.0.attn.b_Q": ("n_heads", "d_head"),
    "blocks.0.attn.b_K": ("n_heads", "d_head"),
    "blocks.0.attn.b_V": ("n_heads", "d_head"),
    "blocks.0.attn.b_O": ("d_model",),
    "blocks.0.mlp.W_in": ("d_model", "d_mlp"),
    "blocks.0.mlp.b_in": ("d_mlp",),
    "blocks.0.mlp.W_out": ("d_mlp", "d_model"),
    "blocks.0.mlp.b_out": ("d_model",),
    "unembed.W_U": ("d_model", "d_vocab_out"),
    "unembed.b_U": ("d_vocab_out",),
}
CLASSIC_HOOKS = [
    "hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
]


def _dims(cfg) -> dict[str, int]:  # noqa: ANN001
    m = cfg.model
    return {
        "d_vocab": cfg.d_vocab, "d_vocab_out": cfg.d_vocab_out, "n_ctx": 3,
        "d_model": m.d_model, "n_heads": m.n_heads, "d_head": m.d_head, "d_mlp": m.d_mlp,
    }


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_parameter_names_and_shapes_are_classic() -> None:
    cfg = preset("nanda")
    model = make_model(cfg)
    dims = _dims(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {n: tuple(dims[d] for d in ds) for n, ds in CLASSIC_PARAMS.items()}
    assert {n for n, _ in model.named_buffers()} == {"blocks.0.attn.mask", "blocks.0.attn.IGNORE"}


def test_hook_names_and_run_with_cache_shapes() -> None:
    cfg = preset("quick").replace(p=13)
    model = make_model(cfg)
    tokens = make_task(cfg.task).tokens
    logits, cache = model.run_with_cache(tokens)
    assert set(model.hook_dict) == set(CLASSIC_HOOKS)
    assert list(cache) == CLASSIC_HOOKS
    B, d, h, dh, m = len(tokens), 128, 4, 32, 512
    expected = {
        "hook_embed": (B, 3, d), "blocks.0.attn.hook_q": (B, 3, h, dh),
        "blocks.0.attn.hook_attn_scores": (B, h, 3, 3), "blocks.0.attn.hook_pattern": (B, h, 3, 3),
        "blocks.0.attn.hook_z": (B, 3, h, dh), "blocks.0.mlp.hook_post": (B, 3, m),
        "blocks.0.hook_resid_post": (B, 3, d),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert logits.shape == (B, 3, 13)


def test_cache_activations_are_consistent() -> None:
    cfg = preset("quick").replace(p=11)
    model = make_model(cfg)
    _randomise(model)
    tokens = make_task(cfg.task).tokens
    logits, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    assert torch.all(pattern[:, :, 0, 1:] == 0)  # causal: position 0 sees only itself
    mid = cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"]
    torch.testing.assert_close(cache["blocks.0.hook_resid_mid"], mid)
    post = F.relu(cache["blocks.0.mlp.hook_pre"])
    torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], post)
    out = cache["blocks.0.hook_resid_post"] @ model.W_U + model.unembed.b_U
    torch.testing.assert_close(out, logits)
    # The TransformerLens grokking demo wraps the cache and indexes it by short names.
    wrapped = ActivationCache(cache, model)
    assert torch.equal(wrapped["post", 0, "mlp"], cache["blocks.0.mlp.hook_post"])
    assert torch.equal(wrapped["pattern", 0], pattern)


def _reference_forward(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A plain-torch transformer written from the paper, independent of model.py's code."""
    sd = dict(model.named_parameters())
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][None]
    n_heads, d_model, d_head = sd["blocks.0.attn.W_Q"].shape
    outs = []
    for h in range(n_heads):
        q = x @ sd["blocks.0.attn.W_Q"][h] + sd["blocks.0.attn.b_Q"][h]
        k = x @ sd["blocks.0.attn.W_K"][h] + sd["blocks.0.attn.b_K"][h]
        v = x @ sd["blocks.0.attn.W_V"][h] + sd["blocks.0.attn.b_V"][h]
        s = q @ k.transpose(1, 2) / math.sqrt(d_head)
        s = s + torch.triu(torch.full((3, 3), -math.inf), diagonal=1)
        outs.append(torch.softmax(s, -1) @ v @ sd["blocks.0.attn.W_O"][h])
    x = x + sum(outs) + sd["blocks.0.attn.b_O"]
    hidden = torch.relu(x @ sd["blocks.0.mlp.W_in"] + sd["blocks.0.mlp.b_in"])
    x = x + hidden @ sd["blocks.0.mlp.W_out"] + sd["blocks.0.mlp.b_out"]
    return x @ sd["unembed.W_U"] + sd["unembed.b_U"]


@pytest.mark.parametrize("widths", [{}, {"d_model": 48, "n_heads": 3, "d_mlp": 40}])
def test_forward_matches_plain_reference(widths: dict) -> None:
    cfg = preset("quick").replace(p=17, **widths)
    model = make_model(cfg)
    _randomise(model, seed=1)
    model.double()  # float64 on both sides: any difference is a bug, not rounding
    tokens = make_task(cfg.task).tokens
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens), _reference_forward(model, tokens), rtol=1e-10, atol=1e-9
        )


@pytest.mark.parametrize(
    "overrides", [{}, {"act_fn": "gelu"}, {"d_model": 64, "n_heads": 2, "d_mlp": 96, "p": 23}]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "dense"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_fused_forward_and_gradients_match_hooked_model(
    overrides: dict, dtype, per_token: bool, device: str  # noqa: ANN001
) -> None:
    """Both fused paths: per-token MLP input (the CPU default for ReLU) and dense (CUDA, GELU)."""
    if per_token and (overrides.get("act_fn") == "gelu" or device != "cpu"):
        pytest.skip("the per-token path runs a ReLU MLP on the CPU")
    overrides = dict(overrides)
    cfg = preset("quick").replace(p=overrides.pop("p", 13), train_biases=True, **overrides)
    model = make_model(cfg).to(dtype)
    _randomise(model, seed=2)
    model.to(device)
    task = make_task(cfg.task)
    x, y = (t.to(device) for t in task.train_data())
    params = list(model.parameters())
    ref = model(x)[:, -1]
    ref_grads = torch.autograd.grad(F.cross_entropy(ref.double(), y), params)
    fused = last_logits(model, x, per_token=per_token)
    fused_grads = torch.autograd.grad(F.cross_entropy(fused.double(), y), params)
    # float64: the same function exactly; float32: within rounding of the logits' scale.
    # (b_K's true gradient is 0: softmax ignores a shift shared by all keys; both sides are noise.)
    rtol, scale = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(fused, ref, rtol=rtol, atol=scale * ref.abs().max().item())
    largest = max(g.abs().max().item() for g in ref_grads)
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, ref_grads):
        atol = scale * max(b.abs().max().item(), 1e-2 * largest)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("query", ["shared", "mixed", "no examples"])
def test_per_token_path_matches_hooked_model_for_any_last_token(query: str) -> None:
    """The per-token path folds the last position's value into one base row when every example
    shares its last token (the tasks' "="), and gathers it per example otherwise; both paths,
    including an ensemble of two members with different shared tokens, match the hooked model."""
    cfg = preset("quick").replace(p=13, train_biases=True)
    models = [make_model(cfg.replace(seed=s)) for s in (3, 4)]
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.d_vocab, (2, 40, 3), generator=gen)
    if query == "shared":
        tokens[0, :, -1], tokens[1, :, -1] = cfg.d_vocab - 1, 4
    elif query == "no examples":
        tokens = tokens[:, :0]
    params = {}
    for name, _ in models[0].named_parameters():
        params[name] = torch.stack([dict(m.named_parameters())[name] for m in models])
    fused = stacked_last_logits(params, tokens, "relu", per_token=True)
    target = torch.randn(fused.shape, generator=gen)
    fused_grads = torch.autograd.grad((fused * target).sum(), [m.blocks[0].mlp.W_in for m in models])
    for i, m in enumerate(models):
        ref = m(tokens[i])[:, -1]
        scale = ref.abs().max().item() if ref.numel() else 1.0
        torch.testing.assert_close(fused[i], ref, rtol=1e-4, atol=1e-5 * scale)
        (g_ref,) = torch.autograd.grad((ref * target[i]).sum(), m.blocks[0].mlp.W_in)
        torch.testing.assert_close(fused_grads[i], g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


def test_zero_ablating_attention_output_changes_logits() -> None:
    cfg = preset("quick").replace(p=11)
    model = make_model(cfg)
    tokens = make_task(cfg.task).tokens
    clean = model(tokens)
    ablated = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.hook_attn_out", lambda act, hook: torch.zeros_like(act))]
    )
    assert not torch.allclose(clean, ablated)
    assert torch.equal(model(tokens), clean)  # hooks are removed afterwards


def test_initial_loss_matches_transformerlens_demo() -> None:
    # science.md: TransformerLens demo regime (seed 999, data seed 598) starts at loss 4.7359.
    cfg = preset("nanda")
    model = make_model(cfg)
    x, y = make_task(cfg.task).train_data()
    with torch.no_grad():
        loss = F.cross_entropy(model(x)[:, -1].double(), y).item()
    assert abs(loss - 4.7359) < 5e-4


def test_initialisation_scales_and_frozen_biases() -> None:
    cfg = preset("nanda")
    model = make_model(cfg)
    std = 0.8 / math.sqrt(128)
    for name, p in model.named_parameters():
        if "W_" in name:
            assert abs(p.std().item() - std) < 0.1 * std, name
            assert p.requires_grad
        else:
            assert torch.all(p == 0) and not p.requires_grad, name
    fan = make_model(cfg.replace(init="fan", train_biases=True))
    assert abs(fan.W_U.std().item() - 1 / math.sqrt(114)) < 0.1 / math.sqrt(114)
    assert abs(fan.blocks[0].mlp.W_out.std().item() - 1 / math.sqrt(128)) < 0.1 / math.sqrt(128)
    assert fan.blocks[0].mlp.b_in.requires_grad
    assert torch.equal(make_model(cfg).W_E, model.W_E)  # seeded
    assert not torch.equal(make_model(cfg.replace(seed=1)).W_E, model.W_E)
