"""One trainer per run folder (issue 19, item 4): a second is refused by name, a dead holder's
lock is recovered, another host's record is refused, and nothing is written twice."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import circuits
from circuits.lock import RunFolderInUse, hold_run_folder
from circuits.store import LOCK_FILE
from tests.conftest import REPO, tiny_config
from tests.test_train import _cli_train_cmd, _wait_for_epoch


def test_a_second_trainer_on_a_folder_in_use_is_refused_and_nothing_is_doubled(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(_cli_train_cmd(out), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_epoch(out, 20, first)
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(_cli_train_cmd(out), cwd=REPO, capture_output=True, text=True)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1
        assert "in use" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    run = circuits.load_run(out)
    assert run.is_complete
    assert run.metrics.epoch.is_unique and run.metrics.epoch.is_monotonic_increasing
    assert not (out / LOCK_FILE).exists()  # the holder deletes it when it finishes


def test_a_dead_holders_lock_is_recovered(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    out.mkdir()
    # What a SIGKILLed trainer leaves: its record (the kernel dropped its fcntl lock).
    record = {"pid": int(gone.stdout), "host": socket.gethostname(), "since": "then"}
    (out / LOCK_FILE).write_text(json.dumps(record))
    run = circuits.train(tiny_config(epochs=5), out=out)
    assert run.is_complete and not (out / LOCK_FILE).exists()


def test_another_hosts_record_is_refused_by_name(tmp_path: Path) -> None:
    out = tmp_path / "run"
    circuits.train(tiny_config(epochs=5), out=out)
    record = {"pid": 4242, "host": "gpu-node-17", "since": "2026-12-04T00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunFolderInUse, match="gpu-node-17") as err:
        circuits.train(tiny_config(epochs=10), out=out)
    assert str(out / LOCK_FILE) in str(err.value)
    assert json.loads((out / LOCK_FILE).read_text()) == record  # left as it was
    assert circuits.load_run(out).epochs[-1] == 5  # and the run untouched


def test_the_lock_is_reentrant_for_its_thread_only(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with hold_run_folder(out):
        # The holding thread may train (circuits.train takes the lock again inside).
        circuits.train(tiny_config(epochs=5), out=out)
        assert (out / LOCK_FILE).exists()
        errors: list[BaseException] = []

        def other() -> None:
            try:
                # Not the finished run's config (a rerun of that one reads and writes nothing).
                circuits.train(tiny_config(epochs=10), out=out)
            except RunFolderInUse as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "another thread" in str(errors[0])
    assert not (out / LOCK_FILE).exists()
