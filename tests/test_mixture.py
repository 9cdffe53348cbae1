"""Multi-task mixtures (issue 22, item 3; Huang et al. 2024 §5): an operation's table with a
memorisation task mixed in under a second operator token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import circuits
from circuits.config import ConfigError
from circuits.tasks import MixtureTask, make_task
from tests.conftest import run_cli, tiny_config


def test_the_mixture_table_has_both_blocks_and_keeps_the_operations_split() -> None:
    cfg = tiny_config(op="sub", mix_mem=50, engine="reference").task
    p = cfg.p
    task = make_task(cfg)
    assert isinstance(task, MixtureTask)
    assert (cfg.n_ctx, cfg.n_tokens, cfg.n_classes, cfg.op_tokens, cfg.eq_token) == (4, p + 3, p, (p, p + 1), p + 2)
    assert task.tokens.shape == (2 * p * p, 4) and task.n_pairs == 2 * p * p
    a, op, b, eq = task.tokens.unbind(1)
    block = torch.arange(2 * p * p) // (p * p)
    # [a, op, b, =] in canonical order: the operation's block, then the memorisation block.
    assert torch.equal(a % p, (torch.arange(2 * p * p) // p) % p) and torch.equal(b, torch.arange(2 * p * p) % p)
    assert torch.equal(op, torch.where(block == 0, p, p + 1)) and bool((eq == p + 2).all())
    n = p * p
    assert torch.equal(task.labels[:n], (a[:n] - b[:n]) % p)  # the operation is untouched
    # The operation's split is the single task's: a mixture only adds training data.
    alone = make_task(tiny_config(op="sub").task)
    assert torch.equal(task.op_train_idx, alone.train_idx) and torch.equal(task.test_idx, alone.test_idx)
    # The memorisation pairs are all training data, none is a test pair, the rest of the block
    # is not valid; the labels are seeded and not the operation's.
    mem = task.mem_idx
    assert len(mem) == 50 and bool((mem >= n).all()) and bool(torch.isin(mem, task.train_idx).all())
    assert len(task.train_idx) == cfg.n_train == cfg.n_train_op + 50
    assert int(task.valid[n:].sum()) == 50 and not bool((task.test_idx >= n).any())
    assert torch.equal(make_task(cfg).labels, task.labels)
    other = make_task(tiny_config(op="sub", mix_mem=50, data_seed=1, engine="reference").task)
    assert not torch.equal(other.labels[other.mem_idx], task.labels[mem])
    hits = (task.labels[mem] == (a[mem] - b[mem]) % p).float().mean().item()
    assert hits < 0.3  # random labels agree with x - y about 1/p of the time


def test_bad_mixtures_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="at most 121"):
        tiny_config(mix_mem=122, engine="reference")
    with pytest.raises(ConfigError, match="--engine reference"):
        tiny_config(mix_mem=10)  # the fused engine reads [a, b, =]
    with pytest.raises(ConfigError, match="S5"):
        tiny_config(op="s5", mix_mem=10, engine="reference")
    with pytest.raises(ConfigError, match="random_labels"):
        tiny_config(random_labels=True, mix_mem=10, engine="reference")
    # Without a mixture the field leaves the config's hash (and its run folder's name) alone.
    assert tiny_config(mix_mem=0).short_hash() == tiny_config().short_hash()


def test_a_mixture_trains_memorises_both_blocks_and_analyses_with_the_reason(tmp_path: Path) -> None:
    cfg = tiny_config(mix_mem=30, engine="reference", epochs=150)
    run = circuits.train(cfg, out=tmp_path / "mix")
    task = run.task
    assert isinstance(task, MixtureTask) and torch.equal(task.train_idx, make_task(cfg.task).train_idx)
    model = run.model(-1)
    assert model.cfg.n_ctx == 4 and model.cfg.d_vocab == cfg.task.p + 3
    with torch.no_grad():
        pred = model(task.tokens)[:, -1].argmax(-1)
    # The whole training set is fit, memorisation pairs included (their labels are random).
    assert bool((pred[task.train_idx] == task.labels[task.train_idx]).all())
    assert run.metrics.train_acc.iloc[-1] == 1.0
    analysis = circuits.analyze(run, out=tmp_path / "a")
    skipped = analysis.summary["skipped_measures"]
    assert "losses" not in skipped and "mixture" in skipped["fourier_losses"]
    # The losses come from the model's own forward over both blocks: what training logged.
    m, logged = analysis.measures.set_index("epoch"), run.metrics.set_index("epoch")
    for col in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert m.loc[150, col] == pytest.approx(logged.loc[150, col], rel=1e-6, abs=1e-9)
    assert analysis.summary["phases"]["memorisation_end"] is not None
    assert analysis.measures.weight_norm_sq.notna().all()
    # The CLI says so in one line, and refuses the fused engine with the fix.
    bad = run_cli("train", "--preset", "quick", "--p", "11", "--mix-mem", "10", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--engine reference" in bad.stderr and "Traceback" not in bad.stderr


def test_the_model_scores_a_mixture_against_its_own_table() -> None:
    cfg = tiny_config(op="sub", mix_mem=40, engine="reference")
    model = circuits.make_model(cfg)
    task = make_task(cfg.task)
    idx = task.train_idx
    # return_type="loss" reads the answers of [a, op, b, =] from the mixture's table, both blocks.
    assert torch.equal(model.answers(task.tokens[idx]), task.labels[idx])
    with torch.no_grad():
        by_table = model(task.tokens[idx], return_type="loss")
        by_labels = model(task.tokens[idx], return_type="loss", labels=task.labels[idx])
    assert by_table.item() == by_labels.item()
    with pytest.raises(ValueError, match=r"\[a, op, b, =\]"):
        model.answers(torch.tensor([[0, 3, 1, cfg.task.eq_token]]))  # 3 is an element, not an operator


def test_a_split_mlp_routes_each_task_through_its_own_half() -> None:
    # Huang et al. 2024, App. B: the operation's inputs use the first d_mlp / 2 neurons, the
    # memorisation inputs the rest. So the loss on one block has no gradient in the other
    # block's half of W_in / W_out, and its activations there are zero.
    cfg = tiny_config(mix_mem=40, engine="reference", split_mlp=True)
    model = circuits.make_model(cfg)
    task = make_task(cfg.task)
    half = cfg.model.d_mlp // 2
    n = cfg.task.p ** 2
    for rows, own, other in ((task.op_train_idx, slice(0, half), slice(half, None)),
                             (task.mem_idx, slice(half, None), slice(0, half))):
        model.zero_grad()
        _, cache = model.run_with_cache(task.tokens[rows])
        post = cache["blocks.0.mlp.hook_post"]
        assert bool((post[..., other] == 0).all()) and bool((post[..., own] != 0).any())
        model(task.tokens[rows], return_type="loss").backward()
        assert bool((model.blocks[0].mlp.W_in.grad[:, other] == 0).all())
        assert bool((model.blocks[0].mlp.W_out.grad[other] == 0).all())
        assert model.blocks[0].mlp.W_in.grad[:, own].abs().sum() > 0
    assert bool((task.op_train_idx < n).all())
    # Without a mixture there is nothing to route.
    with pytest.raises(ConfigError, match="--mix-mem"):
        tiny_config(engine="reference", split_mlp=True)
    # Off by default: the unsplit model's activations reach every neuron from both blocks.
    plain = circuits.make_model(tiny_config(mix_mem=40, engine="reference"))
    _, cache = plain.run_with_cache(task.tokens[task.mem_idx])
    assert bool((cache["blocks.0.mlp.hook_post"][..., :half] != 0).any())


@pytest.mark.slow  # 43 s on a quiet 2-core machine; the command's own test covers the protocol's mechanics in CI
def test_the_emergence_protocol_maps_test_accuracy_over_width_and_memorisation_data(tmp_path: Path) -> None:
    # Huang et al. 2024 §5 at CI size: p = 23, 80% of the sums as the operation's training set,
    # two widths, the operation alone and with 150 memorisation pairs, one seed.
    from circuits.experiments import emergence
    from tests.test_experiments import small

    base = small(frac=0.8, epochs=1200)
    res = emergence(tmp_path / "emg", widths=[8, 32], mem_sizes=[0, 150], base=base, seeds=1, split_mlp=True)
    t = res.table.set_index(["d_model", "mem_size"])
    assert len(t) == 4 and set(res.summary["by_mem_size"]) == {"0", "150"}
    # Each run is what the grid says: width, mixture, split MLP for the mixtures only.
    for (w, m), row in t.iterrows():
        cfg = circuits.load_run(tmp_path / "emg" / "runs" / row.run).config
        assert (cfg.model.d_model, cfg.task.mix_mem, cfg.model.split_mlp, cfg.train.engine) == (w, m, m > 0, "reference")
        assert cfg.task.n_train_op == base.task.n_train_op  # the same operation's training set in every cell
    assert t.loc[(32, 0), "best_test_acc"] > 0.9  # wide enough alone, it generalises
    assert t.loc[(32, 150), "mem_train_acc"] > 0.9  # the mixture fits its random labels
    assert t.loc[(8, 0), "n_params"] < t.loc[(32, 0), "n_params"]
    # The summary's emergence width is the first width whose best test accuracy reaches 0.9.
    for m, info in res.summary["by_mem_size"].items():
        accs = t.xs(int(m), level="mem_size").best_test_acc
        first = next((int(w) for w, a in accs.sort_index().items() if a >= 0.9), None)
        assert info["emergence_width"] == first
    assert (tmp_path / "emg" / "emergence.csv").exists() and (tmp_path / "emg" / "emergence.json").exists()


def test_the_emergence_command_runs_and_refuses_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "emg"
    flags = ["--p", "11", "--frac", "0.5", "--d-mlp", "32", "--epochs", "20", "--checkpoint-every", "10",
             "--log-every", "10", "--seeds", "1", "--out", str(out)]
    done = run_cli("experiment", "emergence", "--widths", "8", "--mem-sizes", "0,12", "--split-mlp", *flags)
    assert done.returncode == 0, done.stderr
    assert "emergence: 2 rows" in done.stdout and (out / "emergence.html").exists()
    cfg = circuits.load_run(out / "runs" / "emg-w8-m12-s0").config
    assert (cfg.task.mix_mem, cfg.model.split_mlp, cfg.train.engine) == (12, True, "reference")
    bad = run_cli("experiment", "emergence", "--widths", "8", "--mem-sizes", "a", *flags)
    assert bad.returncode == 2 and "--mem-sizes" in bad.stderr and "Traceback" not in bad.stderr
