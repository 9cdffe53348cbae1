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
from collections.abc import Mapping

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from circuits.config import ModelConfig, RunConfig, TaskConfig
from circuits.fcn import FullyConnected, answer_table, check_return_type, task_output

__all__ = ["Transformer", "FullyConnected", "Model", "HookedConfig", "make_model", "is_buffer_key", "BUFFER_SUFFIXES"]


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
        # Not persistent: they are rebuilt by the constructor, so a checkpoint (weights only)
        # loads strictly, and a TransformerLens state dict that carries them loads too
        # (Transformer.load_state_dict drops them).
        self.register_buffer("mask", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)), persistent=False)
        self.register_buffer("IGNORE", torch.tensor(-torch.inf), persistent=False)
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
        self, resid: Float[Tensor, "batch pos d_model"], route: Float[Tensor, "batch 1 d_mlp"] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(resid @ self.W_in + self.b_in)
        act = self.act(pre)
        # A split MLP (ModelConfig.split_mlp): each input's task owns half the neurons, the
        # other half is zero for it (so neither its output nor its gradient reaches them).
        post = self.hook_post(act if route is None else act * route)
        return post @ self.W_out + self.b_out


class LayerNorm(nn.Module):
    """TransformerLens' LayerNorm (``normalization_type="LN"``): centre, divide by the RMS plus
    eps (``hook_scale``), then ``w`` and ``b`` (``hook_normalized``)."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


class TransformerBlock(nn.Module):
    """Attention then MLP, each added to the residual stream; with ``normalization="LN"`` each
    reads a LayerNorm of it (``ln1``, ``ln2``: TransformerLens' pre-norm), and with ``dropout``
    their outputs are dropped out while training (Power et al. 2022)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        super().__init__()
        if cfg.normalization == "LN":  # declared first, as in TransformerLens
            self.ln1 = LayerNorm(cfg.d_model)
            self.ln2 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, n_ctx)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], route: Float[Tensor, "batch 1 d_mlp"] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        ln = hasattr(self, "ln1")
        resid = self.hook_resid_pre(resid)
        attn = self.attn(self.ln1(resid) if ln else resid)
        if self.dropout:
            attn = F.dropout(attn, self.dropout, self.training)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(attn))
        mlp = self.mlp(self.ln2(resid) if ln else resid, route)
        if self.dropout:
            mlp = F.dropout(mlp, self.dropout, self.training)
        return self.hook_resid_post(resid + self.hook_mlp_out(mlp))


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


class HookedConfig:
    """A read-only view of a model's config with the fields of TransformerLens'
    ``HookedTransformerConfig`` that notebooks and ``ActivationCache``'s helpers read
    (``d_vocab``, ``d_vocab_out``, ``n_ctx``, ``attn_only``, ``normalization_type``,
    ``positional_embedding_type``, ``device``, ``dtype``, ...), with this model's values; any
    other name is circuits' own :class:`ModelConfig`'s (``seed``, ``init``, ``train_biases``).
    The ModelConfig itself is ``model.config``."""

    _FIXED = {
        "attn_only": False, "normalization_type": None, "positional_embedding_type": "standard",
        "original_architecture": "circuits", "model_name": "circuits-grokking", "final_rms": False,
        "gated_mlp": False, "parallel_attn_mlp": False, "attention_dir": "causal", "use_attn_result": False,
        "use_split_qkv_input": False, "use_hook_mlp_in": False, "use_attn_in": False,
        "use_local_attn": False, "default_prepend_bos": False, "tokenizer_name": None,
        "n_key_value_heads": None, "num_experts": None, "use_normalization_before_and_after": False,
        "post_embedding_ln": False, "rotary_dim": None, "attn_types": None, "eps": 1e-5,
        "init_weights": True, "d_vocab_out_is_d_vocab": False, "output_logits_soft_cap": -1.0,
    }

    def __init__(self, model: Transformer) -> None:
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name: str) -> object:
        model = object.__getattribute__(self, "_model")
        config: ModelConfig = model.config
        if name == "normalization_type":
            return None if config.normalization == "none" else config.normalization
        if name in HookedConfig._FIXED:
            return HookedConfig._FIXED[name]
        if name in ("d_vocab", "d_vocab_out", "n_ctx"):
            return getattr(model, name)
        if name == "d_head":
            return config.d_head
        if name == "device":
            return next(model.parameters()).device
        if name == "dtype":
            return next(model.parameters()).dtype
        if name == "init_mode":
            return config.init
        if name == "n_params":
            return sum(p.numel() for n, p in model.named_parameters() if "W_" in n)
        return getattr(config, name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"model.cfg is a read-only view; build a new model from a changed config "
                             f"(RunConfig.replace({name}=...)) instead of setting cfg.{name}")

    def to_dict(self) -> dict[str, object]:
        """The HookedTransformerConfig fields above and circuits' ModelConfig fields."""
        import dataclasses

        names = ["n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
                 "act_fn", *HookedConfig._FIXED]
        out = {n: getattr(self, n) for n in names}
        out.update({f.name: getattr(self._model.config, f.name) for f in dataclasses.fields(self._model.config)})
        return out

    def __repr__(self) -> str:
        return f"HookedConfig({self._model.config!r}, d_vocab={self.d_vocab}, d_vocab_out={self.d_vocab_out})"


class Transformer(HookedRootModule):
    """A hooked, HookedTransformer-compatible transformer for ``[a, b, =]`` tasks.

    ``model(tokens)`` returns logits ``[batch, pos, d_vocab_out]``; ``model.run_with_cache``
    returns ``(logits, cache)`` with the classic hook names, the cache a TransformerLens
    ``ActivationCache``. ``cfg`` is a read-only HookedTransformerConfig-like view
    (:class:`HookedConfig`); ``config`` is circuits' ModelConfig; ``d_vocab`` (= p + 1),
    ``d_vocab_out`` (= p) and ``n_ctx`` (= 3) come from the task, which a model made by
    :func:`make_model` also knows (``task_config``: for ``return_type="loss"``). ``epoch`` is the
    checkpoint's exact epoch when the model came from a run (None otherwise).
    """

    def __init__(self, cfg: ModelConfig, d_vocab: int, d_vocab_out: int, n_ctx: int = 3,
                 task_config: TaskConfig | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.task_config = task_config
        self.epoch: int | None = None
        self.d_vocab, self.d_vocab_out, self.n_ctx = d_vocab, d_vocab_out, n_ctx
        self.embed = Embed(d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(n_ctx, cfg.d_model)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(cfg, n_ctx) for _ in range(cfg.n_layers)])
        if cfg.normalization == "LN":
            self.ln_final = LayerNorm(cfg.d_model)
        self.unembed = Unembed(cfg.d_model, d_vocab_out)
        self.init_weights()
        self.set_bias_training(cfg.train_biases)
        self.setup()
        # Evaluation mode unless training: only dropout reads it, and an analysis or a notebook
        # must never see dropped activations (the reference engine switches it on per update).
        self.eval()

    def init_weights(self) -> None:
        """Seeded initialisation of every ``W_*`` (biases start at 0).

        ``gpt2`` (TransformerLens ``init_mode="gpt2"``, the demo's regime): N(0, (0.8/sqrt(d_model))^2),
        drawn in ``named_parameters`` order from a generator seeded with ``cfg.seed``, so a
        HookedTransformer with the same seed gets the same weights. ``fan`` (the official code of
        Nanda et al.): std 1/sqrt(d_model) for every matrix except ``W_U`` (1/sqrt(d_vocab)).
        ``init_scale`` (Omnigrok's alpha, Liu et al. 2022b) then multiplies every weight.
        """
        gen = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "W_" not in name:
                    # LayerNorm gains start at 1 (TransformerLens), every bias at 0.
                    param.fill_(1.0) if name.endswith(".w") else param.zero_()
                    continue
                if self.config.init == "gpt2":
                    std = 0.8 / math.sqrt(self.config.d_model)
                elif name.endswith("W_U"):
                    std = 1.0 / math.sqrt(self.d_vocab)
                else:
                    std = 1.0 / math.sqrt(self.config.d_model)
                param.normal_(0.0, std, generator=gen)
                if self.config.init_scale != 1.0:
                    param.mul_(self.config.init_scale)

    def set_bias_training(self, train_biases: bool) -> None:
        """Freeze every ``b_*`` at its value (TransformerLens demo) or let it train."""
        for name, param in self.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.requires_grad_(train_biases)

    @property
    def cfg(self) -> HookedConfig:
        """HookedTransformerConfig-like read-only view (:class:`HookedConfig`)."""
        return HookedConfig(self)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        labels: Int[Tensor, " batch"] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Logits at every position, as ``HookedTransformer.forward``: ``return_type`` is
        ``"logits"`` (default), ``"loss"``, ``"both"`` (logits, loss) or None.

        The loss is the task's: float64 cross-entropy of the logits at the answer position
        (the last, '=') against the answers, which are ``labels`` or, for a model from
        :func:`make_model` or ``run.model(...)``, read from the task's own table (so a
        random-label or label-noise run scores against what it was trained on). Mean over the
        batch, or per example with ``loss_per_token`` (TransformerLens' next-token loss has no
        meaning here: the answer is not one of the inputs).
        """
        check_return_type(return_type)
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        route = self.mlp_route(tokens)
        for block in self.blocks:
            resid = block(resid, route)
        if hasattr(self, "ln_final"):
            resid = self.ln_final(resid)
        logits = self.unembed(resid)
        return task_output(self, tokens, logits, return_type, loss_per_token, labels)

    def mlp_route(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch 1 d_mlp"] | None:
        """With ``split_mlp``, each input's mask over the MLP neurons: its task's half is 1
        (the operation's inputs, operator token d_vocab - 3: the first half; the memorisation
        inputs, d_vocab - 2: the second), the other half 0. None without a split."""
        if not self.config.split_mlp:
            return None
        mem = (tokens[:, 1] == self.d_vocab - 2)[:, None, None]
        first = torch.arange(self.config.d_mlp, device=tokens.device) < self.config.d_mlp // 2
        return (first != mem).to(self.W_E.dtype)  # first half for the operation, the rest for memorisation

    def answers(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """The task's answer for each input ``[a, b, =]`` (from its table; see :meth:`forward`)."""
        if self.task_config is None:
            raise ValueError("this model does not know its task: pass labels=..., or build it with "
                             "make_model(config) or run.model(epoch)")
        table = answer_table(self.task_config)
        n = self.task_config.n_elements
        ops = self.task_config.op_tokens
        a, b = tokens[:, 0].cpu(), tokens[:, 2 if ops else 1].cpu()
        if bool(((a < 0) | (a >= n) | (b < 0) | (b >= n)).any()):
            raise ValueError(f"inputs must be {'[a, op, b, =]' if ops else '[a, b, =]'} with a, b in 0..{n - 1}")
        if ops is None:
            return table[a * n + b]
        op = tokens[:, 1].cpu()
        if not bool(((op == ops[0]) | (op == ops[1])).all()):
            raise ValueError(f"a mixture's inputs are [a, op, b, =] with op {ops[0]} ('+') or {ops[1]} ('-')")
        return table[(op == ops[1]).long() * n * n + a * n + b]

    def run_with_cache(self, *args: object, **kwargs: object) -> tuple[object, object]:
        """``(output, cache)``, the cache a TransformerLens ``ActivationCache`` (indexing as
        ``cache["pattern", 0]``, ``decompose_resid``, ``logit_attrs``, ...)."""
        from transformer_lens import ActivationCache

        out, cache = super().run_with_cache(*args, **kwargs)
        if isinstance(cache, dict):
            cache = ActivationCache(cache, self)
        return out, cache

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):  # noqa: ANN201
        """As ``nn.Module.load_state_dict``, strict on parameters; buffer entries (``mask``,
        ``IGNORE``, as TransformerLens saves them) are rebuilt here, so they are ignored."""
        kept = {k: v for k, v in state_dict.items() if not is_buffer_key(k)}
        return super().load_state_dict(kept, strict=strict, assign=assign)

    # ---- HookedTransformer's stacked weights ------------------------------------------------
    def _stack(self, part: str, name: str) -> Tensor:
        return torch.stack([getattr(getattr(b, part), name) for b in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        """Query weights of every layer, stacked."""
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        """Key weights of every layer, stacked."""
        return self._stack("attn", "W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        """Value weights of every layer, stacked."""
        return self._stack("attn", "W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        """Output weights of every layer, stacked."""
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_K")

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_V")

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("attn", "b_O")

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        """MLP input weights of every layer, stacked."""
        return self._stack("mlp", "W_in")

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        """MLP output weights of every layer, stacked."""
        return self._stack("mlp", "W_out")

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack("mlp", "b_in")

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("mlp", "b_out")

    @property
    def b_U(self) -> Float[Tensor, " d_vocab_out"]:
        """Unembedding bias."""
        return self.unembed.b_U

    @property
    def QK(self):  # noqa: ANN201
        """``FactoredMatrix(W_Q, W_K^T)`` per layer and head, as HookedTransformer's."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):  # noqa: ANN201
        """``FactoredMatrix(W_V, W_O)`` per layer and head, as HookedTransformer's."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the attention and MLP output biases before ``layer`` (HookedTransformer's)."""
        total = torch.zeros(self.config.d_model, device=self.W_E.device)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    def tokens_to_residual_directions(self, tokens: int | Tensor) -> Tensor:
        """The unembedding direction of answer class(es) ``tokens`` (``W_U[:, tokens]``, class
        axis last moved first), as HookedTransformer's, for ``cache.logit_attrs``."""
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        idx = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, idx].movedim(0, -1)

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


#: A run's model: the transformer, or Clauw et al.'s fully connected network (``arch fcn``).
Model = Transformer | FullyConnected


def make_model(config: RunConfig) -> Model:
    """The freshly initialised model of a run config (it knows its task: ``task_config``)."""
    cls = FullyConnected if config.model.arch == "fcn" else Transformer
    return cls(config.model, config.d_vocab, config.d_vocab_out, config.n_ctx, config.task)


