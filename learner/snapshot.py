"""Atomic, versioned model snapshots: ``data_dir/snapshots/v00000042/`` and a ``latest`` pointer.

Why this layout: the scorer (another process, maybe another machine on shared storage) must
never load a half-written model, and the learner must be able to resume from exactly what it
published. So a snapshot is written into a hidden temp directory, every file and the
directory are fsynced, and only then is it renamed to its final ``vNNNNNNNN`` name — rename
is atomic, so a ``v*`` directory is always complete. The ``latest`` pointer is then swapped
atomically twice over: a symlink replaced with ``rename`` (what humans and tools follow) and a
``LATEST`` text file replaced the same way (for filesystems or copies without symlinks).
Readers take the pointer, fall back to the other, then to the highest complete version.

Contents: ``model.safetensors`` (weights), ``optimizer.safetensors`` (moments, so a resumed
learner continues the same trajectory), ``state.safetensors`` (id counts, metric histograms,
the teacher vectors behind the cold-start index), ``vocab.json`` and ``manifest.json``
(version, created_at, examples_seen, the next offset to read per examples partition, metrics,
config_hash, model config, end markers seen, and ``files``: the sha256 of every other file).

Why checksums: rename makes a snapshot complete when written, but not intact afterwards (a
disk error, a truncated copy to shared storage, a hand-edited file). A reader verifies every
file against the manifest and refuses a snapshot that fails with one :class:`SnapshotError`
naming the path and the reason, never a library's own exception from deep inside a parser.
Snapshots written before checksums existed (no ``files``) are still loaded, unverified.

Rollback (:func:`rollback`, ``livectr snapshots rollback V``) only moves the pointer back to a
verified older version: scorers follow it like any new version, a learner started afterwards
resumes from V's weights, optimiser and Kafka offsets (so it re-reads what came after V), and
its next snapshot is numbered above the highest existing one — newer versions are never reused.
While a learner runs, the pointer is its own: the CLI hands it a rollback request
(:func:`request_rollback`, a file next to the lock) and the learner, between two polls, moves the
pointer, reloads V and continues from V's offsets (:mod:`livectr.learner.loop`), then answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load as load_torch
from safetensors.torch import save_file as save_torch

from livectr.core import faults

log = logging.getLogger(__name__)


@dataclass
class LearnerState:
    """Everything needed to resume a learner or serve its model (what a snapshot stores)."""

    model_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


class SnapshotError(Exception):
    """A snapshot that cannot be used: a file is missing, corrupt or fails its checksum."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"snapshot {path} refused: {reason}")
        self.path = path
        self.reason = reason


VERSION_RE = re.compile(r"^v(\d{8})$")
LATEST_LINK = "latest"
LATEST_FILE = "LATEST"
MANIFEST = "manifest.json"
#: The files a snapshot holds besides its manifest (each checksummed in ``manifest["files"]``).
DATA_FILES = ("model.safetensors", "optimizer.safetensors", "state.safetensors", "vocab.json")
LOCK_FILE = ".learner.lock"
#: A rollback asked of the running learner, and its answer (JSON, each written by rename).
ROLLBACK_REQUEST = "rollback-request.json"
ROLLBACK_ANSWER = "rollback-answer.json"
#: Second line of the lock file of a learner that takes rollback requests.
ACCEPTS_ROLLBACKS = "accepts-rollback-requests"


def snapshots_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / "snapshots"


def version_name(version: int) -> str:
    return f"v{version:08d}"


def list_versions(data_dir: Path | str) -> list[int]:
    """Complete snapshot versions (directories named ``vNNNNNNNN`` holding a manifest), ascending."""
    root = snapshots_dir(data_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        m = VERSION_RE.match(entry.name)
        if m and (entry / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _atomic_pointer(root: Path, name: str) -> None:
    """Point ``latest`` (symlink) and ``LATEST`` (file) at ``name``, each swapped by rename."""
    tmp_link = root / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(name, tmp_link)
        os.replace(tmp_link, root / LATEST_LINK)
    except OSError as exc:  # e.g. a filesystem without symlinks: the file pointer still works
        log.debug("latest symlink not updated: %s", exc)
    tmp_file = root / f".{LATEST_FILE}.{os.getpid()}.tmp"
    with open(tmp_file, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_file, root / LATEST_FILE)
    _fsync_path(root)


def publish_snapshot(
    data_dir: Path | str, state: LearnerState, manifest: dict[str, Any], keep: int = 5
) -> tuple[int, Path]:
    """Write ``state`` as the next version, swap ``latest`` to it, prune old versions.

    ``manifest`` holds the caller's fields (offsets, metrics, config_hash, …); ``version``,
    ``created_at`` and ``model_config`` are filled in here.
    """
    root = snapshots_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    versions = list_versions(data_dir)
    version = (versions[-1] + 1) if versions else 1
    name = version_name(version)
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_torch(state.tensors, str(tmp / "model.safetensors"))
        save_torch(state.optimizer, str(tmp / "optimizer.safetensors"))
        save_numpy({k: np.ascontiguousarray(v) for k, v in state.arrays.items()}, str(tmp / "state.safetensors"))
        _write_json(tmp / "vocab.json", state.meta)
        full = {
            **manifest,
            "version": version,
            "created_at": time.time(),
            "model_config": state.model_config,
            "files": {f: _sha256(tmp / f) for f in DATA_FILES},
        }
        _write_json(tmp / MANIFEST, full)
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        faults.hold(faults.SNAPSHOT)
        os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(root)
    _atomic_pointer(root, name)
    prune(data_dir, keep)
    return version, root / name


def prune(data_dir: Path | str, keep: int) -> None:
    """Delete all but the newest ``keep`` versions (never the one ``latest`` points to)."""
    root = snapshots_dir(data_dir)
    current = latest_version(data_dir)
    for v in list_versions(data_dir)[: -max(1, keep)]:
        if v != current:
            shutil.rmtree(root / version_name(v), ignore_errors=True)


def clean_temp(data_dir: Path | str) -> int:
    """Remove temp directories left by a crashed writer (they are never read); returns how many."""
    root = snapshots_dir(data_dir)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def latest_version(data_dir: Path | str) -> int | None:
    """The version ``latest`` points to (symlink, else ``LATEST`` file, else the highest complete)."""
    root = snapshots_dir(data_dir)
    candidates: list[str] = []
    try:
        candidates.append(os.readlink(root / LATEST_LINK))
    except OSError:
        pass
    try:
        candidates.append((root / LATEST_FILE).read_text().strip())
    except OSError:
        pass
    for name in candidates:
        m = VERSION_RE.match(Path(name).name)
        if m and (root / name / MANIFEST).is_file():
            return int(m.group(1))
    versions = list_versions(data_dir)
    return versions[-1] if versions else None


def _verified(path: Path, name: str, data: bytes | None, sums: dict[str, str] | None) -> bytes:
    """``data`` (the contents of ``name``) checked against the manifest's sha256, if it has one."""
    if data is None:
        raise SnapshotError(path, f"{name} is missing (partial snapshot)")
    if sums is not None:
        want = sums.get(name)
        if want is None:
            raise SnapshotError(path, f"the manifest has no checksum for {name}")
        have = hashlib.sha256(data).hexdigest()
        if have != want:
            raise SnapshotError(path, f"{name} is corrupt (sha256 {have[:12]}…, manifest says {want[:12]}…)")
    return data


def _parse(path: Path, name: str, parse: Callable[[bytes], Any], data: bytes) -> Any:
    """``parse(data)``, its failure (safetensors' or json's own error) as a :class:`SnapshotError`."""
    try:
        return parse(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:  # json errors are ValueErrors
        raise SnapshotError(path, f"{name} is unreadable ({type(exc).__name__}: {exc})") from exc


def load_version(
    data_dir: Path | str, version: int, with_optimizer: bool = True
) -> tuple[dict[str, Any], LearnerState]:
    """Read and verify one snapshot (without the optimiser moments when serving).

    Raises ``FileNotFoundError`` if the version directory is gone (pruned), :class:`SnapshotError`
    if it is there but missing a file, corrupt or failing a checksum.
    """
    path = snapshots_dir(data_dir) / version_name(version)
    if not path.is_dir():
        raise FileNotFoundError(f"snapshot {path} does not exist")
    names = [MANIFEST, *(n for n in DATA_FILES if with_optimizer or n != "optimizer.safetensors")]
    files: dict[str, bytes] = {}
    for name in names:
        try:
            files[name] = (path / name).read_bytes()
        except FileNotFoundError:
            continue  # reported by state_from_files as a partial snapshot
        except OSError as exc:
            raise SnapshotError(path, f"{name} is unreadable: {exc}") from exc
    return state_from_files(path, files, with_optimizer)


def state_from_files(
    path: Path, files: dict[str, bytes], with_optimizer: bool = True
) -> tuple[dict[str, Any], LearnerState]:
    """Verify a snapshot's file contents against its manifest and parse them.

    ``files`` maps file names to bytes, read from a snapshot directory or received over Kafka
    (:mod:`livectr.learner.updates`); ``path`` names the snapshot in errors. Raises
    :class:`SnapshotError` for a missing, corrupt or unparsable file.
    """
    if MANIFEST not in files:
        raise SnapshotError(path, f"{MANIFEST} is missing (partial snapshot)")
    manifest = _parse(path, MANIFEST, json.loads, files[MANIFEST])
    if not isinstance(manifest, dict) or "model_config" not in manifest:
        raise SnapshotError(path, f"{MANIFEST} is not a snapshot manifest")
    sums = manifest.get("files")  # None: written before checksums existed, loaded unverified
    if sums is not None and not isinstance(sums, dict):
        raise SnapshotError(path, f"{MANIFEST} has a malformed 'files' entry")
    names = [n for n in DATA_FILES if with_optimizer or n != "optimizer.safetensors"]
    raw = {n: _verified(path, n, files.get(n), sums) for n in names}
    state = LearnerState(
        model_config=manifest["model_config"],
        tensors=_parse(path, "model.safetensors", load_torch, raw["model.safetensors"]),
        optimizer=_parse(path, "optimizer.safetensors", load_torch, raw["optimizer.safetensors"])
        if with_optimizer
        else {},
        arrays=_parse(path, "state.safetensors", load_numpy, raw["state.safetensors"]),
        meta=_parse(path, "vocab.json", json.loads, raw["vocab.json"]),
    )
    return manifest, state


def read_serving_files(data_dir: Path | str, version: int) -> dict[str, bytes]:
    """The bytes of what a scorer needs from one snapshot: the manifest and every file but the
    optimiser's (what the learner publishes over Kafka). Raises ``FileNotFoundError``."""
    path = snapshots_dir(data_dir) / version_name(version)
    return {n: (path / n).read_bytes() for n in (MANIFEST, *DATA_FILES) if n != "optimizer.safetensors"}


def load_latest(data_dir: Path | str, with_optimizer: bool = True) -> tuple[dict[str, Any], LearnerState] | None:
    """The latest complete snapshot as ``(manifest, learner state)``, or None when there is none.

    If the pointed-to version vanished between reading the pointer and the files (pruned by a
    concurrent writer), the pointer is read again. A latest snapshot that is there but corrupt
    raises :class:`SnapshotError` (see :func:`load_newest_good` for falling back).
    """
    for _ in range(3):
        version = latest_version(data_dir)
        if version is None:
            return None
        try:
            return load_version(data_dir, version, with_optimizer)
        except (OSError, SnapshotError) as exc:
            if isinstance(exc, SnapshotError) and exc.path.is_dir():
                raise  # really corrupt, not pruned under our feet
            log.warning("snapshot %s vanished while read (%s); retrying", version_name(version), exc)
            time.sleep(0.05)
    return None


def load_newest_good(
    data_dir: Path | str, with_optimizer: bool = True
) -> tuple[tuple[dict[str, Any], LearnerState] | None, list[SnapshotError]]:
    """The latest snapshot, else the newest version that verifies; and the ones refused on the way.

    Returns ``(None, refused)`` when no version is usable (the caller starts fresh).
    """
    refused: list[SnapshotError] = []
    try:
        loaded = load_latest(data_dir, with_optimizer)
        if loaded is not None:
            return loaded, refused
    except SnapshotError as exc:
        refused.append(exc)
    bad = {e.path.name for e in refused}
    for version in reversed(list_versions(data_dir)):
        if version_name(version) in bad:
            continue
        try:
            return load_version(data_dir, version, with_optimizer), refused
        except SnapshotError as exc:
            refused.append(exc)
        except OSError:
            continue  # pruned meanwhile
    return None, refused


class LearnerLockError(RuntimeError):
    """Another live learner already writes snapshots under this data directory."""


class LearnerLock:
    """Exclusive ``flock`` on ``data_dir/snapshots/.learner.lock`` for a learner's whole life.

    Why: two learners on one data dir pick the same next version and overwrite each other's
    snapshots and offsets. ``flock`` is released by the kernel when the process dies, so a
    crashed learner never leaves a stale lock; the file holds the holder's pid for the message.
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.path = snapshots_dir(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> LearnerLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LearnerLockError(
                f"another learner (pid {holder}) is already writing snapshots to data dir {self.data_dir}; "
                "stop it or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def accept_rollbacks(self) -> None:
        """Say in the lock file that this learner takes rollback requests (:func:`request_rollback`)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n{ACCEPTS_ROLLBACKS}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LearnerLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RollbackRefused(RuntimeError):
    """A rollback that was not done: the version is missing or corrupt, or a learner is running."""


class LearnerRunning(RollbackRefused):
    """Refused because a learner holds the lock; ``takes_requests``: it would do the rollback itself."""

    def __init__(self, message: str, takes_requests: bool) -> None:
        super().__init__(message)
        self.takes_requests = takes_requests


def learner_running(data_dir: Path | str) -> bool:
    """Whether a live learner holds the data dir's lock (tried, and released at once if taken)."""
    lock = LearnerLock(data_dir)
    try:
        lock.acquire()
    except LearnerLockError:
        return True
    lock.release()
    return False


def point_latest(data_dir: Path | str, version: int) -> None:
    """Swap ``latest`` to ``version`` (no checks: :func:`rollback` and the learner's rollback verify first)."""
    _atomic_pointer(snapshots_dir(data_dir), version_name(version))


def _write_atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def request_rollback(data_dir: Path | str, version: int, wait_s: float = 30.0) -> dict[str, Any]:
    """Ask the running learner to roll back to ``version``; its answer once done.

    The answer holds ``version``, ``previous`` (what ``latest`` pointed to) and
    ``published_on_kafka`` (whether the learner republished ``version`` on the model-updates
    topic with the rollback marker). Raises :class:`RollbackRefused` with the learner's reason,
    or when it has not taken the request within ``wait_s`` (the request is then withdrawn).
    """
    root = snapshots_dir(data_dir)
    nonce = f"{os.getpid()}-{time.monotonic_ns()}"
    request, answer = root / ROLLBACK_REQUEST, root / ROLLBACK_ANSWER
    _write_atomic_json(request, {"version": int(version), "nonce": nonce, "requested_at": time.time()})
    deadline = time.monotonic() + wait_s
    while True:
        got = _read_json(answer)
        if got is not None and got.get("nonce") == nonce:
            if got.get("error"):
                raise RollbackRefused(f"the running learner refused: {got['error']}")
            return got
        if time.monotonic() > deadline:
            pending = _read_json(request)
            if pending is not None and pending.get("nonce") == nonce:
                with contextlib.suppress(OSError):
                    request.unlink()
                raise RollbackRefused(
                    f"the running learner did not take the rollback request within {wait_s:g} s; latest left unchanged"
                )
            deadline = time.monotonic() + wait_s  # taken: it is rolling back, give it time to answer
        time.sleep(0.05)


def take_rollback_request(data_dir: Path | str) -> dict[str, Any] | None:
    """The pending rollback request, removed so it is done once (the learner's side); None if none."""
    path = snapshots_dir(data_dir) / ROLLBACK_REQUEST
    if not path.exists():
        return None
    request = _read_json(path)
    with contextlib.suppress(OSError):
        path.unlink()
    return request


def answer_rollback(data_dir: Path | str, request: dict[str, Any], answer: dict[str, Any]) -> None:
    """Answer a request taken with :func:`take_rollback_request` (``error`` set: refused)."""
    _write_atomic_json(
        snapshots_dir(data_dir) / ROLLBACK_ANSWER, {**answer, "nonce": request.get("nonce"), "answered_at": time.time()}
    )


def verify_version(data_dir: Path | str, version: int) -> dict[str, str]:
    """Check every file of one snapshot against its manifest: ``{file: status}``, nothing raised.

    Status is ``ok``, ``missing``, ``corrupt``, ``no checksum`` (the manifest lists none for it)
    or ``unverified`` (a snapshot written before checksums existed).
    """
    path = snapshots_dir(data_dir) / version_name(version)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return {MANIFEST: f"unreadable ({exc})"}
    sums = manifest.get("files") if isinstance(manifest, dict) else None
    out: dict[str, str] = {}
    for name in DATA_FILES:
        file = path / name
        if not file.is_file():
            out[name] = "missing"
        elif not isinstance(sums, dict):
            out[name] = "unverified"
        elif name not in sums:
            out[name] = "no checksum"
        else:
            out[name] = "ok" if _sha256(file) == sums[name] else "corrupt"
    return out


def rollback(data_dir: Path | str, version: int, force: bool = False) -> int | None:
    """Make ``version`` the served model: verify it, then swap ``latest`` to it atomically.

    Returns the version ``latest`` pointed to before. Refuses (:class:`RollbackRefused`) a
    version that is missing or fails to load or verify, and — unless ``force`` — while a learner
    holds the data dir's lock: it would publish its next version over the rollback within one
    snapshot interval. The lock is held across the swap so no learner starts half-way.

    Versions above ``version`` are kept: the next one a learner publishes still numbers above
    the highest (:func:`publish_snapshot`), never reusing or overwriting one, while the learner
    resumes from what ``latest`` points to — ``version``'s weights, optimiser and offsets.
    """
    path = snapshots_dir(data_dir) / version_name(version)
    if version not in list_versions(data_dir):
        have = ", ".join(str(v) for v in list_versions(data_dir)) or "none"
        raise RollbackRefused(f"no snapshot version {version} under {path.parent} (versions: {have})")
    try:
        load_version(data_dir, version, with_optimizer=True)  # checksums, then every file parses
    except (OSError, SnapshotError) as exc:
        raise RollbackRefused(f"{exc}; latest left unchanged") from exc
    lock = LearnerLock(data_dir)
    try:
        lock.acquire()
    except LearnerLockError as exc:
        if not force:
            try:
                takes = ACCEPTS_ROLLBACKS in lock.path.read_text()
            except OSError:
                takes = False
            raise LearnerRunning(
                f"a learner is running on this data dir ({exc}); it would publish over the rollback. "
                "Stop it first, or pass --force",
                takes,
            ) from None
        log.warning("rolling back while a learner runs (--force): its next snapshot supersedes v%08d", version)
    try:
        before = latest_version(data_dir)
        _atomic_pointer(snapshots_dir(data_dir), version_name(version))
    finally:
        lock.release()  # a no-op when not acquired
    log.info("latest: %s -> %s", before and version_name(before), version_name(version))
    return before


def manifest_offsets(manifest: dict[str, Any], topic: str) -> dict[int, int]:
    """Next offsets per partition recorded for ``topic`` (empty if the snapshot was of another topic)."""
    if manifest.get("offsets_topic") != topic:
        return {}
    return {int(p): int(o) for p, o in manifest.get("offsets", {}).items()}
