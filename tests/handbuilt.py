"""A transformer that implements the Fourier algorithm by formula (no training).

Used to check the measures analytically: with uniform attention the residual at "=" holds
cos/sin(w_k a) + cos/sin(w_k b); neuron n (frequency k, phase φ_n on an even grid) computes
ReLU(cos(w_k a + φ_n) + cos(w_k b + φ_n)); the neuron-logit map is cos(w_k c + 2φ_n). Averaging
over the phases keeps the second harmonic of the ReLU, so logit(c) is proportional to
Σ_k |cos(π k (a - b) / p)| cos(w_k (a + b - c)): the algorithm of Nanda et al. (2023), §4.
"""
from __future__ import annotations

import math

import torch

from circuits.config import preset
from circuits.model import make_model

def fourier_network(p: int, freqs: list[int], phases: int = 8, scale: float = 1.0, op: str = "add"):  # noqa: ANN201
    """(config, model) computing modular addition with the key frequencies `freqs`.

    ``op="mul"``: the same algorithm on the discrete logarithm (the frequencies are then of
    Z_(p-1)); the 0 token embeds to 0, and class 0 gets no logit."""
    S = len(freqs)
    d_model = 4 * S
    d_mlp = S * phases
    cfg = preset("quick-v1").replace(p=p, d_model=d_model, n_heads=1, d_mlp=d_mlp, op=op)
    model = make_model(cfg)
    x = torch.arange(p, dtype=torch.float64)
    mask = torch.ones(p, dtype=torch.float64)
    order = p
    if op == "mul":
        from circuits.tasks import fourier_view

        view = fourier_view(cfg.task)
        order = view.n
        x = view.element_position.to(torch.float64)  # log x; the 0 token is masked out below
        mask[0] = 0.0
    with torch.no_grad():
        for prm in model.parameters(): prm.zero_()
        W_E = torch.zeros(p + 1, d_model, dtype=torch.float64)
        W_U = torch.zeros(d_model, p, dtype=torch.float64)
        W_in = torch.zeros(d_model, d_mlp, dtype=torch.float64)
        W_out = torch.zeros(d_mlp, d_model, dtype=torch.float64)
        for i, k in enumerate(freqs):
            w = 2 * math.pi * k / order
            W_E[:p, 2*i] = torch.cos(w * x) * mask; W_E[:p, 2*i+1] = torch.sin(w * x) * mask
            o = 2 * S + 2 * i
            W_U[o] = torch.cos(w * x) * mask; W_U[o+1] = torch.sin(w * x) * mask
            for j in range(phases):
                n = i * phases + j; phi = 2 * math.pi * j / phases
                W_in[2*i, n] = 3 * math.cos(phi); W_in[2*i+1, n] = -3 * math.sin(phi)
                W_out[n, o] = math.cos(2*phi) * scale; W_out[n, o+1] = -math.sin(2*phi) * scale
        model.embed.W_E.copy_(W_E)
        model.unembed.W_U.copy_(W_U)
        blk = model.blocks[0]
        blk.attn.W_V.copy_(torch.eye(d_model)[None]); blk.attn.W_O.copy_(torch.eye(d_model)[None])
        blk.mlp.W_in.copy_(W_in); blk.mlp.W_out.copy_(W_out)
    return cfg, model
