"""Clauw et al.'s (2024) fully connected network as a model option (issue 23, item 1): the
formula, its hooks, its init, the refusals, training that resumes bitwise, and an analysis with
losses, norms and O-information on its hidden layer (the grid measures skipped with the reason)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import circuits
from circuits.analysis import analyze
from circuits.config import ConfigError, preset
from circuits.model import FullyConnected, make_model
from tests.conftest import assert_same_weights, run_cli, stopped_and_resumed, tiny_config


def fcn_config(**overrides: object) -> circuits.RunConfig:
    base = tiny_config(p=17, frac=0.6, arch="fcn", init="fan", d_mlp=48, engine="reference", train_biases=True,
                       lr=0.03, weight_decay=2.0, epochs=20, checkpoint_every=5, checkpoint_early_until=0)
    return base.replace(**overrides) if overrides else base


def test_the_network_is_clauws_formula_with_hooks_and_linear_init() -> None:
    cfg = fcn_config()
    model = make_model(cfg)
    assert isinstance(model, FullyConnected)
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert names == {"hidden.W_in": (34, 48), "hidden.b_in": (48,), "unembed.W_U": (48, 17)}
    tokens = torch.tensor([[3, 7, 17], [0, 16, 17], [16, 16, 17]])
    x = torch.cat([F.one_hot(tokens[:, 0], 17), F.one_hot(tokens[:, 1], 17)], 1).float()
    want = F.relu(x @ model.hidden.W_in + model.hidden.b_in) @ model.unembed.W_U
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (3, 1, 17)
    torch.testing.assert_close(logits[:, 0], want)
    assert set(cache) == {"hidden.hook_pre", "hidden.hook_post"}
    torch.testing.assert_close(cache["hidden.hook_post"], F.relu(cache["hidden.hook_pre"]))
    # PyTorch's Linear default: uniform within 1/sqrt(fan_in), seeded by the model seed.
    for name, fan in (("hidden.W_in", 34), ("hidden.b_in", 34), ("unembed.W_U", 48)):
        w = dict(model.named_parameters())[name].detach()
        assert w.abs().max() <= 1 / math.sqrt(fan) and w.abs().max() > 0.8 / math.sqrt(fan)
    assert torch.equal(make_model(cfg).hidden.W_in, model.hidden.W_in)
    assert not torch.equal(make_model(cfg.replace(seed=1)).hidden.W_in, model.hidden.W_in)
    assert make_model(cfg.replace(init_scale=3.0)).hidden.W_in.abs().max() > 2 / math.sqrt(34)
    # The task's own loss, as the transformer's.
    with torch.no_grad():
        loss = model(tokens, return_type="loss")
    labels = (tokens[:, 0] + tokens[:, 1]) % 17
    assert float(loss) == pytest.approx(float(F.cross_entropy(want.detach().double(), labels)))


def test_configurations_the_network_does_not_implement_are_refused(tmp_path: Path) -> None:
    for overrides, why in (({"engine": "fused"}, "--engine reference"), ({"init": "gpt2"}, "init fan"),
                           ({"act_fn": "gelu"}, "act_fn relu"), ({"mix_mem": 20}, "mixture")):
        with pytest.raises(ConfigError, match=why):
            fcn_config(**overrides)
    done = run_cli("train", "--preset", "quick", "--arch", "fcn", "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "needs init fan" in done.stderr and "--preset clauw" in done.stderr and not (tmp_path / "r").exists()
    done = run_cli("train", "--preset", "quick", "--arch", "fcn", "--init", "fan", "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "--engine reference" in done.stderr and not (tmp_path / "r").exists()


def test_the_clauw_preset_is_their_setting() -> None:
    cfg = preset("clauw")
    assert (cfg.task.p, cfg.task.frac, cfg.model.arch, cfg.model.d_mlp, cfg.train.lr, cfg.train.weight_decay,
            cfg.train.beta2, cfg.train.engine, cfg.train.batch_size) == (97, 0.4, "fcn", 250, 0.03, 2.0, 0.98,
                                                                        "reference", None)
    assert len(circuits.make_task(cfg.task).train_idx) == int(0.4 * 97 * 97)


def test_it_trains_resumes_bitwise_and_is_analysed_with_oinfo(tmp_path: Path) -> None:
    cfg = fcn_config()
    full = circuits.train(cfg, out=tmp_path / "full")
    assert_same_weights(full, stopped_and_resumed(cfg, tmp_path / "part", 12))
    assert full.metrics.train_acc.iloc[-1] > full.metrics.train_acc.iloc[0]  # it learns
    assert isinstance(full.model(), FullyConnected)
    a = analyze(full, out=tmp_path / "a", measures=["default", "oinfo"], options={"oinfo.groups": 4})
    m = a.measures
    assert {"train_loss", "test_acc", "weight_norm_sq", "oinfo_synergy"} <= set(m.columns)
    last = full.model(full.epochs[-1])
    with torch.no_grad():
        logits = last(full.task.tokens)[:, -1].double()
    idx = full.task.train_idx
    assert m.train_loss.iloc[-1] == pytest.approx(float(F.cross_entropy(logits[idx], full.task.labels[idx])))
    assert m.weight_norm_sq.iloc[-1] == pytest.approx(sum(float(p.detach().double().pow(2).sum()) for p in last.parameters()))
    assert "arch fcn" in a.summary["skipped_measures"]["fourier_losses"]
    assert a.key_frequencies == []
    assert (m.oinfo_synergy <= 0).all() and (m.oinfo_redundancy >= 0).all()
