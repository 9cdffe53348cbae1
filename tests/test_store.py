"""Run store: bit-exact checkpoints, damage named, atomic writes, metrics, resume point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import circuits
from circuits.store import CheckpointError, RunFolderError, RunStore, atomic_write_bytes


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.W_E": torch.randn(12, 8, generator=g), "unembed.b_U": torch.zeros(11)}


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    w = _weights()
    path = store.write_checkpoint(120, w)
    assert path.name == "epoch_000000120.safetensors"
    back = store.read_checkpoint(120)
    assert back.keys() == w.keys()
    for k in w:
        assert back[k].dtype == torch.float32 and torch.equal(back[k], w[k])
    assert store.checkpoint_epochs() == [120]
    assert store.verify() == []


def _damage_copy(run: circuits.Run, tmp_path: Path) -> tuple[RunStore, int, Path]:
    root = tmp_path / "damaged"
    shutil.copytree(run.path, root)
    store = RunStore(root)
    epoch = store.checkpoint_epochs()[3]
    return store, epoch, store.checkpoint_path(epoch)


def test_corrupted_checkpoint_is_named(tiny_run: circuits.Run, tmp_path: Path) -> None:
    store, epoch, path = _damage_copy(tiny_run, tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=path.name) as info:
        store.read_checkpoint(epoch)
    assert info.value.path == path and "checksum" in str(info.value)
    assert [e.path for e in store.verify()] == [path]
    with pytest.raises(CheckpointError, match=path.name):
        circuits.load_run(store.root).model(epoch)


def test_truncated_and_missing_checkpoints_are_named(tiny_run: circuits.Run, tmp_path: Path) -> None:
    store, epoch, path = _damage_copy(tiny_run, tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated") as info:
        store.read_checkpoint(epoch)
    assert path.name in str(info.value)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        store.read_checkpoint(epoch)
    assert path.name in str(info.value)
    # Unverified reads still parse-check: garbage of the right length is caught by safetensors.
    path.write_bytes(b"\x00" * tiny_run.store.read_manifest()[path.name]["bytes"])
    with pytest.raises(CheckpointError, match=path.name):
        store.read_checkpoint(epoch, verify=False)


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_metrics_append_truncate_and_partial_line(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    rows = [
        {"epoch": e, "train_loss": 1 / (e + 1), "test_loss": 2.0, "train_acc": 0.5, "test_acc": 0.25}
        for e in range(0, 50, 10)
    ]
    store.append_metrics(rows[:3])
    store.append_metrics(rows[3:])
    back = store.read_metrics_rows()
    assert back == rows  # repr round-trips floats exactly
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("50,0.1,0.")  # a kill in the middle of a line
    assert store.read_metrics_rows() == rows
    store.truncate_metrics(20)
    assert [r["epoch"] for r in store.read_metrics_rows()] == [0, 10, 20]


def test_resume_point_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.read_resume() is None
    tensors = {"model.x": torch.arange(5.0), "rng.torch": torch.get_rng_state()}
    store.write_resume(tensors, {"epoch": 7, "step": 7, "engine": "fused"})
    back, meta = store.read_resume()
    assert meta == {"epoch": 7, "step": 7, "engine": "fused"}
    assert torch.equal(back["model.x"], tensors["model.x"])
    (tmp_path / "resume.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match="resume.safetensors"):
        store.read_resume()


def test_missing_run_folder_and_config_are_clear(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="does not exist"):
        circuits.load_run(tmp_path / "nope")
    with pytest.raises(RunFolderError, match="config.json is missing"):
        circuits.load_run(tmp_path)


def test_run_folder_layout(tiny_run: circuits.Run) -> None:
    names = {p.name for p in tiny_run.path.iterdir()}
    assert names == {
        "config.json", "split.safetensors", "metrics.csv", "manifest.json",
        "resume.safetensors", "resume.json", "checkpoints",
    }
    files = sorted(p.name for p in (tiny_run.path / "checkpoints").iterdir())
    assert files == [f"epoch_{e:09d}.safetensors" for e in tiny_run.config.train.checkpoint_epochs]
    versions = tiny_run.store.read_versions()
    assert set(versions) == {"circuits", "torch", "python"}
