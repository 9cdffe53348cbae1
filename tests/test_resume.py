"""A resume point that does not fit its run is refused by name (issue 19, item 3), and nothing
in the folder is changed; a resume point that fits goes on bit for bit (tests/test_train.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import circuits
from circuits.errors import RunFolderError
from circuits.store import RESUME_FILE, RunStore
from tests.conftest import run_cli, tiny_config

#: A run stopped (as if by Ctrl-C) at epoch 30 of 60.
STOPPED = 30


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stopped")
    full = circuits.train(tiny_config(), out=root / "full")
    part = root / "part"
    circuits.train(tiny_config(epochs=STOPPED), out=part)
    # Make it the 60-epoch run stopped at its epoch-30 save: the same files but the config.
    (part / "config.json").write_bytes((full.path / "config.json").read_bytes())
    return part


def _copy(src: Path, tmp_path: Path) -> tuple[Path, RunStore]:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, RunStore(dst)


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _refused(root: Path, match: str) -> None:
    before = _files(root)
    with pytest.raises(RunFolderError, match=match):
        circuits.train(tiny_config(), out=root)
    assert _files(root) == before  # refused before anything was written


def test_the_stopped_run_resumes(stopped: Path, tmp_path: Path) -> None:
    root, _ = _copy(stopped, tmp_path)
    assert circuits.train(tiny_config(), out=root).is_complete


def test_a_checkpoint_copied_over_the_resume_file_is_refused(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    shutil.copy(store.checkpoint_path(STOPPED), root / RESUME_FILE)
    _refused(root, "missing model.")
    (tmp_path / "cfg.json").write_text(tiny_config().to_json())
    r = run_cli("train", "--config", str(tmp_path / "cfg.json"), "--out", str(root))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "does not fit this run" in r.stderr and "Traceback" not in r.stderr


def test_a_tensor_of_the_wrong_shape_is_named(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    tensors, meta = store.read_resume()
    tensors["model.embed.W_E"] = tensors["model.embed.W_E"][:, :3]
    store.write_resume(tensors, meta)
    _refused(root, r"model.embed.W_E is torch.float32 \(12, 3\)")


def test_missing_moments_after_epoch_0_are_refused(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    tensors, meta = store.read_resume()
    store.write_resume({k: v for k, v in tensors.items() if not k.startswith("opt.")}, meta)
    _refused(root, "missing opt.")


def test_an_older_resume_file_than_the_checkpoints_is_refused(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    old = circuits.train(tiny_config(epochs=10), out=tmp_path / "e10").store
    shutil.copy(old.root / RESUME_FILE, root / RESUME_FILE)
    _refused(root, f"checkpoint at epoch {STOPPED}")


def test_weights_that_differ_from_the_same_epochs_checkpoint_are_refused(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    tensors, meta = store.read_resume()
    tensors["model.unembed.W_U"] = tensors["model.unembed.W_U"] + 1e-3
    store.write_resume(tensors, meta)
    _refused(root, f"differ from checkpoint {STOPPED}")


def test_an_epoch_or_engine_that_does_not_fit_is_refused(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    tensors, meta = store.read_resume()
    store.write_resume(tensors, {**meta, "epoch": 600})
    _refused(root, "epoch 600 is not one of this run's")
    store.write_resume(tensors, {**meta, "engine": "reference"})
    _refused(root, "'reference' engine")


def test_metrics_that_stop_short_of_the_resume_point_are_refused(stopped: Path, tmp_path: Path) -> None:
    root, store = _copy(stopped, tmp_path)
    store.truncate_metrics(STOPPED - 10)
    _refused(root, f"no row for epoch {STOPPED}")
    assert torch.equal(store.read_resume()[0]["rng.torch"], RunStore(stopped).read_resume()[0]["rng.torch"])
