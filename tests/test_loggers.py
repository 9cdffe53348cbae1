"""Metric logging to TensorBoard and W&B (offline) during training (issue 21, item 6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import circuits
from tests.conftest import run_cli, tiny_config


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_gets_every_logged_epoch(tmp_path: Path) -> None:
    _need("tensorboard")
    from circuits.loggers import tensorboard_logger

    run = circuits.train(tiny_config(epochs=30), out=tmp_path / "r", on_step=tensorboard_logger(tmp_path / "tb"))
    got = _scalars(tmp_path / "tb", "test/acc")
    m = run.metrics
    assert [s for s, _ in got] == m.epoch.tolist()
    assert [v for _, v in got] == pytest.approx(m.test_acc.tolist(), abs=1e-6)
    # From the command line, into the run folder; a wrong name is one line, exit 2.
    out = run_cli("train", "--preset", "quick", "--p", "11", "--d-model", "32", "--d-mlp", "64", "--epochs", "20",
                  "--checkpoint-every", "10", "--checkpoint-early-until", "0", "--log-every", "5",
                  "--out", str(tmp_path / "cli"), "--log-to", "tensorboard")
    assert out.returncode == 0, out.stderr
    assert [s for s, _ in _scalars(tmp_path / "cli" / "tensorboard", "train/loss")] == [0, 5, 10, 15, 20]
    bad = run_cli("train", "--p", "11", "--epochs", "5", "--out", str(tmp_path / "bad"), "--log-to", "mlflow")
    assert bad.returncode == 2 and "choose from tensorboard, wandb" in bad.stderr and not (tmp_path / "bad").exists()


def test_a_protocol_logs_every_member_under_its_name(tmp_path: Path) -> None:
    _need("tensorboard")
    out = run_cli("experiment", "phases", "--grid", "weight-decay=0.1,1", "--grid", "seed=1,2", "--p", "11",
                  "--d-model", "32", "--d-mlp", "64", "--epochs", "20", "--checkpoint-early-until", "0",
                  "--log-every", "5", "--out", str(tmp_path / "ph"), "--log-to", "tensorboard")
    assert out.returncode == 0, out.stderr
    members = sorted(p.parent for p in (tmp_path / "ph").rglob("config.json"))
    assert len(members) == 4
    for member in members:
        run = circuits.load_run(member)
        got = _scalars(tmp_path / "ph" / "tensorboard" / member.name, "train/loss")
        assert [s for s, _ in got] == run.metrics.epoch.tolist()
        assert [v for _, v in got] == pytest.approx(run.metrics.train_loss.tolist(), rel=1e-6)


def test_wandb_offline_run_holds_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need("wandb")
    from circuits.loggers import wandb_logger

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(epochs=20)
    run = circuits.train(cfg, out=tmp_path / "r",
                         on_step=wandb_logger(config=cfg, mode="offline", dir=str(tmp_path), name="tiny"))
    # wandb >= 0.19 keeps an offline run in one binary record file (read by its Go core, with no
    # Python reader): the logged keys and JSON values are in it as text.
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.count(b"test/acc") >= len(run.metrics)
    assert json.dumps(float(run.metrics.test_acc.iloc[-1])).encode() in data
    assert b"d_model" in data  # the run config went with it
    # An ensemble is one W&B run with every member's keys under its folder's name.
    runs = circuits.train_ensemble([cfg, tiny_config(epochs=20, seed=1)], [tmp_path / "e0", tmp_path / "e1"],
                                   on_step=wandb_logger(config=cfg, mode="offline", dir=str(tmp_path / "w2"),
                                                        name="ens"))
    files = list((tmp_path / "w2").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    for run in runs:
        assert data.count(f"{run.path.name}/test/acc".encode()) >= len(run.metrics)
        assert json.dumps(float(run.metrics.test_acc.iloc[-1])).encode() in data
