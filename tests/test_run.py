"""The library's Run API: what a notebook does with a run folder."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import circuits
from circuits.trainer import evaluate


def test_load_run_exposes_config_task_epochs_metrics(tiny_run: circuits.Run) -> None:
    run = circuits.load_run(tiny_run.path)
    assert run.config == tiny_run.config
    assert run.epochs == run.config.train.checkpoint_epochs
    assert isinstance(run.metrics, pd.DataFrame) and len(run.metrics) > len(run.epochs) - 1
    train_idx, test_idx = run.store.read_split()
    assert torch.equal(run.task.train_idx, train_idx) and torch.equal(run.task.test_idx, test_idx)
    assert "p=11" in repr(run)


def test_model_at_epoch_reproduces_logged_metrics(tiny_run: circuits.Run) -> None:
    run = circuits.load_run(tiny_run.path)
    m = run.metrics.set_index("epoch")
    for epoch in (0, 20, run.epochs[-1]):
        model = run.model(epoch, exact=True)
        got = evaluate(model, run.task, run.config.train.engine)
        assert got["train_loss"] == pytest.approx(m.loc[epoch, "train_loss"], rel=1e-6)
        assert got["test_acc"] == pytest.approx(m.loc[epoch, "test_acc"])


def test_nearest_and_exact_epochs(tiny_run: circuits.Run) -> None:
    run = circuits.load_run(tiny_run.path)
    assert run.epochs[:7] == [0, 5, 10, 15, 20, 30, 40]
    assert run.nearest_epoch(23) == 20 and run.nearest_epoch(27) == 30
    assert run.nearest_epoch(25) == 20  # a tie goes to the earlier checkpoint
    assert run.nearest_epoch(10_000) == run.epochs[-1]
    with pytest.warns(UserWarning, match="using the nearest, epoch 30"):  # substitution is said
        assert torch.equal(run.model(27).W_E, run.model(30, exact=True).W_E)
    with pytest.raises(KeyError, match="nearest is 30"):
        run.model(27, exact=True)
    assert torch.equal(run.model().W_E, run.model(run.epochs[-1]).W_E)


def test_loaded_model_runs_with_cache(tiny_run: circuits.Run) -> None:
    run = circuits.load_run(tiny_run.path)
    model = run.model()
    logits, cache = model.run_with_cache(run.task.tokens)
    assert logits.shape == (run.config.task.p ** 2, 3, run.config.task.p)
    assert cache["blocks.0.mlp.hook_post"].shape[-1] == run.config.model.d_mlp


def test_first_epoch_is_the_first_logged_epoch_at_a_level(tiny_run: circuits.Run) -> None:
    m = tiny_run.metrics
    best = float(m.train_acc.max())
    at = tiny_run.first_epoch("train_acc", best)
    assert at == int(m.epoch[m.train_acc == best].iloc[0])
    assert all(m.train_acc[m.epoch < at] < best)
    assert tiny_run.first_epoch("train_acc", best + 1e-9) is None
    low = float(m.train_loss.min())
    assert tiny_run.first_epoch("train_loss", low, below=True) == int(m.epoch[m.train_loss == low].iloc[0])
    with pytest.raises(ValueError, match="no metric 'acc'.*test_acc"):
        tiny_run.first_epoch("acc", 0.5)
