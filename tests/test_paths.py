"""Names that become paths are validated (issue 19, item 8): a config's preset, protocol
member names and grid values never write outside the folders they belong in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import circuits
from circuits.config import ConfigError
from circuits.errors import ProtocolError
from circuits.experiments.members import Member, run_members
from circuits.run import default_run_dir
from tests.conftest import run_cli, tiny_config


@pytest.mark.parametrize("preset", ["../../escape", "a/b", "..", ".hidden", "-flag", ""])
def test_a_preset_that_is_not_a_folder_name_is_refused(preset: str) -> None:
    with pytest.raises(ConfigError):
        default_run_dir(tiny_config().replace(preset=preset))


def test_cli_refuses_a_config_whose_preset_escapes_checkpoints(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    doc = json.loads(tiny_config(epochs=5).to_json())
    doc["preset"] = "../../escape"
    (work / "evil.json").write_text(json.dumps(doc))
    result = run_cli("train", "--config", str(work / "evil.json"), cwd=work)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot name a run folder" in result.stderr
    # Nothing was made, inside the working folder or above it.
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.json", "work"]


def test_a_member_name_that_is_not_a_folder_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="cannot name a run folder"):
        run_members([Member("../evil", tiny_config(epochs=5))], tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and not (tmp_path / "evil").exists()


def test_grid_values_with_slashes_name_flat_folders(tiny_run: circuits.Run, tmp_path: Path) -> None:
    from circuits.experiments import phase_diagram

    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        paths.append(str(tmp_path / sub / "start.safetensors"))
        shutil.copy(tiny_run.store.checkpoint_path(tiny_run.epochs[-1]), paths[-1])
    base = tiny_config(epochs=10, checkpoint_every=10, checkpoint_early_until=0)
    result = phase_diagram(tmp_path / "exp", {"init_from": paths, "weight_decay": [1.0]}, base=base)
    runs = tmp_path / "exp" / "runs"
    folders = sorted(p for p in runs.iterdir())
    assert len(folders) == 2 and all((f / "config.json").is_file() for f in folders)
    assert sorted(circuits.load_run(f).config.train.init_from for f in folders) == sorted(paths)
    assert set(result.table.run) == {f.name for f in folders}
