"""One trainer per run folder: an fcntl lock on a lock file that names its holder.

Two ``circuits train`` on one folder used to both exit 0 with every metrics row written twice
(issue 19). Like git's ``index.lock``, a process that trains into a run folder first holds
``RUN_DIR/circuits.lock`` (:data:`circuits.store.LOCK_FILE`); a second is refused at once with
the holder's pid and host. The lock is an ``fcntl`` lock, which the kernel drops when its
process dies, so a run killed with SIGKILL never leaves the folder locked: the next trainer
finds the lock free, overwrites the dead holder's record and goes on. The file itself records
``{"pid", "host", "since"}`` for the message, and is deleted when the holder finishes.

A record naming another host whose lock this host can take (a network file system that does
not pass fcntl locks between hosts) is refused by name: that run may still be alive there.
Within one process the lock is re-entrant for the thread that holds it (``circuits.train``
takes it before clearing a folder with ``--force``, and the trainer takes it again).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from circuits.errors import RunFolderError
from circuits.store import LOCK_FILE

try:  # POSIX; elsewhere training runs unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunFolderInUse", "hold_run_folder", "hold_run_folders"]


class RunFolderInUse(RunFolderError):
    """Another process (or another thread of this one) is training into the run folder."""


_lock = threading.Lock()
#: Folders this process holds: resolved path -> (file descriptor, holding thread, depth).
_held: dict[Path, list[int]] = {}


def _record(doing: str) -> bytes:
    doc = {"pid": os.getpid(), "host": socket.gethostname(),
           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "doing": doing}
    return (json.dumps(doc) + "\n").encode()


def _read_record(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    try:
        doc = json.loads(data) if data.strip() else {}
        return doc if isinstance(doc, dict) else {}
    except ValueError:  # a torn or foreign record names no holder
        return {}


def _doing(doc: dict) -> str:
    doing = doc.get("doing")
    return doing if doing in ("training into", "analysing into", "reindexing") else "training into"


def _holder(doc: dict) -> str:
    return f"pid {doc.get('pid', '?')} on {doc.get('host', '?')} (since {doc.get('since', '?')})"


def _acquire(root: Path, doing: str) -> int:
    path = root / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            doc = _read_record(fd)
            os.close(fd)
            raise RunFolderInUse(
                f"{root} is in use: {_holder(doc)} is {_doing(doc)} it; wait for it to "
                "finish or stop it, or choose another --out"
            ) from None
        # The holder before us may have deleted the file between our open and our lock:
        # then we locked an unlinked file, and must lock the one now at the path instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    doc = _read_record(fd)
    if doc and doc.get("host") not in (None, socket.gethostname()):
        os.close(fd)
        raise RunFolderInUse(
            f"{root} is marked in use by {_holder(doc)}, another host, whose lock this host "
            f"cannot see; if that run has stopped, delete {path} and rerun"
        )
    os.ftruncate(fd, 0)  # a dead local holder's record, if any, is replaced
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, _record(doing))
    os.fsync(fd)
    return fd


def _release(root: Path, fd: int) -> None:
    # Delete while still holding the lock, so no one can lock this file after we let go.
    try:
        os.unlink(root / LOCK_FILE)
    except FileNotFoundError:
        pass
    os.close(fd)  # closing drops the fcntl lock


@contextmanager
def hold_run_folder(root: str | Path, doing: str = "training into") -> Iterator[None]:
    """Hold ``root``'s lock while inside (the folder is created if needed).

    ``doing`` ("training into", "analysing into") is recorded for the message a second
    process gets. An analysis folder is held the same way while ``analyze`` writes it.

    Raises :class:`RunFolderInUse`, naming the holder, when another process or another thread
    holds it. Re-entrant for the holding thread.
    """
    root = Path(root)
    if fcntl is None:  # pragma: no cover
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    key = root.resolve()
    me = threading.get_ident()
    with _lock:
        entry = _held.get(key)
        if entry is not None and entry[1] != me:
            raise RunFolderInUse(f"{root} is in use by another thread of this process")
        if entry is not None:
            entry[2] += 1
        else:
            _held[key] = [_acquire(root, doing), me, 1]
    try:
        yield
    finally:
        with _lock:
            entry = _held[key]
            entry[2] -= 1
            if entry[2] == 0:
                del _held[key]
                _release(root, entry[0])


@contextmanager
def hold_run_folders(roots: Sequence[str | Path]) -> Iterator[None]:
    """Hold every folder's lock while inside (taken in path order, so two callers that share
    folders cannot each hold half); a refusal releases the ones already taken."""
    with ExitStack() as stack:
        for root in sorted(roots, key=lambda r: str(Path(r).resolve())):
            stack.enter_context(hold_run_folder(root))
        yield
