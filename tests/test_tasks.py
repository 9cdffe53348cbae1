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
