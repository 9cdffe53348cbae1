"""Training knobs of the literature (issue 22): optimisers, parameter groups, Grokfast, Omnigrok.

Known answers: every optimiser of a stack gives torch.optim's bits; the Grokfast filters give the
reference implementation's numbers (written out here per parameter, as ironjr/grokfast does); a
constrained run keeps its norm; runs with a filter or a constraint resume bitwise on both
engines; bad values exit 2 with one line.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch

import circuits
from circuits.config import ConfigError, preset
from circuits.engine.optim import GradFilter, flat_norm
from circuits.engine.stacked import StackedOptimizer, check_stackable
from circuits.model import make_model
from tests.conftest import assert_same_weights, run_cli, stop_at, stopped_and_resumed, tiny_config

SHAPES = {"embed.W_E": (12, 16), "blocks.0.mlp.W_in": (16, 32)}


def _torch_optimizer(cfg, params):  # noqa: ANN001, ANN202
    t = cfg.train
    embed = {"lr": t.lr if t.embed_lr is None else t.embed_lr,
             "weight_decay": t.weight_decay if t.embed_weight_decay is None else t.embed_weight_decay}
    groups = [{"params": [params["blocks.0.mlp.W_in"]], "lr": t.lr, "weight_decay": t.weight_decay},
              {"params": [params["embed.W_E"]], **embed}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, foreach=False)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)


@pytest.mark.parametrize("knobs", [
    [{}, {"lr": 3e-3, "weight_decay": 0.1}],
    [{"embed_lr": 3e-3, "embed_weight_decay": 0.1}, {"embed_weight_decay": 0.0}],
    [{"optimizer": "adam"}, {"optimizer": "adam", "weight_decay": 0.01, "embed_lr": 1e-2}],
    [{"optimizer": "sgd", "lr": 0.1}, {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0}],
    [{"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}, {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5,
                                                        "embed_lr": 0.01}],
], ids=["adamw", "adamw-groups", "adam", "sgd", "sgd-momentum"])
def test_each_member_of_a_stack_gets_torch_optims_bits(knobs: list[dict]) -> None:
    base = preset("quick").replace(p=11, d_model=16, d_mlp=32)
    configs = [base.replace(**k) for k in knobs]
    gen = torch.Generator().manual_seed(0)
    init = [{k: torch.randn(*s, generator=gen) for k, s in SHAPES.items()} for _ in configs]
    stacked = {k: torch.stack([m[k] for m in init]).requires_grad_(True) for k in SHAPES}
    opt = StackedOptimizer(stacked, configs)
    alone = [{k: v.clone().requires_grad_(True) for k, v in m.items()} for m in init]
    torch_opts = [_torch_optimizer(c, a) for c, a in zip(configs, alone)]
    for _ in range(6):
        grads = [{k: torch.randn(*s, generator=gen) for k, s in SHAPES.items()} for _ in configs]
        for k in SHAPES:
            stacked[k].grad = torch.stack([g[k] for g in grads])
        for a, g in zip(alone, grads):
            for k in SHAPES:
                a[k].grad = g[k].clone()
        opt.step()
        for o in torch_opts:
            o.step()
    for i, a in enumerate(alone):
        for k in SHAPES:
            assert torch.equal(stacked[k][i].detach(), a[k].detach()), (i, k)


def _reference_ema(grads_seq, alpha, lamb):  # noqa: ANN001, ANN202
    """ironjr/grokfast's gradfilter_ema, per parameter, on a sequence of gradient dicts."""
    state, out = None, []
    for g in grads_seq:
        if state is None:
            state = {n: v.clone() for n, v in g.items()}
        filtered = {}
        for n, v in g.items():
            state[n] = state[n] * alpha + v * (1 - alpha)
            filtered[n] = v + state[n] * lamb
        out.append(filtered)
    return out


def _reference_ma(grads_seq, window, lamb):  # noqa: ANN001, ANN202
    """ironjr/grokfast's gradfilter_ma (mean, warmup=True), per parameter."""
    queues = {n: deque(maxlen=window) for n in grads_seq[0]}
    out = []
    for g in grads_seq:
        filtered = {}
        for n, v in g.items():
            queues[n].append(v)
            filtered[n] = v + sum(queues[n]) / len(queues[n]) * lamb if len(queues[n]) == window else v
        out.append(filtered)
    return out


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_grokfast_filters_give_the_reference_implementations_numbers(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    seq = [{k: torch.randn(*s, generator=gen) for k, s in SHAPES.items()} for _ in range(9)]
    cfg = preset("quick").replace(grokfast=kind, grokfast_window=4, grokfast_alpha=0.9)
    lamb = cfg.train.grokfast_gain
    assert lamb == {"ema": 2.0, "ma": 5.0}[kind]  # science.md's defaults
    expected = _reference_ema(seq, 0.9, lamb) if kind == "ema" else _reference_ma(seq, 4, lamb)
    f = GradFilter([cfg], list(SHAPES), [torch.Size(s) for s in SHAPES.values()], torch.float32, torch.device("cpu"))
    for step, (g, want) in enumerate(zip(seq, expected)):
        flat = torch.cat([g[k].reshape(1, -1) for k in SHAPES], dim=1)
        got = f(flat)
        want_flat = torch.cat([want[k].reshape(1, -1) for k in SHAPES], dim=1)
        torch.testing.assert_close(got, want_flat, rtol=1e-6, atol=1e-6)
        if kind == "ma" and step < 3:
            assert torch.equal(got, flat)  # nothing is added before the window is full
        # The state saved after any step restores to the same continuation.
        again = GradFilter([cfg], list(SHAPES), [torch.Size(s) for s in SHAPES.values()], torch.float32,
                           torch.device("cpu"))
        again.load_member(0, f.member_tensors(0))
        probe = torch.randn(flat.shape, generator=torch.Generator().manual_seed(step))
        assert torch.equal(again(probe), _copy_filter(f)(probe))


def _copy_filter(f: GradFilter) -> GradFilter:
    import copy

    return copy.deepcopy(f)


KNOB_RUNS = {
    "grokfast-ema": {"grokfast": "ema"},
    "grokfast-ma": {"grokfast": "ma", "grokfast_window": 7},
    "omnigrok": {"init_scale": 2.0, "constrain_norm": True},
    "adam-groups": {"optimizer": "adam", "embed_lr": 3e-3, "embed_weight_decay": 0.0},
    "sgd": {"optimizer": "sgd", "lr": 0.3, "momentum": 0.9},
    "minibatch": {"batch_size": 16},
}


@pytest.mark.parametrize("knob, engine", [(k, "fused") for k in KNOB_RUNS] + [
    (k, "reference") for k in ("grokfast-ema", "grokfast-ma", "omnigrok", "minibatch")])
def test_a_run_with_a_knob_resumes_bitwise(tmp_path: Path, engine: str, knob: str) -> None:
    cfg = tiny_config(engine=engine, epochs=40, **KNOB_RUNS[knob])
    full = circuits.train(cfg, out=tmp_path / "full")
    resumed = stopped_and_resumed(cfg, tmp_path / "part", 23)
    assert_same_weights(full, resumed)
    assert resumed.metrics.equals(full.metrics)
    # The knob did something: the same config without it trains other weights.
    plain = circuits.train(tiny_config(engine=engine, epochs=40), out=tmp_path / "plain")
    last = full.epochs[-1]
    assert not torch.equal(plain.state_dict(last)["embed.W_E"], full.state_dict(last)["embed.W_E"])


@pytest.mark.parametrize("knob", list(KNOB_RUNS))
def test_both_engines_train_the_same_run_with_a_knob(tmp_path: Path, knob: str) -> None:
    # The fused engine and torch.optim on the hooked model agree to float32 rounding (their
    # forwards sum in other orders: 4e-5 relative after 20 epochs without any knob).
    fused = circuits.train(tiny_config(epochs=20, **KNOB_RUNS[knob]), out=tmp_path / "f")
    ref = circuits.train(tiny_config(epochs=20, engine="reference", **KNOB_RUNS[knob]), out=tmp_path / "r")
    a, b = fused.state_dict(20), ref.state_dict(20)
    for k in a:
        if b[k].norm() > 0:
            assert float((a[k] - b[k]).norm() / b[k].norm()) < 1e-3, (knob, k)
        else:
            assert torch.equal(a[k], b[k])


def _norm(state: dict[str, torch.Tensor], trainable: set[str]) -> float:
    return float(flat_norm([torch.cat([state[k].reshape(1, -1) for k in sorted(trainable)], dim=1)])[0])


def test_omnigrok_init_scale_and_constrained_norm(tmp_path: Path) -> None:
    base, scaled = make_model(tiny_config()), make_model(tiny_config(init_scale=3.0))
    for (k, a), (_, b) in zip(base.state_dict().items(), scaled.state_dict().items()):
        assert torch.equal(b, a * 3.0), k
    run = circuits.train(tiny_config(init_scale=0.8, constrain_norm=True), out=tmp_path / "c")
    trainable = {n for n, p in run.model(0).named_parameters() if p.requires_grad}
    start = _norm(run.state_dict(0), trainable)
    assert start == pytest.approx(0.8 * _norm(base.state_dict(), trainable), rel=1e-6)
    for e in run.epochs:
        assert _norm(run.state_dict(e), trainable) == pytest.approx(start, rel=1e-6), e
    free = circuits.train(tiny_config(init_scale=0.8), out=tmp_path / "f")
    assert abs(_norm(free.state_dict(free.epochs[-1]), trainable) - start) > 0.01 * start


def test_minibatches_cover_each_pass_once_and_follow_powers_rule() -> None:
    from circuits.engine.optim import Batches

    b = Batches(60, 16, seed=999)
    assert b.per_pass == 4
    for n_pass in range(3):
        batches = [b.indices(n_pass * 4 + k) for k in range(4)]
        assert [len(x) for x in batches] == [16, 16, 16, 12]  # the last partial batch is kept
        assert sorted(torch.cat(batches).tolist()) == list(range(60))
    assert not torch.equal(b.indices(0), b.indices(4))  # a fresh shuffle each pass
    assert torch.equal(b.indices(5), Batches(60, 16, seed=999).indices(5))  # seeded: the count is the state
    assert Batches(60, None, 0).full and Batches(60, 60, 0).full
    assert preset("quick").replace(power_batches=True).batch == 512  # min(512, ceil(1566 / 2))
    assert tiny_config(power_batches=True).batch == 30
    assert preset("quick").batch is None
    with pytest.raises(ConfigError, match="batch_size 61 exceeds the 60 training pairs"):
        tiny_config(batch_size=61)


def test_members_with_other_optimisers_are_not_stacked() -> None:
    with pytest.raises(ValueError, match="optimizer='sgd'.*separate ensemble"):
        check_stackable([tiny_config(), tiny_config(optimizer="sgd")])
    check_stackable([tiny_config(grokfast="ema"), tiny_config(grokfast="ema", grokfast_alpha=0.9, seed=3)])


@pytest.mark.parametrize("flags, says", [
    (["--init-scale", "0"], "init_scale must be > 0"),
    (["--grokfast-window", "0"], "grokfast_window must be >= 1"),
    (["--optimizer", "lion"], "optimizer must be one of adamw, adam, sgd"),
    (["--grokfast", "fast"], "grokfast must be one of none, ema, ma"),
    (["--momentum", "0.9"], "momentum is SGD's"),
    (["--batch-size", "100000"], "exceeds the"),
    (["--batch-size", "8", "--power-batches"], "not both"),
])
def test_bad_knobs_exit_2_with_one_line(tmp_path: Path, flags: list[str], says: str) -> None:
    out = run_cli("train", "--p", "11", "--epochs", "5", "--out", str(tmp_path / "r"), *flags)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert says in out.stderr and not (tmp_path / "r").exists()


def test_default_knobs_keep_the_config_hash() -> None:
    # Run folders named before the knobs existed keep their names (ADDED_FIELDS).
    assert preset("quick").short_hash() == preset("quick").replace(optimizer="adamw", grokfast="none",
                                                                   init_scale=1.0).short_hash()
    assert preset("quick").short_hash() != preset("quick").replace(grokfast="ema").short_hash()
    with pytest.raises(ConfigError, match="grokfast_alpha"):
        preset("quick").replace(grokfast_alpha=1.0)


def test_an_ensemble_with_knobs_matches_its_members_trained_alone(tmp_path: Path) -> None:
    # Per-member alpha, lambda, batch size, embedding lr and norm constraint in one stack.
    configs = [tiny_config(epochs=30, grokfast="ema", constrain_norm=True, init_scale=1.5),
               tiny_config(epochs=30, grokfast="ema", grokfast_alpha=0.9, grokfast_lambda=1.0, batch_size=16,
                           embed_lr=3e-3, seed=5)]
    runs = circuits.train_ensemble(configs, [tmp_path / "e0", tmp_path / "e1"])
    for i, (cfg, run) in enumerate(zip(configs, runs)):
        alone = circuits.train(cfg, out=tmp_path / f"alone{i}")
        a, b = run.state_dict(30), alone.state_dict(30)
        for k in a:
            if b[k].norm() > 0:
                assert float((a[k] - b[k]).norm() / b[k].norm()) < 1e-3, (i, k)
    with pytest.raises(KeyboardInterrupt):
        circuits.train_ensemble(configs, [tmp_path / "p0", tmp_path / "p1"], on_step=stop_at(13))
    resumed = circuits.train_ensemble(configs, [tmp_path / "p0", tmp_path / "p1"])
    for run, again in zip(runs, resumed):
        for e in run.epochs:
            a, b = run.state_dict(e), again.state_dict(e)
            assert all(torch.equal(a[k], b[k]) for k in a), e


def test_a_knob_is_a_sweep_axis(tmp_path: Path) -> None:
    # Members with another optimiser or filter train in their own stacks; the table has the axes.
    out = run_cli("experiment", "phases", "--grid", "grokfast=none,ema", "--grid", "optimizer=adamw,adam",
                  "--p", "11", "--frac", "0.5", "--d-model", "32", "--d-mlp", "64", "--epochs", "20",
                  "--checkpoint-early-until", "0", "--out", str(tmp_path / "sweep"))
    assert out.returncode == 0, out.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "sweep" / "phase_diagram.csv")
    assert set(zip(table.grokfast, table.optimizer)) == {("none", "adamw"), ("none", "adam"), ("ema", "adamw"),
                                                         ("ema", "adam")}
    runs = {(r.grokfast, r.optimizer): r for r in table.itertuples()}
    assert runs[("ema", "adam")].weight_norm != runs[("none", "adamw")].weight_norm
