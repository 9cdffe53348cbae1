"""Config: strict JSON round trips, validation with clear messages, presets, schedule."""

from __future__ import annotations

import dataclasses
import json

import pytest

from circuits.config import ConfigError, RunConfig, TaskConfig, TrainConfig, preset
from tests.conftest import REPO


def test_json_round_trip_is_exact() -> None:
    for name in ("nanda", "quick", "quick-v1"):
        cfg = preset(name)
        assert RunConfig.from_json(cfg.to_json()) == cfg
    cfg = preset("quick").replace(train_size=500, op="x3_xy", act_fn="gelu", warmup_steps=10)
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_unknown_keys_are_rejected() -> None:
    data = preset("quick").to_dict()
    data["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig.from_dict(data)
    data = preset("quick").to_dict()
    data["colour"] = "blue"
    with pytest.raises(ConfigError, match="colour"):
        RunConfig.from_dict(data)


def test_wrong_types_are_rejected() -> None:
    data = preset("quick").to_dict()
    data["task"]["p"] = "59"
    with pytest.raises(ConfigError, match="task.p"):
        RunConfig.from_dict(data)
    data = preset("quick").to_dict()
    data["model"]["train_biases"] = 1
    with pytest.raises(ConfigError, match="train_biases"):
        RunConfig.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"p": 2}, "prime >= 3"),
        ({"p": 9}, "prime >= 3"),
        ({"p": 1}, "prime >= 3"),
        ({"frac": 0.0}, r"\(0, 1\]"),
        ({"frac": 1.5}, r"\(0, 1\]"),
        ({"train_size": 10_000}, "exceeds"),
        ({"op": "pow"}, "op must be one of"),
        ({"d_model": 130, "n_heads": 4}, "divisible"),
        ({"lr": -1.0}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"beta2": 1.0}, "beta2"),
        ({"n_layers": 2}, "engine fused supports n_layers = 1"),
        ({"init_sha256": "0" * 64}, "without init_from"),
        ({"init_from": "a.safetensors", "init_sha256": "abc"}, "64 lowercase hex digits"),
    ],
)
def test_bad_values_name_the_problem(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        preset("quick").replace(**overrides)


def test_frac_and_train_size_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        TaskConfig(frac=0.3, train_size=100)
    cfg = preset("quick").replace(train_size=100)
    assert cfg.task.frac is None and cfg.task.n_train == 100
    assert cfg.replace(frac=0.2).task.train_size is None


def test_init_digest_stands_for_the_path_and_a_new_path_clears_it() -> None:
    digest = "ab" * 32
    a = preset("quick").replace(init_from="/x/epoch.safetensors", init_sha256=digest)
    b = preset("quick").replace(init_from="/elsewhere/epoch.safetensors", init_sha256=digest)
    assert a.short_hash() == b.short_hash()
    assert a.short_hash() != a.replace(init_from="/x/epoch.safetensors", init_sha256="cd" * 32).short_hash()
    assert a.replace(init_from="/y/other.safetensors").train.init_sha256 is None
    assert RunConfig.from_json(a.to_json()) == a
    # A config written before the digest existed still loads, identified by its path.
    old = json.loads(preset("quick").replace(init_from="/x/epoch.safetensors").to_json())
    del old["train"]["init_sha256"]
    assert RunConfig.from_dict(old).train.init_sha256 is None


def test_division_pool_excludes_zero_divisor() -> None:
    assert TaskConfig(p=7, op="div", frac=1.0).n_pairs == 42
    with pytest.raises(ConfigError, match="42 pairs"):
        TaskConfig(p=7, op="div", frac=None, train_size=43)


def test_presets_follow_science_decisions() -> None:
    nanda = preset("nanda")
    assert (nanda.task.p, nanda.task.frac, nanda.task.data_seed) == (113, 0.3, 598)
    assert nanda.task.n_train == 3830
    m = nanda.model
    assert (m.n_layers, m.d_model, m.n_heads, m.d_head, m.d_mlp) == (1, 128, 4, 32, 512)
    assert (m.act_fn, m.init, m.seed, m.train_biases) == ("relu", "gpt2", 999, False)
    t = nanda.train
    assert (t.lr, t.weight_decay, t.beta1, t.beta2, t.warmup_steps) == (1e-3, 1.0, 0.9, 0.98, 0)
    assert (t.epochs, t.checkpoint_every) == (40_000, 100)
    assert (nanda.d_vocab, nanda.d_vocab_out, nanda.n_ctx) == (114, 113, 3)
    # quick: retuned in issue 21 (docs/reproductions.md): the nanda widths and init at p = 59,
    # 45% data, weight decay 1.5, the median grokker's seeds of ten; the preset it replaced
    # stays available by name and as the JSON file the docs point to.
    quick = preset("quick")
    assert (quick.task.p, quick.task.frac, quick.train.checkpoint_every) == (59, 0.45, 50)
    assert (quick.train.weight_decay, quick.train.epochs, quick.model.seed, quick.task.data_seed) == (1.5, 3000, 1008, 607)
    assert dataclasses.replace(quick.model, seed=999) == nanda.model
    same_optimiser = ("lr", "beta1", "beta2", "eps", "warmup_steps", "optimizer", "engine")
    assert all(getattr(quick.train, f) == getattr(nanda.train, f) for f in same_optimiser)
    v1 = preset("quick-v1")
    assert (v1.task.p, v1.task.frac, v1.task.data_seed, v1.train.weight_decay) == (59, 0.4, 598, 1.0)
    assert v1.model == nanda.model
    assert RunConfig.from_json((REPO / "docs" / "presets" / "quick-v1.json").read_text()) == v1


def test_checkpoint_schedule_is_dense_early_and_regular_later() -> None:
    t = TrainConfig(epochs=1050, checkpoint_every=100, checkpoint_early_every=20,
                    checkpoint_early_until=200)
    epochs = t.checkpoint_epochs
    assert epochs[:12] == [0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 300]
    assert epochs[-2:] == [1000, 1050]  # the last epoch is always saved
    nanda = preset("nanda").train.checkpoint_epochs
    assert len(nanda) > 400 and all(e in nanda for e in range(0, 40_001, 100))


def test_hash_ignores_preset_name_but_not_science() -> None:
    a = preset("quick")
    assert a.short_hash() == a.replace(preset="other").short_hash()
    assert a.short_hash() != a.replace(seed=1).short_hash()
    json.loads(a.to_json())
