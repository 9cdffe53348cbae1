"""Tasks: operation tables, the canonical order, the seeded split (TransformerLens fixture)."""

from __future__ import annotations

import pytest
import torch

from circuits.config import TaskConfig
from circuits.tasks import OPERATIONS, make_task


def _brute(op: str, a: int, b: int, p: int) -> int | None:
    inv = pow(b, p - 2, p) if b else None
    table = {
        "add": (a + b) % p,
        "sub": (a - b) % p,
        "mul": (a * b) % p,
        "div": (a * inv) % p if inv is not None else None,
        "mix1": (a * inv) % p if b % 2 == 1 else (a - b) % p,
        "x2_y2": (a**2 + b**2) % p,
        "x2_xy_y2": (a**2 + a * b + b**2) % p,
        "x2_xy_y2_x": (a**2 + a * b + b**2 + a) % p,
        "x3_xy": (a**3 + a * b) % p,
        "x3_xy2_y": (a**3 + a * b**2 + b) % p,
    }
    return table[op]


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_operation_tables_match_python_arithmetic(op: str) -> None:
    p = 13
    task = make_task(TaskConfig(p=p, op=op, frac=0.5))
    for a in range(p):
        for b in range(p):
            i = a * p + b
            assert task.tokens[i].tolist() == [a, b, p]
            expected = _brute(op, a, b, p)
            if expected is None:
                assert not task.valid[i]
            else:
                assert task.valid[i] and task.labels[i].item() == expected


def test_transformerlens_demo_split_fixture() -> None:
    # science.md: torch.manual_seed(598); randperm(113*113); first 3830 are train.
    task = make_task(TaskConfig(p=113, frac=0.3, data_seed=598))
    pairs = lambda idx: [(int(i) // 113, int(i) % 113) for i in idx[:5]]  # noqa: E731
    assert pairs(task.train_idx) == [(21, 31), (30, 98), (47, 10), (86, 21), (99, 83)]
    assert pairs(task.test_idx) == [(43, 40), (31, 42), (39, 63), (35, 61), (112, 102)]
    assert (len(task.train_idx), len(task.test_idx)) == (3830, 8939)


def test_split_partitions_valid_pairs_and_is_seeded() -> None:
    cfg = TaskConfig(p=11, op="div", frac=None, train_size=50, data_seed=3)
    task = make_task(cfg)
    both = torch.cat([task.train_idx, task.test_idx])
    assert len(task.train_idx) == 50
    assert sorted(both.tolist()) == torch.nonzero(task.valid).squeeze(1).tolist()
    again = make_task(cfg)
    assert torch.equal(again.train_idx, task.train_idx)
    other = make_task(TaskConfig(p=11, op="div", frac=None, train_size=50, data_seed=4))
    assert not torch.equal(other.train_idx, task.train_idx)


def test_saved_split_is_reused_not_rederived() -> None:
    cfg = TaskConfig(p=7, frac=0.5)
    derived = make_task(cfg)
    # Another valid split of the same size: the first pairs of the grid in order, so it cannot
    # be what the seeded shuffle derives.
    ordered = torch.nonzero(derived.valid).squeeze(1)
    n = len(derived.train_idx)
    train_idx, test_idx = ordered[:n], ordered[n:]
    assert not torch.equal(train_idx, derived.train_idx)
    task = make_task(cfg, train_idx, test_idx)
    assert torch.equal(task.train_idx, train_idx) and torch.equal(task.test_idx, test_idx)
    assert task.is_train().sum() == n and bool(task.is_train()[ordered[:n]].all())


def test_random_labels_are_seeded_symmetric_and_uniformish() -> None:
    p = 31
    task = make_task(TaskConfig(p=p, frac=0.5, random_labels=True, data_seed=5))
    grid = task.labels.reshape(p, p)
    assert torch.equal(grid, grid.T)
    assert not torch.equal(task.labels, make_task(TaskConfig(p=p, frac=0.5)).labels)
    counts = torch.bincount(task.labels, minlength=p).float()
    assert counts.min() > 0.4 * counts.mean()
    again = make_task(TaskConfig(p=p, frac=0.5, random_labels=True, data_seed=5))
    assert torch.equal(again.labels, task.labels)


def test_the_task_interface_describes_the_modular_tasks() -> None:
    # issue 18: the task, not p, tells the model, the grid forward and the measures its layout.
    from circuits.config import preset
    from circuits.grid import grid_forward, stack_state_dicts
    from circuits.model import make_model
    from circuits.tasks import ModularTask, task_class

    cfg = preset("quick").replace(p=13, d_model=16, d_mlp=32, n_heads=2)
    task = make_task(cfg.task)
    assert isinstance(task, ModularTask) and task_class(cfg.task) is ModularTask and task.has_fourier
    assert (task.n_elements, task.eq_token, task.n_tokens, task.n_classes, task.n_ctx) == (13, 13, 14, 13, 3)
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (task.n_tokens, task.n_classes, task.n_ctx)
    assert bool((task.tokens[:, 2] == task.eq_token).all()) and task.tokens.shape == (task.n_pairs, task.n_ctx)
    a, b = torch.tensor([0, 3, 12]), torch.tensor([5, 0, 12])
    assert torch.equal(task.tokens[task.pair_index(a, b), :2], torch.stack([a, b], 1))
    basis = task.fourier_basis()
    assert torch.allclose(basis @ basis.T, torch.eye(13, dtype=basis.dtype), atol=1e-12)
    dirs = task.answer_directions([1, 4])
    assert torch.allclose(dirs @ dirs.T, torch.eye(4, dtype=dirs.dtype), atol=1e-12)
    # Each direction depends on (a, b) through a + b mod p only: the answer of addition.
    s = (task.tokens[:, 0] + task.tokens[:, 1]) % 13
    for d in dirs:
        for v in range(13):
            assert torch.allclose(d[s == v], d[s == v][0].expand(13))
    # The grid forward reads the layout from the task: the same logits as from p, and the
    # hooked model's on every input.
    params = stack_state_dicts([make_model(cfg).state_dict()])
    by_task, _ = grid_forward(params, task, "relu")
    by_p, _ = grid_forward(params, 13, "relu")
    assert torch.equal(by_task, by_p)
    with torch.no_grad():
        hooked = make_model(cfg)(task.tokens)[:, -1]
    torch.testing.assert_close(by_task[0], hooked, rtol=1e-4, atol=1e-5)


def test_label_noise_corrupts_training_pairs_only_and_is_saved(tmp_path) -> None:  # noqa: ANN001
    # science.md, "Label noise": exactly round(f * n_train) training pairs get a seeded uniform
    # wrong label; test pairs stay clean; the corrupted indices are saved in the run folder.
    from circuits.config import ConfigError, preset
    from circuits.errors import RunFolderError
    from circuits.store import RunStore
    from safetensors.torch import load_file, save_file

    import circuits
    from tests.conftest import tiny_config

    cfg = TaskConfig(p=11, frac=0.5, label_noise=0.2)
    task = make_task(cfg)
    k = round(0.2 * cfg.n_train)
    assert len(task.noisy_idx) == k and bool(torch.isin(task.noisy_idx, task.train_idx).all())
    assert bool((task.labels[task.noisy_idx] != task.clean_labels[task.noisy_idx]).all())
    assert int((task.labels != task.clean_labels).sum()) == k
    assert torch.equal(task.labels[task.test_idx], task.clean_labels[task.test_idx])
    assert torch.equal(make_task(cfg).labels, task.labels)  # seeded
    # Wrong labels are uniform over the p - 1 wrong classes: every shift occurs on a big table.
    big = make_task(TaskConfig(p=31, frac=0.9, label_noise=0.5))
    shifts = (big.labels - big.clean_labels)[big.noisy_idx] % 31
    assert set(shifts.tolist()) == set(range(1, 31))
    with pytest.raises(ConfigError, match="label_noise"):
        TaskConfig(p=11, label_noise=1.0)
    with pytest.raises(ConfigError, match="random_labels"):
        TaskConfig(p=11, label_noise=0.1, random_labels=True)
    # Left at 0 it does not change a config's hash (the default run folder keeps its name).
    assert preset("quick").replace(label_noise=0.0).short_hash() == preset("quick").short_hash()
    assert preset("quick").replace(label_noise=0.1).short_hash() != preset("quick").short_hash()
    # Saved in the split file; the run's task reads it back; a tampered list is named.
    run = circuits.train(tiny_config(label_noise=0.1, epochs=20), out=tmp_path / "r")
    split = RunStore(run.path).split_path
    saved = load_file(split)
    assert torch.equal(saved["noisy"], run.task.noisy_idx) and len(saved["noisy"]) > 0
    trained_on = run.task.labels[run.task.train_idx]
    assert not torch.equal(trained_on, run.task.clean_labels[run.task.train_idx])
    saved["noisy"] = saved["noisy"][1:]
    save_file(saved, split)
    with pytest.raises(RunFolderError, match="corrupted-label pairs"):
        circuits.load_run(run.path).task  # noqa: B018
