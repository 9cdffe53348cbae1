"""Power et al.'s model (issue 22, item 2): two blocks with TransformerLens' pre-LayerNorm and
dropout, trained by the reference engine (the fused one refuses it by name), resumed bitwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import circuits
from circuits.config import ConfigError
from circuits.model import make_model
from tests.conftest import assert_same_weights, run_cli, stopped_and_resumed, tiny_config


def power_config(**overrides: object):  # noqa: ANN201
    return tiny_config(n_layers=2, normalization="LN", dropout=0.1, engine="reference", epochs=30, **overrides)


def test_the_layernorm_model_has_transformerlens_names_and_arithmetic() -> None:
    model = make_model(power_config())
    names = [n for n, _ in model.named_parameters()]
    for want in ("blocks.0.ln1.w", "blocks.0.ln1.b", "blocks.1.ln2.w", "ln_final.w", "ln_final.b"):
        assert want in names
    assert names.index("blocks.0.ln1.w") < names.index("blocks.0.attn.W_Q")  # TL's order
    assert model.cfg.normalization_type == "LN" and model.cfg.n_layers == 2
    assert torch.equal(model.blocks[0].ln1.w, torch.ones(32)) and not model.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    x = torch.randn(5, 3, 32)
    ln = model.blocks[1].ln2
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), ln.w, ln.b, eps=1e-5), rtol=1e-5, atol=1e-6)
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 11]]))
    assert "blocks.1.ln1.hook_scale" in cache and "ln_final.hook_normalized" in cache
    tokens = torch.tensor([[1, 2, 11], [3, 4, 11]])
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))  # evaluation mode: no dropout
        model.train()
        assert not torch.equal(model(tokens), model(tokens))  # training mode drops out


def test_the_fused_engine_refuses_it_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fused does not support LayerNorm; use --engine reference"):
        tiny_config(normalization="LN")
    out = run_cli("train", "--p", "11", "--epochs", "5", "--dropout", "0.1", "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--engine reference" in out.stderr and not (tmp_path / "r").exists()


def test_a_power_run_trains_and_resumes_bitwise(tmp_path: Path) -> None:
    cfg = power_config()
    caller = torch.get_rng_state()
    full = circuits.train(cfg, out=tmp_path / "full")
    assert torch.equal(torch.get_rng_state(), caller)  # the notebook's generator is not moved
    assert full.metrics.train_loss.iloc[-1] < full.metrics.train_loss.iloc[0]
    resumed = stopped_and_resumed(cfg, tmp_path / "part", 17)
    assert_same_weights(full, resumed)
    assert resumed.metrics.equals(full.metrics)
    # Dropout changed the training: without it the weights differ.
    plain = circuits.train(power_config().replace(dropout=0.0), out=tmp_path / "plain")
    assert not torch.equal(plain.state_dict(30)["embed.W_E"], full.state_dict(30)["embed.W_E"])
