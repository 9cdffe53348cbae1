"""The CLI as a user meets it: one-line errors with exit code 2, info, train and resume."""

from __future__ import annotations

from pathlib import Path

import pytest

import circuits
from tests.conftest import run_cli

TINY_FLAGS = [
    "--p", "11", "--frac", "0.5", "--d-model", "32", "--n-heads", "4", "--d-mlp", "64",
    "--epochs", "30", "--checkpoint-every", "10", "--lr", "0.01",
]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--bogus", "1"], "No such option: --bogus"),
        (["train", "--lr", "abc"], "--lr"),
        (["train", "--p", "10"], "p must be a prime"),
        (["train", "--frac", "0.3", "--train-size", "100"], "exclude each other"),
        (["train", "--frac", "1.5"], "frac must lie in (0, 1]"),
        (["train", "--train-size", "99999"], "exceeds"),
        (["train", "--preset", "huge"], "unknown preset"),
        (["train", "--op", "pow"], "op must be one of"),
        (["info", "/nonexistent/run"], "does not exist"),
        (["info"], "Missing argument"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and lines[0].startswith("circuits: error:")


def test_help_is_available() -> None:
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--p", "--frac", "--train-size", "--weight-decay", "--checkpoint-every", "--seed"):
        assert flag in result.stdout


def test_train_info_resume_and_refusal(tmp_path: Path) -> None:
    out = tmp_path / "cli-run"
    first = run_cli("train", *TINY_FLAGS, "--out", str(out))
    assert first.returncode == 0, first.stderr
    run = circuits.load_run(out)
    assert run.is_complete and run.config.task.p == 11 and run.config.train.lr == 0.01
    again = run_cli("train", *TINY_FLAGS, "--out", str(out))
    assert again.returncode == 0 and "30" in again.stdout
    clash = run_cli("train", *TINY_FLAGS, "--weight-decay", "0.1", "--out", str(out))
    assert clash.returncode == 2
    assert "different config" in clash.stderr and "--force" in clash.stderr
    assert len(clash.stderr.strip().splitlines()) == 1
    info = run_cli("info", str(out))
    assert info.returncode == 0
    assert f"checkpoints {len(run.epochs)} (epochs 0..30 of 30, complete)" in info.stdout
    assert "p=11" in info.stdout and "train acc 100% at epoch" in info.stdout


def test_force_refuses_a_folder_that_is_not_a_run_in_one_line(tmp_path: Path) -> None:
    # `--out . --force` once emptied the current directory.
    (tmp_path / "thesis.tex").write_text("years of work")
    result = run_cli("train", *TINY_FLAGS, "--out", ".", "--force", cwd=tmp_path)
    assert result.returncode == 2
    assert "not a run folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_os_and_file_errors_are_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    r = run_cli("train", *TINY_FLAGS, "--out", str(afile))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "is a file where a folder is needed" in r.stderr and afile.read_text() == "mine"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run_cli("train", "--config", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "is not valid JSON" in r.stderr and "line 1, column 2" in r.stderr


def test_info_names_a_damaged_checkpoint(tiny_run: circuits.Run, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_run.path, root)
    victim = sorted((root / "checkpoints").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-10])
    info = run_cli("info", str(root))
    assert info.returncode == 1
    assert f"DAMAGED   {victim.name}" in info.stdout


def test_config_file_and_default_folder(tmp_path: Path) -> None:
    cfg = circuits.preset("quick").replace(p=11, frac=0.5, d_model=32, d_mlp=64, epochs=5)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    result = run_cli("train", "--config", str(path), "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = tmp_path / "checkpoints" / f"quick-{cfg.replace(epochs=3).short_hash()}"
    assert circuits.load_run(expected).config.train.epochs == 3
