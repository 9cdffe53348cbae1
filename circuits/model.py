"""The transformer, on TransformerLens 4's HookedRootModule with classic HookedTransformer names.

Parameter names, shapes and hook names are those of TransformerLens' ``HookedTransformer`` with
``normalization_type=None`` (``embed.W_E``, ``blocks.0.attn.W_Q``, ``blocks.0.mlp.hook_post``,
``unembed.W_U``, ...), so grokking notebooks written against it run unchanged and a state dict
saved here loads strictly (parameters) into a TransformerLens 3.x model of the same config.
Architecture: Nanda et al. (2023), "Progress measures for grokking via mechanistic
interpretability" (1 layer, no LayerNorm, causal attention, ReLU MLP, untied unembedding).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from circuits.config import ModelConfig, RunConfig

__all__ = ["Transformer", "make_model", "is_buffer_key", "BUFFER_SUFFIXES"]


#: State-dict keys of the model's buffers (the causal mask and HookedTransformer's IGNORE),
#: rebuilt by its constructor: checkpoints and norms hold parameters only.
BUFFER_SUFFIXES = (".mask", ".IGNORE")


def is_buffer_key(key: str) -> bool:
    """Whether a state-dict key is a model buffer (attention mask, IGNORE), not a parameter."""
    return key.endswith(BUFFER_SUFFIXES)


class Embed(nn.Module):
    """Token embedding ``W_E [d_vocab, d_model]`` (rows are tokens, TransformerLens orientation)."""

    def __init__(self, d_vocab: int, d_model: int) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    """Learned positional embedding ``W_pos [n_ctx, d_model]``."""

    def __init__(self, n_ctx: int, d_model: int) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        n_pos = tokens.shape[-1]
        return einops.repeat(self.W_pos[:n_pos], "pos d -> batch pos d", batch=tokens.shape[0])


class Attention(nn.Module):
    """Causal multi-head attention with HookedTransformer's parameter and hook names."""

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        # Declaration order matters: it is the order TransformerLens initialises in, so the
        # same seed draws the same weights as a HookedTransformer.
        # (HookedTransformer registers W_K, W_V, b_K, b_V in a subclass, hence after b_O.)
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.register_buffer("mask", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)))
        self.register_buffer("IGNORE", torch.tensor(-torch.inf))
        self.attn_scale = math.sqrt(dh)
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(
            einops.einsum(resid, self.W_Q, "b pos d, h d dh -> b pos h dh") + self.b_Q
        )
        k = self.hook_k(
            einops.einsum(resid, self.W_K, "b pos d, h d dh -> b pos h dh") + self.b_K
        )
        v = self.hook_v(
            einops.einsum(resid, self.W_V, "b pos d, h d dh -> b pos h dh") + self.b_V
        )
        scores = einops.einsum(q, k, "b q h dh, b k h dh -> b h q k") / self.attn_scale
        n = resid.shape[1]
        # The Python float, not the IGNORE buffer (the same -inf): masked_fill with a tensor
        # value reads it on the host, a sync per forward on a GPU that also breaks CUDA graphs.
        scores = self.hook_attn_scores(scores.masked_fill(~self.mask[:n, :n], -math.inf))
        pattern = self.hook_pattern(F.softmax(scores, dim=-1))
        z = self.hook_z(einops.einsum(pattern, v, "b h q k, b k h dh -> b q h dh"))
        return einops.einsum(z, self.W_O, "b q h dh, h dh d -> b q d") + self.b_O


class MLP(nn.Module):
    """Two-layer MLP ``W_in [d_model, d_mlp]``, ``W_out [d_mlp, d_model]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = F.relu if cfg.act_fn == "relu" else F.gelu
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(resid @ self.W_in + self.b_in)
        post = self.hook_post(self.act(pre))
        return post @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    """Attention then MLP, each added to the residual stream (no LayerNorm)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        super().__init__()
        self.attn = Attention(cfg, n_ctx)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(resid)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(resid)))


class Unembed(nn.Module):
    """Unembedding ``W_U [d_model, d_vocab_out]`` with bias ``b_U``."""

    def __init__(self, d_model: int, d_vocab_out: int) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(d_vocab_out))

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_vocab_out"]:
        return resid @ self.W_U + self.b_U


class Transformer(HookedRootModule):
    """A hooked, HookedTransformer-compatible transformer for ``[a, b, =]`` tasks.

    ``model(tokens)`` returns logits ``[batch, pos, d_vocab_out]``; ``model.run_with_cache``
    returns ``(logits, cache)`` with the classic hook names. ``cfg`` is the ModelConfig;
    ``d_vocab`` (= p + 1), ``d_vocab_out`` (= p) and ``n_ctx`` (= 3) come from the task.
    """

    def __init__(self, cfg: ModelConfig, d_vocab: int, d_vocab_out: int, n_ctx: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_vocab, self.d_vocab_out, self.n_ctx = d_vocab, d_vocab_out, n_ctx
        self.embed = Embed(d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(n_ctx, cfg.d_model)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(cfg, n_ctx) for _ in range(cfg.n_layers)])
        self.unembed = Unembed(cfg.d_model, d_vocab_out)
        self.init_weights()
        self.set_bias_training(cfg.train_biases)
        self.setup()

    def init_weights(self) -> None:
        """Seeded initialisation of every ``W_*`` (biases start at 0).

        ``gpt2`` (TransformerLens ``init_mode="gpt2"``, the demo's regime): N(0, (0.8/sqrt(d_model))^2),
        drawn in ``named_parameters`` order from a generator seeded with ``cfg.seed``, so a
        HookedTransformer with the same seed gets the same weights. ``fan`` (the official code of
        Nanda et al.): std 1/sqrt(d_model) for every matrix except ``W_U`` (1/sqrt(d_vocab)).
        """
        gen = torch.Generator().manual_seed(self.cfg.seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "W_" not in name:
                    param.zero_()
                    continue
                if self.cfg.init == "gpt2":
                    std = 0.8 / math.sqrt(self.cfg.d_model)
                elif name.endswith("W_U"):
                    std = 1.0 / math.sqrt(self.d_vocab)
                else:
                    std = 1.0 / math.sqrt(self.cfg.d_model)
                param.normal_(0.0, std, generator=gen)

    def set_bias_training(self, train_biases: bool) -> None:
        """Freeze every ``b_*`` at its value (TransformerLens demo) or let it train."""
        for name, param in self.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.requires_grad_(train_biases)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab_out"]:
        """Logits at every position."""
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(resid)

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """Token embedding."""
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab_out"]:
        """Unembedding."""
        return self.unembed.W_U

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        """Positional embedding."""
        return self.pos_embed.W_pos


def make_model(config: RunConfig) -> Transformer:
    """The freshly initialised model of a run config."""
    return Transformer(config.model, config.d_vocab, config.d_vocab_out, config.n_ctx)
