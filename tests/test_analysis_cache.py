"""The analysis cache cannot go stale (issue 19, items 2 and 6): rows are tied to the exact
checkpoints they read, default folders of different runs never collide, a folder that is not an
analysis's is never written into, and a damaged analysis folder is named, never served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import circuits
from circuits.analysis import (
    ARRAYS_FILE,
    MEASURES_FILE,
    SUMMARY_FILE,
    analyze,
    default_analysis_dir,
    load_analysis,
)
from circuits.cli import main as cli_main
from circuits.errors import AnalysisFolderError
from circuits.store import RunStore
from tests.conftest import REPO, run_cli, tiny_config


def _same(a, b) -> None:  # noqa: ANN001
    # A checkpoint analysed in another batch may differ in the last bits of its float32 matmuls.
    # The memorising part's excess is a difference of two norms of hundreds: its rounding is
    # that of mem_norm_sq, not relative to its own (small) value.
    excess = "mem_norm_sq_excess"
    cols = [c for c in a.columns if c != excess]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=False, rtol=1e-6, atol=1e-9)
    assert (excess in a.columns) == (excess in b.columns)
    if excess in a.columns:
        scale = float(a.mem_norm_sq.abs().max())
        assert np.allclose(a[excess], b[excess], rtol=0, atol=1e-6 * scale, equal_nan=True)


def _progress(calls: list[tuple[int, int]]):  # noqa: ANN202
    return lambda done, total: calls.append((done, total))


def test_a_run_retrained_with_force_is_recomputed_not_served_from_the_cache(tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "a"
    first = circuits.train(tiny_config(), out=run_dir)
    old = analyze(first, out=out, key_freqs=[1, 2])
    # Same config, same epochs, same folder name: only the weights differ.
    second = circuits.train(tiny_config(seed=7), out=run_dir, force=True)
    calls: list[tuple[int, int]] = []
    new = analyze(second, out=out, key_freqs=[1, 2], on_progress=_progress(calls))
    assert calls[-1][1] == len(second.epochs)  # every row recomputed
    fresh = analyze(second, out=tmp_path / "b", key_freqs=[1, 2])
    assert new.measures.equals(fresh.measures)
    assert not new.measures.weight_norm_sq.equals(old.measures.weight_norm_sq)
    assert load_analysis(out).measures.equals(fresh.measures)


def test_a_changed_checkpoint_is_recomputed_and_the_others_reused(
    tiny_run: circuits.Run, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    shutil.copytree(tiny_run.path, root)
    out = tmp_path / "a"
    analyze(root, out=out, key_freqs=[1, 2])
    # Replace one checkpoint by another epoch's weights, manifest updated (a consistent run).
    store = RunStore(root)
    epochs = store.checkpoint_epochs()
    store.write_checkpoint(epochs[3], store.read_checkpoint(epochs[-1]))
    calls: list[tuple[int, int]] = []
    again = analyze(root, out=out, key_freqs=[1, 2], on_progress=_progress(calls))
    assert calls[-1][1] == 1
    fresh = analyze(root, out=tmp_path / "b", key_freqs=[1, 2])
    _same(again.measures, fresh.measures)
    row = again.measures.set_index("epoch")
    assert row.loc[epochs[3], "weight_norm_sq"] == row.loc[epochs[-1], "weight_norm_sq"]


def test_another_runs_analysis_folder_is_not_reused(tmp_path: Path) -> None:
    a = circuits.train(tiny_config(), out=tmp_path / "x")
    b = circuits.train(tiny_config(seed=3), out=tmp_path / "y")
    out = tmp_path / "shared"
    analyze(a, out=out, key_freqs=[1])
    calls: list[tuple[int, int]] = []
    result = analyze(b, out=out, key_freqs=[1], on_progress=_progress(calls))
    assert calls[-1][1] == len(b.epochs)
    _same(result.measures, analyze(b, out=tmp_path / "fresh", key_freqs=[1]).measures)


def test_default_folders_of_runs_with_the_same_name_never_collide(
    tiny_run: circuits.Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for parent in ("e1", "e2"):
        shutil.copytree(tiny_run.path, tmp_path / parent / "run")
    one, two = (circuits.load_run(tmp_path / p / "run") for p in ("e1", "e2"))
    assert default_analysis_dir(one) != default_analysis_dir(two)
    assert default_analysis_dir(one).name.startswith("run-")
    # Under checkpoints/: the path below it, under analyses/ beside it.
    shutil.copytree(tiny_run.path, tmp_path / "checkpoints" / "e1" / "run")
    here = circuits.load_run(tmp_path / "checkpoints" / "e1" / "run")
    assert default_analysis_dir(here) == Path("analyses") / "e1" / "run"
    shutil.copytree(tiny_run.path, tmp_path / "lab" / "checkpoints" / "run")
    there = circuits.load_run(tmp_path / "lab" / "checkpoints" / "run")
    assert default_analysis_dir(there) == tmp_path / "lab" / "analyses" / "run"
    # Through the CLI: two analyses, each naming its own run.
    for run in (one, two):
        assert run_cli("analyze", str(run.path), cwd=tmp_path).returncode == 0
    for run in (one, two):
        summary = json.loads((tmp_path / default_analysis_dir(run) / SUMMARY_FILE).read_text())
        assert summary["run"] == str(run.path.resolve())


def test_a_folder_that_is_not_an_analysis_is_refused_and_left_untouched(
    tiny_run: circuits.Run, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(AnalysisFolderError, match="notes.txt"):
        analyze(tiny_run, out=mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file.csv"
    a_file.write_text("x")
    result = run_cli("analyze", str(tiny_run.path), "--out", str(a_file))
    assert result.returncode == 2 and "is a file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and a_file.read_text() == "x"
    # A run folder is not an analysis folder either.
    before = sorted(p.name for p in tiny_run.path.iterdir())
    result = run_cli("analyze", str(tiny_run.path), "--out", str(tiny_run.path))
    assert result.returncode == 2 and "not an analysis folder" in result.stderr
    assert sorted(p.name for p in tiny_run.path.iterdir()) == before


def test_a_disk_full_during_analysis_is_one_line_and_leaves_no_folder(
    tiny_run: circuits.Run, small_disk  # noqa: ANN001
) -> None:
    disk = small_disk(24 * 1024)  # room for the lock and measures.csv, not for the arrays
    out = disk / "a"
    with pytest.raises(OSError, match="No space"):
        analyze(tiny_run, out=out)
    assert not out.exists()
    result = run_cli("analyze", str(tiny_run.path), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "disk is full" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_read_only_disk_is_one_line(tiny_run: circuits.Run, small_disk) -> None:  # noqa: ANN001
    disk = small_disk(1024 * 1024, read_only=True)
    result = run_cli("analyze", str(tiny_run.path), "--out", str(disk / "a"))
    assert result.returncode == 2 and "cannot write" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_analysis_folder_in_use_is_refused_with_its_holder(tiny_run: circuits.Run, tmp_path: Path) -> None:
    out = tmp_path / "a"
    code = ("import sys; from circuits.lock import hold_run_folder\n"
            f"with hold_run_folder({str(out)!r}, doing='analysing into'):\n"
            "    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        result = run_cli("analyze", str(tiny_run.path), "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert f"pid {holder.pid}" in result.stderr and "analysing into" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (out / SUMMARY_FILE).exists()
    finally:
        holder.communicate("", timeout=60)
    assert analyze(tiny_run, out=out).measures.epoch.tolist() == tiny_run.epochs


# --- a damaged analysis folder is named by load_analysis and recomputed by analyze ---------

def _truncate_last_row(d: Path) -> None:
    text = (d / MEASURES_FILE).read_text()
    (d / MEASURES_FILE).write_text(text[: text.rstrip("\n").rfind(",") ])


def _measures_in_place(d: Path) -> None:
    # A row cut short, and summary.json's digest updated to match (as if written so).
    _truncate_last_row(d)
    s = json.loads((d / SUMMARY_FILE).read_text())
    s.pop("files")
    (d / SUMMARY_FILE).write_text(json.dumps(s))


def _summary_field(name: str, value: object):  # noqa: ANN202
    def damage(d: Path) -> None:
        s = json.loads((d / SUMMARY_FILE).read_text())
        s[name] = value
        (d / SUMMARY_FILE).write_text(json.dumps(s))
    return damage


def _arrays_from(other: Path):  # noqa: ANN202
    def damage(d: Path) -> None:
        shutil.copy(other / ARRAYS_FILE, d / ARRAYS_FILE)
        s = json.loads((d / SUMMARY_FILE).read_text())
        s.pop("files")
        (d / SUMMARY_FILE).write_text(json.dumps(s))
    return damage


DAMAGE = {
    "truncated row": (_truncate_last_row, MEASURES_FILE),
    "truncated row, no digests": (_measures_in_place, "fields"),
    "summary not utf-8": (lambda d: (d / SUMMARY_FILE).write_bytes(b"\xff\xfe{"), "not JSON"),
    "summary a list": (lambda d: (d / SUMMARY_FILE).write_text("[1, 2]"), "not a JSON object"),
    "summary wrong type": (_summary_field("n_checkpoints", "ten"), "n_checkpoints"),
    "key freqs wrong type": (_summary_field("key_frequencies", {"a": 1}), "key_frequencies"),
    "arrays garbage": (lambda d: (d / ARRAYS_FILE).write_bytes(b"garbage"), ARRAYS_FILE),
    "arrays gone": (lambda d: (d / ARRAYS_FILE).unlink(), ARRAYS_FILE),
    "measures gone": (lambda d: (d / MEASURES_FILE).unlink(), MEASURES_FILE),
    "text in a number": (
        lambda d: (d / MEASURES_FILE).write_text(
            (d / MEASURES_FILE).read_text().replace("\n1", "\nx", 1)), MEASURES_FILE),
}


@pytest.fixture(scope="module")
def short_analysis(tiny_run: circuits.Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("an") / "short"
    store = RunStore(tiny_run.path)
    # Arrays of another length: an analysis of the run's first three checkpoints, key set [1].
    root = tmp_path_factory.mktemp("short_run") / "run"
    shutil.copytree(tiny_run.path, root)
    short = RunStore(root)
    short._write_manifest(dict(list(sorted(store.read_manifest().items()))[:3]))
    analyze(root, out=out, key_freqs=[1])
    return out


@pytest.fixture(scope="module")
def good_analysis(tiny_run: circuits.Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("an") / "good"
    analyze(tiny_run, out=out, key_freqs=[1])
    return out


@pytest.mark.parametrize("case", sorted(DAMAGE) + ["arrays of another analysis"])
def test_a_damaged_analysis_folder_is_named_and_recomputed(
    case: str, tiny_run: circuits.Run, good_analysis: Path, short_analysis: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "a"
    shutil.copytree(good_analysis, out)
    good = load_analysis(out)
    damage, named = DAMAGE.get(case, (_arrays_from(short_analysis), ARRAYS_FILE))
    damage(out)
    with pytest.raises(AnalysisFolderError, match="damaged") as err:
        load_analysis(out)
    assert named in str(err.value) and "circuits analyze" in str(err.value)
    # The CLI's dashboard command names it in one line.
    assert cli_main(["dashboard", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "damaged" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    # analyze recomputes the whole folder and says so.
    calls: list[tuple[int, int]] = []
    again = analyze(tiny_run, out=out, key_freqs=[1], on_progress=_progress(calls))
    assert calls[-1][1] == len(tiny_run.epochs)
    assert again.measures.equals(good.measures)
    assert "damaged" in json.loads((out / SUMMARY_FILE).read_text())["previous_discarded"]
    assert load_analysis(out).measures.equals(good.measures)


def test_an_empty_field_of_an_older_table_reads_as_nan(tiny_run: circuits.Run, tmp_path: Path) -> None:
    out = tmp_path / "a"
    analyze(tiny_run, out=out, key_freqs=[1])
    lines = (out / MEASURES_FILE).read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("test_loss")
    row = lines[1].split(",")
    row[col] = ""
    lines[1] = ",".join(row)
    (out / MEASURES_FILE).write_text("\n".join(lines) + "\n")
    s = json.loads((out / SUMMARY_FILE).read_text())
    s.pop("files")  # as written before analyses recorded their digests
    (out / SUMMARY_FILE).write_text(json.dumps(s))
    back = load_analysis(out)
    assert torch.isnan(torch.tensor(back.measures.test_loss.iloc[0]))
    assert os.path.getsize(out / MEASURES_FILE) > 0
