"""A non-finite loss stops a run and keeps its last finite state (issue 19, item 10); an
ensemble's other members go on; analysis reads no phase from a non-finite curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits.errors import TrainingDiverged
from circuits.measures import phase_boundaries
from circuits.trainer import resume_epoch
from tests.conftest import run_cli, stop_at, tiny_config
from tests.test_ensemble import _assert_close_runs


def _all_finite(run: circuits.Run) -> bool:
    ckpts = all(torch.isfinite(t).all() for e in run.epochs for t in run.state_dict(e).values())
    return ckpts and bool(np.isfinite(run.metrics.drop(columns="epoch").to_numpy()).all())


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_a_diverging_run_stops_and_keeps_its_last_finite_state(tmp_path: Path, engine: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="not finite") as err:
        circuits.train(tiny_config(lr=1e6, engine=engine), out=out)
    seen, kept = err.value.runs[str(out)]
    run = circuits.load_run(out)
    assert seen <= 10 and kept < seen and run.epochs[-1] == kept == resume_epoch(run.store)
    assert _all_finite(run) and run.metrics.epoch.max() == kept
    assert not run.is_complete


def test_cli_reports_divergence_in_one_line(tmp_path: Path) -> None:
    r = run_cli("train", "--preset", "quick", "--p", "11", "--d-model", "32", "--d-mlp", "64",
                "--epochs", "60", "--lr", "1e6", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "diverged" in r.stderr and "--lr" in r.stderr and "Traceback" not in r.stderr


def test_in_an_ensemble_the_other_members_finish(tmp_path: Path) -> None:
    bad, good = tiny_config(lr=1e6, seed=1), tiny_config(seed=4)
    with pytest.raises(TrainingDiverged) as err:
        circuits.train_ensemble([bad, good], [tmp_path / "bad", tmp_path / "good"])
    assert list(err.value.runs) == [str(tmp_path / "bad")]
    assert _all_finite(circuits.load_run(tmp_path / "bad"))
    finished = circuits.load_run(tmp_path / "good")
    assert finished.is_complete
    # The diverged member's NaNs did not reach it: it is its run trained alone.
    _assert_close_runs(finished, circuits.train(good, out=tmp_path / "alone"))


def test_phases_are_not_read_from_a_non_finite_curve(tiny_run: circuits.Run, tmp_path: Path) -> None:
    epochs = np.arange(0, 60, 10)
    loss = np.array([2.0, 3.0, 1.0, np.nan, 0.01, 0.001])
    with pytest.raises(ValueError, match="not finite at epoch 30"):
        phase_boundaries(epochs, loss, np.ones(6))
    # A run folder whose last checkpoint went NaN (written before runs stopped on divergence).
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_run.path, root)
    run = circuits.load_run(root)
    last = run.epochs[-1]
    run.store.write_checkpoint(last, {k: torch.full_like(v, float("nan")) for k, v in run.state_dict(last).items()})
    result = circuits.analyze(circuits.load_run(root), out=tmp_path / "analysis")
    assert result.summary["phases"] is None
    assert f"from epoch {last}" in result.summary["phases_refused"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_a_diverged_run_is_marked_and_a_rerun_refuses_until_force(tmp_path: Path, engine: str) -> None:
    # design.md, "Divergence": marked in resume.json, a rerun refuses again (naming the learning
    # rate) without training or writing, and --force replaces the run.
    out = tmp_path / "run"
    cfg = tiny_config(lr=1e6, engine=engine)
    with pytest.raises(TrainingDiverged) as first:
        circuits.train(cfg, out=out)
    mark = circuits.load_run(out).store.diverged()
    seen, kept = first.value.runs[str(out)]
    assert mark == {"epoch": seen, "lr": 1e6}
    before = _files(out)
    with pytest.raises(TrainingDiverged, match="lr 1e\\+06") as again:
        circuits.train(cfg, out=out)
    assert again.value.runs == first.value.runs and _files(out) == before
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    r = run_cli("train", "--config", str(cfg_file), "--out", str(out))
    assert r.returncode == 2 and "diverged" in r.stderr and "lr 1e+06" in r.stderr and "--force" in r.stderr
    assert _files(out) == before
    info = run_cli("info", str(out))  # the mark is shown where a user looks at a run
    assert f"DIVERGED  at epoch {seen} (lr 1000000.0)" in info.stdout
    fixed = circuits.train(tiny_config(engine=engine), out=out, force=True)
    assert fixed.is_complete and fixed.store.diverged() is None


def test_an_ensemble_rerun_reports_its_diverged_member_and_leaves_the_rest(tmp_path: Path) -> None:
    bad, good = tiny_config(lr=1e6, seed=1), tiny_config(seed=4)
    outs = [tmp_path / "bad", tmp_path / "good"]
    with pytest.raises(TrainingDiverged):
        circuits.train_ensemble([bad, good], outs)
    before = [_files(o) for o in outs]
    with pytest.raises(TrainingDiverged) as err:
        circuits.train_ensemble([bad, good], outs)
    assert list(err.value.runs) == [str(outs[0])] and [_files(o) for o in outs] == before


def test_a_member_that_diverged_before_a_ctrl_c_is_marked(tmp_path: Path) -> None:
    bad, good = tiny_config(lr=1e6, seed=1), tiny_config(seed=4)
    outs = [tmp_path / "bad", tmp_path / "good"]

    with pytest.raises(KeyboardInterrupt):
        circuits.train_ensemble([bad, good], outs, on_step=stop_at(40))
    assert circuits.load_run(outs[0]).store.diverged() is not None
    assert circuits.load_run(outs[1]).store.diverged() is None and not circuits.load_run(outs[1]).is_complete
