"""Shared fixtures: a tiny config, one trained tiny run, and one `quick` run that groks.

Real small computation, no mocks (design.md): the tiny run takes about a second; the quick run
(p = 59, ~3k epochs) takes a few minutes and is shared by every science test of the session.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import circuits
from circuits.config import RunConfig, preset
from tests import forked_cli


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (science runs over 30 s: design.md, CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # design.md: a CI science run takes at most 30 s; a longer one is marked slow, runs with
    # --runslow, and its results are recorded in docs/.
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="a slow science run (> 30 s); run it with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

REPO = Path(__file__).resolve().parents[1]


#: Marks a test that needs a CUDA GPU (CI has none; run them on a GPU machine).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def tiny_config(**overrides: object) -> RunConfig:
    """A small run: p = 11, narrow widths, lr 1e-2, 60 epochs (memorises), checkpoints every 10."""
    base = preset("quick-v1").replace(
        p=11, frac=0.5, d_model=32, n_heads=4, d_mlp=64, epochs=60, checkpoint_every=10,
        checkpoint_early_every=5, checkpoint_early_until=20, log_every=5, lr=1e-2, preset="tiny",
    )
    return base.replace(**overrides) if overrides else base


def stop_at(epoch: int):  # noqa: ANN201
    """An ``on_step`` that raises KeyboardInterrupt after ``epoch`` (no save: the folder keeps its
    last resume point, as a kill would leave it)."""

    def on_step(info) -> None:  # noqa: ANN001
        if info.epoch == epoch:
            raise KeyboardInterrupt

    return on_step


def stopped_and_resumed(config: RunConfig, out: Path, epoch: int) -> circuits.Run:
    """Train ``config`` into ``out``, stopped after ``epoch`` as a Ctrl-C would, then resumed."""
    with pytest.raises(KeyboardInterrupt):
        circuits.train(config, out=out, on_step=stop_at(epoch))
    return circuits.train(config, out=out)


def assert_same_weights(a: circuits.Run, b: circuits.Run) -> None:
    """Both runs have the same checkpoints, each equal bit for bit (the epoch named if not)."""
    assert a.epochs == b.epochs
    for e in a.epochs:
        x, y = a.state_dict(e), b.state_dict(e)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"epoch {e} differs"


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Tests that draw random weights do so from a known state.
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> circuits.Run:
    """One trained tiny run shared by the read-only tests."""
    return circuits.train(tiny_config(), out=tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> circuits.Run:
    """The `quick` preset trained to the end: a real grokking run (a few minutes on 2 cores)."""
    return circuits.train(preset("quick"), out=tmp_path_factory.mktemp("runs") / "quick")


@pytest.fixture(scope="session")
def quick_analysis(quick_run: circuits.Run, tmp_path_factory: pytest.TempPathFactory) -> circuits.Analysis:
    """The quick run analysed once, for the science tests that read its curves."""
    return circuits.analyze(quick_run, out=tmp_path_factory.mktemp("analyses") / "quick")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``circuits ARGS`` in a process of its own, as a user would (started warm: forked_cli)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return forked_cli.run(list(args), cwd=cwd or REPO, env=env, timeout=timeout)


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """``mount(size, read_only=False) -> folder``: a real tmpfs of ``size`` bytes (design.md).

    Disk-full and read-only cases need a real file system: CI runs as root, so chmod cannot make
    a folder unwritable. Outside CI a machine that cannot mount skips these tests; in CI (the
    ``CI`` environment variable set) that is a failure.
    """
    mounted: list[Path] = []

    def mount(size: int, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); runs in CI")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
