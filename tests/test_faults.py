"""Fault injection on real tiny runs (issue 19, items 5, 6, 9 and 11): a damaged or missing
manifest, files that parse but do not fit, a full or read-only disk, a failed start, a finished
run rerun, a torn metrics table, orphan temporary files. Each is refused by name (CLI: one line,
exit 2; `circuits info`: a line per problem, exit 1) or recovered bit-equal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import circuits
from circuits.analysis import analyze
from circuits.cli import main as cli_main
from circuits.errors import RunFolderError
from circuits.store import MANIFEST_FILE, METRICS_FILE, SPLIT_FILE, RunStore
from tests.conftest import run_cli, stop_at, tiny_config


def _one_line(result) -> str:  # noqa: ANN001
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _copy(run: circuits.Run, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run.path, dest)
    return dest


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


# --- item 5: the manifest -------------------------------------------------------------------

MANIFEST_DAMAGE = {
    "not utf-8": lambda m: b"\xff\xfe\x00{",
    "a list": lambda m: b"[]",
    "epoch a string": lambda m: _edit(m, "epoch", "10"),
    "sha256 short": lambda m: _edit(m, "sha256", "abc"),
    "bytes a float": lambda m: _edit(m, "bytes", 1.5),
    "name of another epoch": lambda m: _edit(m, "epoch", 7),
}


def _edit(manifest: bytes, field: str, value: object) -> bytes:
    doc = json.loads(manifest)
    first = sorted(doc["checkpoints"])[1]
    doc["checkpoints"][first][field] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_named_with_the_fix(
    case: str, tiny_run: circuits.Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(tiny_run, tmp_path)
    path = root / MANIFEST_FILE
    path.write_bytes(MANIFEST_DAMAGE[case](path.read_bytes()))
    with pytest.raises(RunFolderError, match="reindex") as err:
        circuits.load_run(root).epochs
    assert MANIFEST_FILE in str(err.value)
    # The CLI, in this process (the subprocess tests above cover the entry point itself).
    capsys.readouterr()
    assert cli_main(["info", str(root)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "reindex" in out
    # A resume refuses it in one line; reindex rebuilds it and the run is whole again.
    assert cli_main(["train", "--config", str(root / "config.json"), "--out", str(root)]) == 2
    err_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "reindex" in err_line and MANIFEST_FILE in err_line
    assert cli_main(["reindex", str(root)]) == 0
    assert circuits.load_run(root).epochs == tiny_run.epochs
    assert cli_main(["info", str(root)]) == 0


def test_a_deleted_manifest_is_reported_reindexed_and_the_run_resumes_bitwise(tmp_path: Path) -> None:
    cfg = tiny_config()
    whole = circuits.train(cfg, out=tmp_path / "whole")
    root = tmp_path / "run"

    with pytest.raises(BaseException):  # noqa: B017, PT011 - TrainingInterrupted or KeyboardInterrupt
        circuits.train(cfg, out=root, on_step=stop_at(30))
    (root / MANIFEST_FILE).unlink()
    run = circuits.load_run(root)
    assert run.epochs == [] and len(run.unindexed()) > 0
    info = run_cli("info", str(root))
    assert info.returncode == 1 and "UNINDEXED" in info.stdout
    with pytest.raises(RunFolderError, match="reindex"):
        circuits.train(cfg, out=root)
    added, skipped = run.reindex()
    assert skipped == [] and added == [e for e in whole.epochs if e <= max(added)]
    resumed = circuits.train(cfg, out=root)
    assert resumed.epochs == whole.epochs
    for e in whole.epochs:
        for k, v in whole.state_dict(e).items():
            assert torch.equal(v, resumed.state_dict(e)[k]), (e, k)


def test_reindex_leaves_out_a_file_that_does_not_fit(tiny_run: circuits.Run, tmp_path: Path) -> None:
    root = _copy(tiny_run, tmp_path)
    store = RunStore(root)
    (root / MANIFEST_FILE).unlink()
    bad = store.checkpoint_path(tiny_run.epochs[2])
    bad.write_bytes(b"not safetensors")
    other = store.checkpoint_path(tiny_run.epochs[3])
    save_file({"embed.W_E": torch.zeros(3, 3)}, str(other), metadata={"epoch": str(tiny_run.epochs[3])})
    result = run_cli("reindex", str(root))
    assert result.returncode == 1
    assert bad.name in result.stderr and other.name in result.stderr
    assert circuits.load_run(root).epochs == [e for e in tiny_run.epochs if e not in tiny_run.epochs[2:4]]


# --- item 6: files that parse but do not fit ------------------------------------------------

def test_a_checkpoint_of_another_shape_with_a_valid_checksum_is_named(tiny_run: circuits.Run, tmp_path: Path) -> None:
    root = _copy(tiny_run, tmp_path)
    store = RunStore(root)
    epoch = tiny_run.epochs[4]
    weights = store.read_checkpoint(epoch)
    weights["embed.W_E"] = torch.zeros(5, 7)
    store.write_checkpoint(epoch, weights)  # the manifest records it: checksum fine
    run = circuits.load_run(root)
    with pytest.raises(RunFolderError, match="embed.W_E"):
        run.state_dict(epoch)
    info = run_cli("info", str(root))
    assert info.returncode == 1 and "embed.W_E" in info.stdout and "does not fit" in info.stdout
    result = analyze(run, out=tmp_path / "a", key_freqs=[1])
    assert epoch not in result.measures.epoch.tolist() and len(result.damaged) == 1


@pytest.mark.parametrize("case", ["out of range", "duplicate", "overlap", "float", "too few"])
def test_a_split_that_does_not_fit_the_config_is_named(case: str, tiny_run: circuits.Run, tmp_path: Path) -> None:
    root = _copy(tiny_run, tmp_path)
    split = load_file(str(root / SPLIT_FILE))
    train, test = split["train"], split["test"]
    p = tiny_run.config.task.p
    if case == "out of range":
        train = train.clone()
        train[0] = p * p + 3
    elif case == "duplicate":
        train = torch.cat([train[:-1], train[:1]])
    elif case == "overlap":
        test = torch.cat([test, train[:1]])
    elif case == "float":
        train = train.double()
    else:
        train = train[:-1]
    save_file({"train": train, "test": test}, str(root / SPLIT_FILE))
    with pytest.raises(RunFolderError, match="split file"):
        circuits.load_run(root).task
    if case != "out of range":
        return  # every case reaches the CLI through the same RunFolderError: one is enough there
    info = run_cli("info", str(root))
    assert info.returncode == 1 and "split file" in info.stdout
    result = run_cli("analyze", str(root), "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and "split file" in _one_line(result)


# --- item 9: OS errors and failed starts ----------------------------------------------------

def test_a_config_too_large_for_memory_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    for engine in ("fused", "reference"):
        out = tmp_path / engine
        result = run_cli("train", "--preset", "quick", "--p", "100003", "--engine", engine, "--out", str(out))
        assert result.returncode == 2 and "out of memory" in _one_line(result)
        assert not out.exists()


def test_a_full_disk_at_start_and_during_a_save_is_one_line_and_resumes(
    tmp_path: Path, small_disk  # noqa: ANN001
) -> None:
    cfg = tiny_config()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    # At start: not even the split fits.
    tiny = small_disk(2 * 1024)
    result = run_cli("train", "--config", str(cfg_file), "--out", str(tiny / "run"))
    assert result.returncode == 2 and "disk is full" in _one_line(result)
    assert not (tiny / "run").exists()
    # During a save: room for a few checkpoints only.
    disk = small_disk(300 * 1024)
    out = disk / "run"
    result = run_cli("train", "--config", str(cfg_file), "--out", str(out))
    assert result.returncode == 2 and "disk is full" in _one_line(result)
    partial = circuits.load_run(out)
    assert 0 < len(partial.epochs) and partial.verify() == []
    # Room again: the same command finishes the run, bit-equal to one never interrupted.
    shutil.copytree(out, tmp_path / "resumed")
    finished = circuits.train(cfg, out=tmp_path / "resumed")
    whole = circuits.train(cfg, out=tmp_path / "whole")
    assert finished.epochs == whole.epochs
    for k, v in whole.state_dict(whole.epochs[-1]).items():
        assert torch.equal(v, finished.state_dict(whole.epochs[-1])[k])


# --- item 11: the smaller defects -----------------------------------------------------------

def test_a_finished_run_rerun_writes_nothing_even_on_a_read_only_disk(
    tiny_run: circuits.Run, tmp_path: Path, small_disk  # noqa: ANN001
) -> None:
    before = _files(tiny_run.path)
    again = circuits.train(tiny_config(), out=tiny_run.path)
    assert _files(tiny_run.path) == before and again.epochs == tiny_run.epochs
    import subprocess

    disk = small_disk(16 * 1024 * 1024)
    shutil.copytree(tiny_run.path, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_config().to_dict()))
    result = run_cli("train", "--config", str(cfg_file), "--out", str(disk / "run"))
    assert result.returncode == 0, result.stderr
    assert _files(disk / "run") == before


def test_a_torn_last_metrics_row_is_trained_again_and_a_hole_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config()
    whole = circuits.train(cfg, out=tmp_path / "whole")
    root = tmp_path / "run"

    with pytest.raises(BaseException):  # noqa: B017, PT011
        circuits.train(cfg, out=root, on_step=stop_at(32))
    metrics = root / METRICS_FILE
    text = metrics.read_text()
    # A kill mid-append: the rows after the resume point end in a cut line.
    metrics.write_text(text + "40,0.12")
    resumed = circuits.train(cfg, out=root)
    assert resumed.metrics.equals(whole.metrics)
    # A row lost in the middle (damage, not a kill) is refused, not dropped for good.
    stopped = tmp_path / "hole"
    with pytest.raises(BaseException):  # noqa: B017, PT011
        circuits.train(cfg, out=stopped, on_step=stop_at(32))
    lines = (stopped / METRICS_FILE).read_text().splitlines(keepends=True)
    lines[2] = "10,0.5,garbage\n"
    (stopped / METRICS_FILE).write_text("".join(lines))
    with pytest.raises(RunFolderError, match="line 3"):
        circuits.train(cfg, out=stopped)
    assert run_cli("info", str(stopped)).returncode == 1


def test_orphan_temporary_files_are_removed_under_the_lock_and_nothing_else(tmp_path: Path) -> None:
    cfg = tiny_config()
    root = tmp_path / "run"

    with pytest.raises(BaseException):  # noqa: B017, PT011
        circuits.train(cfg, out=root, on_step=stop_at(20))
    orphans = [root / ".manifest.json.x1y2.tmp", root / ".resume.safetensors.abc.tmp",
               root / "checkpoints" / ".epoch_000000030.safetensors.q9.tmp"]
    mine = [root / "notes.tmp", root / "checkpoints" / ".mine.tmp"]
    for f in orphans + mine:
        f.write_bytes(b"partial")
    circuits.train(cfg, out=root)
    assert not any(f.exists() for f in orphans)
    assert all(f.read_bytes() == b"partial" for f in mine)


def test_info_checks_the_resume_point(tiny_run: circuits.Run, tmp_path: Path) -> None:
    root = _copy(tiny_run, tmp_path)
    # A checkpoint copied over the resume file (issue 19, item 3) is named by info.
    shutil.copy(RunStore(root).checkpoint_path(tiny_run.epochs[2]), root / "resume.safetensors")
    info = run_cli("info", str(root))
    assert info.returncode == 1 and "resume" in info.stdout and "DAMAGED" in info.stdout
