"""The run folder: atomic writes, checkpoints, manifest, metrics, resume state.

Layout (a contract read by notebooks, analyses and dashboards)::

    RUN_DIR/config.json              resolved RunConfig + versions
    RUN_DIR/split.safetensors        int64 ``train`` / ``test`` canonical indices (a*p + b)
    RUN_DIR/metrics.csv              append-only: epoch, train/test loss and accuracy
    RUN_DIR/checkpoints/epoch_{:09d}.safetensors   float32 weights after ``epoch`` updates
    RUN_DIR/manifest.json            checkpoint file -> sha256 and size
    RUN_DIR/resume.safetensors       weights, optimizer moments, RNG state (replaced atomically)
    RUN_DIR/resume.json              epoch, step, engine of the resume point
    RUN_DIR/circuits.lock            while a trainer runs: its pid and host (circuits.lock)

and of an analysis folder (written by :mod:`circuits.analysis`, the dashboard by its caller)::

    ANALYSIS_DIR/measures.csv        one row per checkpoint, one column per measure
    ANALYSIS_DIR/arrays.safetensors  per-checkpoint arrays ([ckpt, ...])
    ANALYSIS_DIR/summary.json        key frequencies, phases, final values, inputs read
    ANALYSIS_DIR/dashboard.html      the run's dashboard (circuits.report)

Every file name lives here. torch and safetensors load on the first tensor read or write, so
the CLI's argument checks can import this module and still answer at once.

Every file is written to a temporary name, fsynced and renamed, so a kill at any moment
leaves either the old or the new file, never half of one. No pickle anywhere.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from circuits.config import ConfigError, RunConfig
from circuits.errors import CheckpointError, RunFolderError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "CONFIG_FILE",
    "SPLIT_FILE",
    "METRICS_FILE",
    "MANIFEST_FILE",
    "RESUME_FILE",
    "RESUME_META_FILE",
    "CHECKPOINT_DIR",
    "MEASURES_FILE",
    "ARRAYS_FILE",
    "SUMMARY_FILE",
    "DASHBOARD_FILE",
    "LOCK_FILE",
    "METRIC_COLUMNS",
    "CheckpointError",
    "RunFolderError",
    "require_run_dir",
    "RunStore",
    "atomic_write_bytes",
    "checkpoint_name",
    "clear_run_folder",
    "is_safe_name",
    "safe_name_part",
    "file_sha256",
    "member_run_folders",
    "RUNS_DIR",
]

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.safetensors"
METRICS_FILE = "metrics.csv"
MANIFEST_FILE = "manifest.json"
RESUME_FILE = "resume.safetensors"
RESUME_META_FILE = "resume.json"
CHECKPOINT_DIR = "checkpoints"
MEASURES_FILE = "measures.csv"
ARRAYS_FILE = "arrays.safetensors"
SUMMARY_FILE = "summary.json"
DASHBOARD_FILE = "dashboard.html"
#: Held (fcntl) by the process training into the folder; records its pid and host
#: (circuits.lock). Deleted when that process finishes; never one of the run's own files.
LOCK_FILE = "circuits.lock"
#: Written by ``circuits import``: where an imported run came from (its presence: the run
#: analyses but does not train).
SOURCE_FILE = "source.json"
METRIC_COLUMNS = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^epoch_(\d{9})\.safetensors$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: atomic_write_bytes's temporary name for a checkpoint.
_CKPT_TMP_RE = re.compile(r"^\.epoch_\d{9}\.safetensors\.[^/]+\.tmp$")


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}$")


def is_safe_name(name: object) -> bool:
    """Whether ``name`` can be one folder's name as it stands: letters, digits and ``._=+-``,
    not starting with a dot or a dash, at most 128 characters (no ``/``, no ``..``)."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name))


def safe_name_part(value: object) -> str:
    """``value`` written for a folder name: each character outside ``[A-Za-z0-9._=+-]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", str(value))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checkpoint_epoch(name: str) -> int | None:
    """The epoch a checkpoint file name gives (:func:`checkpoint_name`'s inverse), else None."""
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint after ``epoch`` updates (zero-padded, sorts by epoch)."""
    return f"epoch_{epoch:09d}.safetensors"


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes: what the manifest records for a checkpoint."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the permissions of a normal new file.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


#: The files of a run folder, in the order :func:`clear_run_folder` removes them: the config
#: last, since its presence is what marks the folder as a run (it is also written last).
RUN_FILES = (RESUME_META_FILE, RESUME_FILE, METRICS_FILE, MANIFEST_FILE, SPLIT_FILE, SOURCE_FILE)


def own_temp(name: str, owners: Iterable[str]) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_write_bytes` made for one of ``owners``."""
    # atomic_write_bytes's temporary names: ".<final name>.<random>.tmp".
    return name.endswith(".tmp") and any(name.startswith(f".{o}.") for o in owners)


def clear_run_folder(path: Path, check_only: bool = False) -> None:
    """Delete a run folder's own files so a new run can start there (``--force``).

    Only a run folder is cleared, and only of the files the run-folder contract names (its
    config, split, metrics, manifest, resume files, ``checkpoints/epoch_*.safetensors`` and
    the temporary files of interrupted writes); anything else in it is left where it is. A
    path that does not exist or an empty folder is fine; a file, or a folder without a
    circuits ``config.json``, raises :class:`RunFolderError` and nothing is deleted.
    ``check_only``: raise as it would, delete nothing (to check many folders before any).
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a run folder; choose another --out")
    if not any(path.iterdir()):
        return
    config = path / CONFIG_FILE
    if not config.is_file():
        raise RunFolderError(
            f"{path} is not a run folder ({CONFIG_FILE} is missing), so --force will not "
            "delete anything in it; choose a new or empty --out"
        )
    RunStore(path).read_config()  # a foreign or damaged config.json is named, not deleted
    if check_only:
        return
    RunStore(path).remove_orphan_temps()
    ckpt = path / CHECKPOINT_DIR
    if ckpt.is_dir():
        for f in ckpt.iterdir():
            if f.is_file() and _CKPT_RE.match(f.name):
                f.unlink()
        if not any(ckpt.iterdir()):
            ckpt.rmdir()
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    config.unlink()
    _fsync_dir(path)


@contextmanager
def removed_if_not_started(roots: Iterable[Path]) -> Iterator[None]:
    """On failure, remove what a start left in folders that held no run before it (issue 19,
    item 9: a start that runs out of memory or disk used to leave an empty or half-made
    folder).

    A folder counts as started once its ``config.json`` exists (written last by a start); one
    that is still not started after the failure loses the files a start writes (the split,
    the lock file, their temporary files) and, when this call created it and it is then empty,
    the folder itself. A folder another process now holds (its lock file exists) is left alone.
    """
    fresh = {Path(r): Path(r).exists() for r in roots if not (Path(r) / CONFIG_FILE).exists()}
    try:
        yield
    except BaseException:
        for root, existed in fresh.items():
            if not root.is_dir() or (root / CONFIG_FILE).exists() or (root / LOCK_FILE).exists():
                continue
            for f in root.iterdir():
                if f.is_file() and (f.name in RUN_FILES or own_temp(f.name, (*RUN_FILES, CONFIG_FILE))):
                    f.unlink(missing_ok=True)
            if not existed and not any(root.iterdir()):
                root.rmdir()
        raise


def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk, or a power cut can undo it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def require_run_dir(path: Path) -> None:
    """Raise RunFolderError unless ``path`` is a folder with a run config (no torch needed).

    ``config.json`` is written last when a run is created, so its presence marks a run folder.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise RunFolderError(f"{path} is not a run folder: {CONFIG_FILE} is missing" + _runs_hint(path))


#: Sub-folder of a sweep's or a protocol's folder that holds its run folders, one per member.
RUNS_DIR = "runs"


def member_run_folders(path: Path) -> list[Path]:
    """The run folders a sweep's or a protocol's folder keeps under ``runs/``, sorted by name
    (none when it has no ``runs/``)."""
    runs = Path(path) / RUNS_DIR
    return sorted(p for p in runs.iterdir() if (p / CONFIG_FILE).is_file()) if runs.is_dir() else []


def _runs_hint(path: Path) -> str:
    # A sweep's or a protocol's folder keeps its runs under runs/: say so, and name one.
    members = member_run_folders(path)
    if not members:
        return ""
    return (f"; it holds {len(members)} run folder(s) under runs/ (a sweep or protocol folder): give one, "
            f"such as {members[0]}")


def _torch():  # noqa: ANN202 - torch loads on first use (see the module docstring)
    import torch

    return torch


def st_save(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors' ``save``, imported on first use, with the metadata keys in sorted order.

    safetensors keeps the metadata in a hash map whose order changes from process to process, so
    the same resume point written by two processes (a sweep's local and Ray workers) differed
    in its header bytes alone; sorted, equal contents are equal files."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    if not metadata or len(metadata) < 2:
        return data
    n = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + n].decode("utf-8")
    header = json.loads(text)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    # Reordering an object's members keeps the JSON's length; the padding after it stays.
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    stripped = text.rstrip(" ")
    if len(body.encode("utf-8")) != len(stripped.encode("utf-8")):
        return data  # a header spelt another way than expected: keep safetensors' own bytes
    return data[:8] + body.encode("utf-8") + data[8 + len(stripped.encode("utf-8")) :]


def st_load(data: bytes) -> dict[str, Tensor]:
    """safetensors' ``load``; a file that does not parse raises :class:`BadSafetensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except SafetensorError as e:
        raise BadSafetensors(str(e)) from None


class BadSafetensors(ValueError):
    """Bytes that are not a safetensors file (safetensors' own error, as a ValueError)."""


def _versions() -> dict[str, str]:
    from circuits import __version__

    return {
        "circuits": __version__,
        "torch": _torch().__version__,
        "python": platform.python_version(),
    }


@dataclass
class RunStore:
    """Reads and writes one run folder. Only this module knows the file names."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # ---- paths -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        """Folder of the checkpoint files."""
        return self.root / CHECKPOINT_DIR

    def checkpoint_path(self, epoch: int) -> Path:
        """Path of the checkpoint after ``epoch`` updates."""
        return self.checkpoint_dir / checkpoint_name(epoch)

    def exists(self) -> bool:
        """Whether this folder holds a run (its config file)."""
        return (self.root / CONFIG_FILE).is_file()

    def remove_orphan_temps(self) -> list[Path]:
        """Delete the temporary files that kills left behind (``.<name>.<random>.tmp`` of this
        folder's own files, never anything else); the caller holds the run's lock, so no write
        of another process is in flight. Returns what was removed."""
        gone = []
        if self.root.is_dir():
            gone += [f for f in self.root.iterdir() if own_temp(f.name, (*RUN_FILES, CONFIG_FILE))]
        if self.checkpoint_dir.is_dir():
            gone += [f for f in self.checkpoint_dir.iterdir() if _CKPT_TMP_RE.match(f.name)]
        for f in gone:
            if f.is_file():
                f.unlink(missing_ok=True)
        return gone

    # ---- config and split --------------------------------------------------------------
    def write_config(self, config: RunConfig) -> None:
        """Write ``config.json``: the resolved config plus the versions that made the run."""
        doc = {"format": FORMAT_VERSION, "config": config.to_dict(), "versions": _versions()}
        atomic_write_bytes(self.root / CONFIG_FILE, json.dumps(doc, indent=2).encode() + b"\n")

    def read_config(self) -> RunConfig:
        """The run's config; RunFolderError when the folder holds no readable run."""
        path = self.root / CONFIG_FILE
        if not path.is_file():
            raise RunFolderError(f"{self.root} is not a run folder: {CONFIG_FILE} is missing" + _runs_hint(self.root))
        try:
            doc = json.loads(path.read_text())
            return RunConfig.from_dict(doc["config"])
        except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
            raise RunFolderError(f"{path} is damaged or not a circuits config: {e}") from None

    def read_versions(self) -> dict[str, str]:
        """The library versions recorded when the run was created."""
        return json.loads((self.root / CONFIG_FILE).read_text()).get("versions", {})

    def write_split(self, train_idx: Tensor, test_idx: Tensor, noisy_idx: Tensor | None = None) -> None:
        """Save the exact train/test canonical indices, and the training pairs whose label was
        corrupted (``label_noise``) as ``noisy`` when there are any."""
        i64 = _torch().int64
        tensors = {"train": train_idx.to(i64), "test": test_idx.to(i64)}
        if noisy_idx is not None and len(noisy_idx):
            tensors["noisy"] = noisy_idx.to(i64)
        atomic_write_bytes(self.root / SPLIT_FILE, st_save(tensors))

    @property
    def split_path(self) -> Path:
        """The run's split file."""
        return self.root / SPLIT_FILE

    def _split_tensors(self) -> dict[str, Tensor]:
        path = self.split_path
        tensors = read_safetensors(path, kind="split file")
        if set(tensors) not in ({"train", "test"}, {"train", "test", "noisy"}):
            raise RunFolderError(f"{path} is damaged: expected tensors 'train' and 'test' (and 'noisy')")
        return tensors

    def read_split(self) -> tuple[Tensor, Tensor]:
        """The saved ``(train_idx, test_idx)``."""
        tensors = self._split_tensors()
        return tensors["train"], tensors["test"]

    def read_noisy(self) -> Tensor | None:
        """The saved corrupted-label training pairs, or None (a run without label noise)."""
        return self._split_tensors().get("noisy")

    # ---- checkpoints -------------------------------------------------------------------
    def read_manifest(self) -> dict[str, dict[str, Any]]:
        """Checkpoint file name -> {"sha256", "bytes", "epoch"}; ``{}`` when there is none.

        Checked whole before it is used (issue 19, item 5): UTF-8 JSON, a ``checkpoints``
        object whose every key is a checkpoint file name and whose every entry holds that
        file's epoch (int), sha256 (64 hex digits) and size (int). RunFolderError names what
        does not fit and the fix (``circuits reindex``).
        """
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return {}

        def damaged(problem: str) -> RunFolderError:
            return RunFolderError(
                f"{path} is damaged: {problem}; run `circuits reindex {self.root}` to rebuild it "
                "from the checkpoint files"
            )

        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged(f"not JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints"), dict):
            raise damaged('not a JSON object with a "checkpoints" object')
        checkpoints = doc["checkpoints"]
        for name, entry in checkpoints.items():
            if not isinstance(entry, dict):
                raise damaged(f"the entry of {name!r} is not an object")
            epoch, digest, size = entry.get("epoch"), entry.get("sha256"), entry.get("bytes")
            if not _is_int(epoch) or epoch < 0:
                raise damaged(f"the entry of {name!r} has epoch {epoch!r}, not a whole number >= 0")
            if name != checkpoint_name(epoch):
                raise damaged(f"the entry {name!r} is not the file name of its epoch {epoch}")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise damaged(f"the entry of {name!r} has sha256 {str(digest)[:20]!r}, not 64 hex digits")
            if not _is_int(size) or size <= 0:
                raise damaged(f"the entry of {name!r} has bytes {size!r}, not a size")
        return checkpoints

    def unindexed(self) -> list[Path]:
        """Checkpoint files the manifest does not list (manifest deleted, damaged or lost in a
        kill between a checkpoint's rename and the manifest's): reported, never ignored."""
        if not self.checkpoint_dir.is_dir():
            return []
        try:
            listed = set(self.read_manifest())
        except RunFolderError:
            listed = set()
        return sorted(
            f for f in self.checkpoint_dir.iterdir()
            if _CKPT_RE.match(f.name) and f.name not in listed and f.is_file()
        )

    def reindex(
        self, check: Callable[[dict[str, Tensor]], str | None] | None = None
    ) -> tuple[list[int], list[str]]:
        """Rebuild the manifest from the checkpoint files (``circuits reindex``).

        Entries of a readable manifest are kept as they are (a file that no longer matches its
        entry stays damaged: reindexing never launders a changed file). Every checkpoint file
        without an entry (every file, when the manifest is missing or damaged) is added when
        it reads as safetensors whose recorded epoch is the one its name gives and ``check``
        (the run's tensor names and shapes) finds no problem in it. Returns the
        epochs added and one message per file left out. The caller holds the run's lock.
        """
        try:
            manifest, damaged = self.read_manifest(), False
        except RunFolderError:
            manifest, damaged = {}, True  # replaced by what the files themselves show
        added: list[int] = []
        skipped: list[str] = []
        for f in self.unindexed():
            epoch = checkpoint_epoch(f.name)
            data = f.read_bytes()
            try:
                tensors = st_load(data)
                recorded = _safetensors_metadata(data).get("epoch")
            except (ValueError, RuntimeError, IndexError) as e:
                skipped.append(f"{f.name}: unreadable safetensors data ({e})")
                continue
            if recorded != str(epoch):
                skipped.append(f"{f.name}: it records epoch {recorded!r}, its name {epoch}")
                continue
            problem = check(tensors) if check is not None else None
            if problem is not None:
                skipped.append(f"{f.name}: does not fit the run's config: {problem}")
                continue
            manifest[f.name] = {"epoch": epoch, "sha256": hashlib.sha256(data).hexdigest(),
                                "bytes": len(data)}
            added.append(epoch)
        if added or damaged:
            self._write_manifest(manifest)
        return added, skipped

    def write_checkpoint(self, epoch: int, state_dict: Mapping[str, Tensor]) -> Path:
        """Save float32 weights after ``epoch`` updates and record their checksum."""
        tensors = {k: v.detach().to("cpu", _torch().float32).contiguous() for k, v in state_dict.items()}
        data = st_save(tensors, metadata={"epoch": str(epoch)})
        path = self.checkpoint_path(epoch)
        atomic_write_bytes(path, data)
        manifest = self.read_manifest()
        manifest[path.name] = {
            "epoch": epoch,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        self._write_manifest(manifest)
        return path

    def _write_manifest(self, manifest: dict[str, dict[str, Any]]) -> None:
        ordered = dict(sorted(manifest.items()))
        doc = {"format": FORMAT_VERSION, "checkpoints": ordered}
        atomic_write_bytes(self.root / MANIFEST_FILE, json.dumps(doc, indent=1).encode())

    def checkpoint_digests(self) -> dict[int, str]:
        """Epoch -> sha256 of each checkpoint the manifest records (what an analysis is keyed by)."""
        return {int(entry["epoch"]): str(entry["sha256"]) for entry in self.read_manifest().values()}

    def checkpoint_epochs(self) -> list[int]:
        """Epochs of the checkpoints the manifest records, ascending."""
        return sorted(entry["epoch"] for entry in self.read_manifest().values())

    def read_checkpoint(self, epoch: int, verify: bool = True) -> dict[str, Tensor]:
        """Load the weights after ``epoch`` updates; CheckpointError names a damaged file."""
        path = self.checkpoint_path(epoch)
        manifest = self.read_manifest()
        entry = manifest.get(path.name)
        if entry is None:
            if path.is_file():
                raise CheckpointError(path, "not recorded in the manifest (write interrupted?)")
            raise RunFolderError(f"no checkpoint at epoch {epoch} in {self.root}")
        if not path.is_file():
            raise CheckpointError(path, "file is missing")
        size = path.stat().st_size  # before reading: a huge foreign file is never read whole
        if size != entry["bytes"]:
            raise CheckpointError(path, f"truncated or extended: {size} bytes, expected {entry['bytes']}")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:  # changed between the stat and the read
            raise CheckpointError(
                path, f"truncated or extended: {len(data)} bytes, expected {entry['bytes']}"
            )
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(path, "checksum mismatch (file corrupted)")
        try:
            # safetensors returns its tensors in no fixed order; sorted names make every sum
            # over a checkpoint's tensors (the total weight norm) the same bits on every load.
            return dict(sorted(st_load(data).items()))
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(path, f"unreadable safetensors data ({e})") from None

    def verify(self) -> list[CheckpointError]:
        """Check every checkpoint against the manifest; returns the problems found."""
        problems = []
        for epoch in self.checkpoint_epochs():
            try:
                self.read_checkpoint(epoch)
            except CheckpointError as e:
                problems.append(e)
        return problems

    # ---- metrics -----------------------------------------------------------------------
    def append_metrics(self, rows: Iterable[Mapping[str, float | int]]) -> None:
        """Append rows (epoch, train/test loss and accuracy) and fsync them."""
        rows = list(rows)
        if not rows:
            return
        path = self.root / METRICS_FILE
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row[k]) for k in METRIC_COLUMNS})
            f.flush()
            os.fsync(f.fileno())

    def read_metrics_rows(self, strict: bool = False) -> list[dict[str, float | int]]:
        """The metrics table as a list of dicts.

        A partial last line (a kill while rows were appended: its epochs come after the resume
        point and are trained again) is dropped. Other rows that do not parse are dropped too,
        unless ``strict``: then RunFolderError names the first one (a resume must not go on
        from a table with a hole, or the hole would be kept for good) and epochs out of order.
        """
        path = self.root / METRICS_FILE
        if not path.is_file():
            return []
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise self._metrics_damaged(f"is not UTF-8 text ({e})") from None
            text = data.decode("utf-8", errors="replace")
        # The last element is "" after a final newline, or a line a kill cut short: dropped.
        lines = [line.rstrip("\r") for line in text.split("\n")]
        body = lines[:-1]
        if not body:
            return []  # not one whole line yet
        if lines[0].split(",") != list(METRIC_COLUMNS):
            if strict:
                raise self._metrics_damaged(f"has no header {','.join(METRIC_COLUMNS)}")
            return []
        rows: list[dict[str, float | int]] = []
        for i, line in enumerate(body[1:], start=2):
            if line == "":
                continue
            fields = line.split(",")
            try:
                if len(fields) != len(METRIC_COLUMNS):
                    raise ValueError(f"{len(fields)} fields")
                row: dict[str, float | int] = {k: float(v) for k, v in zip(METRIC_COLUMNS, fields)}
                if not float(row["epoch"]).is_integer():
                    raise ValueError(f"epoch {fields[0]!r}")
                row["epoch"] = int(row["epoch"])
            except ValueError as e:
                if strict:
                    raise self._metrics_damaged(f"line {i} does not parse ({e})") from None
                continue
            if strict and rows and row["epoch"] <= rows[-1]["epoch"]:
                raise self._metrics_damaged(f"line {i}: epoch {row['epoch']} is not after {rows[-1]['epoch']}")
            rows.append(row)
        return rows

    def _metrics_damaged(self, problem: str) -> RunFolderError:
        return RunFolderError(
            f"{self.root / METRICS_FILE} is damaged: it {problem}; restore it, or retrain with --force"
        )

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop rows after ``last_epoch`` (they belong to work lost in a kill, to be redone)."""
        rows = [r for r in self.read_metrics_rows() if r["epoch"] <= last_epoch]
        buf = io.StringIO()
        # Every run's table has been written this way since 0.1.0: the header (written here when
        # a run starts) ends in "\n", each row (append_metrics: csv's default) in "\r\n". Rows
        # kept on resume are written as append_metrics wrote them, so a resumed run's table is
        # byte for byte an uninterrupted run's (they used to be rewritten with "\n").
        csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n").writeheader()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS)
        for row in rows:
            writer.writerow({k: _fmt(row[k]) for k in METRIC_COLUMNS})
        atomic_write_bytes(self.root / METRICS_FILE, buf.getvalue().encode())

    # ---- resume state ------------------------------------------------------------------
    def write_resume(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Replace the resume point with one atomic file; ``resume.json`` mirrors its metadata.

        The safetensors header carries the metadata, so the resume point is a single file that
        a kill leaves old or new, never a mix; the JSON copy is for people and tools.
        """
        str_meta = {k: json.dumps(v) for k, v in meta.items()}
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str_meta)
        atomic_write_bytes(self.root / RESUME_FILE, data)
        atomic_write_bytes(self.root / RESUME_META_FILE, json.dumps(dict(meta), indent=1).encode())

    def mark_diverged(self, epoch: int, lr: float) -> None:
        """Record in ``resume.json`` that training stopped at ``epoch`` on a non-finite loss at
        learning rate ``lr``; the resume point itself (the last finite state) is unchanged."""
        path = self.root / RESUME_META_FILE
        meta = json.loads(path.read_bytes()) if path.is_file() else {}
        meta["diverged"] = {"epoch": int(epoch), "lr": float(lr)}
        atomic_write_bytes(path, json.dumps(meta, indent=1).encode())

    def diverged(self) -> dict[str, Any] | None:
        """The divergence mark (``{"epoch", "lr"}``) of a run that stopped on a non-finite loss,
        or None. A ``resume.json`` that does not parse is no mark: the resume point is checked
        from ``resume.safetensors``, which carries the same metadata."""
        path = self.root / RESUME_META_FILE
        try:
            mark = json.loads(path.read_bytes()).get("diverged") if path.is_file() else None
        except (ValueError, AttributeError):
            return None
        if not isinstance(mark, dict) or not isinstance(mark.get("epoch"), int) \
                or not isinstance(mark.get("lr"), (int, float)):
            return None
        return mark

    def read_resume(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The resume point ``(tensors, meta)``, or None when the run has none yet."""
        path = self.root / RESUME_FILE
        if not path.is_file():
            return None
        data = path.read_bytes()
        try:
            tensors = st_load(data)
            meta = {k: json.loads(v) for k, v in _safetensors_metadata(data).items()}
        except (ValueError, RuntimeError) as e:
            raise RunFolderError(
                f"resume file {path} is damaged ({e}); delete it to restart from scratch, "
                "or use --force"
            ) from None
        return tensors, meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The header is an 8-byte little-endian length followed by JSON; metadata lives under
    # "__metadata__". Reading it here avoids a second parse of the tensors.
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {})


def _fmt(value: float | int) -> str:
    # repr round-trips floats exactly, so metrics read back equal what was computed.
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def read_safetensors(path: Path, kind: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise RunFolderError(f"{kind} {path} is missing")
    try:
        return st_load(path.read_bytes())
    except (ValueError, RuntimeError) as e:
        raise RunFolderError(f"{kind} {path} is damaged ({e})") from None
