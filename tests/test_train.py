"""Training: determinism, crash-safe resume (SIGKILL, Ctrl-C), refusal of a different config."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.utils.deterministic

import circuits
from circuits.config import preset
from circuits.errors import RunFolderError
from circuits.store import LOCK_FILE, RESUME_META_FILE, RunStore
from circuits.trainer import RunExistsError, lr_at
from tests.conftest import REPO, stop_at, tiny_config


def _assert_same_checkpoints(a: circuits.Run, b: circuits.Run) -> None:
    assert a.epochs == b.epochs
    for epoch in a.epochs:
        sa, sb = a.state_dict(epoch), b.state_dict(epoch)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (epoch, k)


def test_same_config_and_seed_give_bitwise_identical_weights(tmp_path: Path) -> None:
    a = circuits.train(tiny_config(), out=tmp_path / "a")
    b = circuits.train(tiny_config(), out=tmp_path / "b")
    _assert_same_checkpoints(a, b)
    assert a.metrics.equals(b.metrics)
    c = circuits.train(tiny_config(seed=1), out=tmp_path / "c")
    assert not torch.equal(c.state_dict(60)["embed.W_E"], a.state_dict(60)["embed.W_E"])


def test_nanda_width_training_is_bitwise_repeatable(tmp_path: Path) -> None:
    # At real widths the embedding backward runs on several threads; without deterministic
    # kernels two runs drifted apart within a few epochs (the tiny config above cannot show it).
    cfg = preset("quick").replace(epochs=20, checkpoint_every=20, log_every=20)
    # Deterministic kernels, but no NaN fill of every torch.empty (a debugging aid that costs
    # a kernel per allocation, one of the extra kernels a CUDA graph would replay each epoch).
    modes = []
    a = circuits.train(cfg, out=tmp_path / "a", on_step=lambda info: modes.append(
        (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)))
    b = circuits.train(cfg, out=tmp_path / "b")
    _assert_same_checkpoints(a, b)
    assert set(modes) == {(True, False)}
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's settings are restored
    assert torch.utils.deterministic.fill_uninitialized_memory


def test_training_learns_and_logs_every_checkpoint(tiny_run: circuits.Run) -> None:
    m = tiny_run.metrics
    assert list(m.columns) == ["epoch", "train_loss", "test_loss", "train_acc", "test_acc"]
    assert set(tiny_run.epochs) <= set(m.epoch)
    assert m.epoch.is_monotonic_increasing and m.epoch.is_unique
    assert m.train_loss.iloc[-1] < 0.5 * m.train_loss.iloc[0]
    assert tiny_run.is_complete


def test_frozen_biases_stay_zero_and_trained_ones_move(tiny_run: circuits.Run, tmp_path: Path) -> None:
    final = tiny_run.state_dict(tiny_run.epochs[-1])
    assert all(torch.all(v == 0) for k, v in final.items() if k.split(".")[-1].startswith("b_"))
    run = circuits.train(tiny_config(train_biases=True, epochs=10), out=tmp_path / "b")
    assert torch.any(run.state_dict(10)["blocks.0.mlp.b_in"] != 0)


def test_warmup_schedule_matches_official_lambda() -> None:
    cfg = preset("quick").replace(warmup_steps=10)
    assert [lr_at(cfg, s) for s in (0, 1, 5, 10, 50)] == [0.0, 1e-4, 5e-4, 1e-3, 1e-3]
    assert lr_at(preset("quick"), 0) == 1e-3


def test_engines_compute_the_same_training_in_float64() -> None:
    # The fused path changes the execution, not the math: in float64, 200 full-batch AdamW
    # epochs on both paths end at the same weights to ~1e-12 (in float32 the two drift apart
    # by rounding amplified through training, like any change in the order of operations).
    from circuits.engine.fused import last_logits
    from circuits.model import make_model
    from circuits.tasks import make_task
    from circuits.trainer import loss_fn

    cfg = tiny_config(lr=1e-3)
    x, y = make_task(cfg.task).train_data()
    finals = []
    for forward in (lambda m: last_logits(m, x), lambda m: m(x)[:, -1]):
        model = make_model(cfg).double()
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.98),
            weight_decay=1.0, foreach=False,
        )
        for _ in range(200):
            loss_fn(forward(model), y).backward()
            opt.step()
            opt.zero_grad()
        finals.append(dict(model.named_parameters()))
    for k, b in finals[1].items():
        torch.testing.assert_close(finals[0][k], b, rtol=1e-9, atol=1e-10, msg=k)


def test_engines_agree_over_200_float32_epochs(tmp_path: Path) -> None:
    cfg = tiny_config(epochs=200, checkpoint_every=200, lr=1e-3)
    fused = circuits.train(cfg, out=tmp_path / "f")
    ref = circuits.train(cfg.replace(engine="reference"), out=tmp_path / "r")
    mf, mr = fused.metrics, ref.metrics
    assert mf.epoch.tolist() == mr.epoch.tolist()
    for col in ("train_loss", "test_loss"):
        torch.testing.assert_close(
            torch.tensor(mf[col].values), torch.tensor(mr[col].values), rtol=0.02, atol=1e-4
        )
    assert fused.config.train.engine == "fused" and ref.config.train.engine == "reference"


def test_different_config_is_refused_and_force_overwrites(tiny_run: circuits.Run, tmp_path: Path) -> None:
    out = tmp_path / "run"
    circuits.train(tiny_config(epochs=5), out=out)
    with pytest.raises(RunExistsError, match="weight_decay"):
        circuits.train(tiny_config(epochs=5, weight_decay=0.5), out=out)
    run = circuits.train(tiny_config(epochs=5, weight_decay=0.5), out=out, force=True)
    assert run.config.train.weight_decay == 0.5


def _tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_force_replaces_only_a_run_and_only_its_own_files(tmp_path: Path) -> None:
    # A folder of the user's that is not a run: refused by name, not one byte touched.
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.csv").write_text("1,2")
    (mine / "config.json").write_text('{"some": "other tool"}')
    before = _tree(mine)
    with pytest.raises(RunFolderError, match="not a circuits config"):
        circuits.train(tiny_config(epochs=5), out=mine, force=True)
    (mine / "config.json").unlink()
    before.pop("config.json")
    with pytest.raises(RunFolderError, match="not a run folder"):
        circuits.train(tiny_config(epochs=5), out=mine, force=True)
    assert _tree(mine) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        circuits.train(tiny_config(epochs=5), out=afile, force=True)
    assert afile.read_text() == "x"
    # A run folder: its own files are replaced; a file the user put beside them stays.
    run_dir = tmp_path / "run"
    circuits.train(tiny_config(epochs=5), out=run_dir)
    (run_dir / "README.txt").write_text("my notes on this run")
    (run_dir / "checkpoints" / "my_export.pt").write_text("not ours")
    run = circuits.train(tiny_config(epochs=5, weight_decay=0.5), out=run_dir, force=True)
    assert run.config.train.weight_decay == 0.5 and run.epochs == [0, 5]
    assert (run_dir / "README.txt").read_text() == "my notes on this run"
    assert (run_dir / "checkpoints" / "my_export.pt").read_text() == "not ours"
    # An ensemble with --force checks every folder before clearing any.
    other = tmp_path / "other"
    circuits.train(tiny_config(epochs=5), out=other)
    kept = _tree(other)
    with pytest.raises(RunFolderError, match="not a run folder"):
        circuits.train_ensemble([tiny_config(epochs=5, seed=3)] * 2, [other, mine], force=True)
    assert _tree(other) == kept and _tree(mine) == before


def test_in_process_resume_extends_a_run_bitwise(tmp_path: Path) -> None:
    # Stopping after any epoch and resuming equals never stopping: resume from a mid-run point.
    full = circuits.train(tiny_config(), out=tmp_path / "full")
    part = tmp_path / "part"
    circuits.train(tiny_config(), out=part)
    store = RunStore(part)
    # Roll the folder back to its epoch-20 state, as if killed right after that save.
    resume_src = circuits.train(tiny_config(epochs=20), out=tmp_path / "e20").store
    (part / "resume.safetensors").write_bytes((resume_src.root / "resume.safetensors").read_bytes())
    for epoch in store.checkpoint_epochs():
        if epoch > 20:
            store.checkpoint_path(epoch).unlink()
    resumed = circuits.train(tiny_config(), out=part)
    _assert_same_checkpoints(full, resumed)
    assert resumed.metrics.equals(full.metrics)


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_both_engines_resume_bitwise_through_the_one_loop(tmp_path: Path, engine: str) -> None:
    # One loop, one resume codec (issue 18): an interrupted run of either engine resumes to the
    # bits of an uninterrupted one, warm-up included (the lr schedule is part of the state).
    cfg = tiny_config(engine=engine, warmup_steps=15)
    full = circuits.train(cfg, out=tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        circuits.train(cfg, out=tmp_path / "part", on_step=stop_at(23))
    resumed = circuits.train(cfg, out=tmp_path / "part")
    _assert_same_checkpoints(full, resumed)
    assert resumed.metrics.equals(full.metrics)
    for name in ("metrics.csv", "manifest.json"):  # the files themselves, not only their values
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def _cli_train_cmd(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "circuits.cli", "train", "--preset", "quick", "--p", "23",
        "--frac", "0.5", "--d-model", "32", "--n-heads", "2", "--d-mlp", "64",
        "--epochs", "600", "--checkpoint-every", "20", "--checkpoint-early-until", "0",
        "--log-every", "5", "--out", str(out),
    ]


def _wait_for_epoch(out: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll the run folder until its resume point reaches ``epoch``; return the epoch seen.

    A kill test picks its moment from the run's progress, never from wall-clock time, so it
    holds on a machine of any speed (the timeout only catches a hung trainer).
    """
    meta = out / RESUME_META_FILE
    t0 = time.monotonic()
    while True:
        try:
            seen = int(json.loads(meta.read_text())["epoch"])
        except (OSError, ValueError, KeyError):  # not written yet (replaced atomically)
            seen = -1
        if seen >= epoch:
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) at epoch {seen}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{out} did not reach epoch {epoch}")
        time.sleep(0.002)


#: The CLI run below has 600 epochs and a resume point every 20; a kill test waits for a
#: resume point drawn from the first half, so the other half is left when the signal lands.
_KILL_EPOCHS = range(20, 301, 20)


def test_sigkill_at_a_random_moment_then_resume_is_bitwise(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    rng = random.Random(os.getpid())
    target = rng.choice(_KILL_EPOCHS)
    proc = subprocess.Popen(_cli_train_cmd(out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    # The moment is drawn from the run's own progress: a resume point at random, then a
    # random fraction of the time the run just took between two resume points, so the kill
    # lands anywhere in the next interval (in its epochs or in the middle of its save) at
    # any machine speed.
    _wait_for_epoch(out, target - 20, proc)
    t0 = time.monotonic()
    _wait_for_epoch(out, target, proc)
    time.sleep(rng.uniform(0, time.monotonic() - t0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = RunStore(out).read_resume()[1]["epoch"]
    assert killed_at < 600, "the run finished before the kill; make it longer"
    assert (out / LOCK_FILE).exists()  # the dead trainer's record; its fcntl lock is gone
    done = subprocess.run(_cli_train_cmd(out), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (out / LOCK_FILE).exists()
    resumed = circuits.load_run(out)
    cfg = resumed.config
    reference = circuits.train(cfg, out=tmp_path / "straight")
    _assert_same_checkpoints(reference, resumed)
    assert resumed.metrics.equals(reference.metrics)


def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_cli_train_cmd(out), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(out, random.Random(os.getpid()).choice(_KILL_EPOCHS), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Rerun the same command to resume" in err and "Traceback" not in err
    saved = RunStore(out).read_resume()[1]["epoch"]
    assert 0 < saved < 600
    metrics = circuits.load_run(out).metrics
    assert metrics.epoch.max() <= saved
    done = subprocess.run(_cli_train_cmd(out), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reference = circuits.train(circuits.load_run(out).config, out=tmp_path / "straight")
    _assert_same_checkpoints(reference, circuits.load_run(out))
