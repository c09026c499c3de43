"""Safe paths from UIDs and atomic, durable writes (temp file, fsync, rename, fsync dir)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from storage.errors import InvalidInstanceError, OutOfSpaceError

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX = 64


def check_uid(value: object, keyword: str) -> str:
    """Return *value* as a UID, or raise :class:`InvalidInstanceError` naming *keyword*."""
    uid = str(value or "").strip().rstrip("\x00")
    if not uid:
        raise InvalidInstanceError(f"{keyword} is missing")
    if len(uid) > UID_MAX:
        raise InvalidInstanceError(f"{keyword} is {len(uid)} characters long (at most 64 allowed)")
    if not UID_PATTERN.match(uid):
        raise InvalidInstanceError(f"{keyword} is not a valid UID (digits and dots only)")
    return uid


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives, relative to the storage root; every part is a checked UID."""
    parts = (
        check_uid(study_uid, "StudyInstanceUID"),
        check_uid(series_uid, "SeriesInstanceUID"),
        check_uid(sop_uid, "SOPInstanceUID"),
    )
    return Path("instances", parts[0], parts[1], parts[2] + ".dcm")


class FileStore:
    """The folder under which instances are kept."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self._prefix = os.path.join(self.root, "")  # the root and a separator
        self.min_free_bytes = min_free_bytes
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def abspath(self, relpath: str | Path) -> Path:
        """The file's path under the root. The check is on the path's text (".." and absolute
        paths), not on symbolic links: resolving them cost more than indexing an instance on
        the C-STORE path, and nothing but the operator can make a link in the storage folder."""
        path = os.path.normpath(os.path.join(self.root, relpath))
        if not path.startswith(self._prefix):
            raise InvalidInstanceError(f"path {relpath} escapes the storage folder")
        return Path(path)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, needed_bytes: int = 0) -> None:
        free = self.free_bytes()
        if free - needed_bytes < self.min_free_bytes:
            raise OutOfSpaceError(
                f"storage has {free // 2**20} MiB free, below the floor of "
                f"{self.min_free_bytes // 2**20} MiB"
            )

    def write_atomic(self, relpath: str | Path, write: Callable[[BinaryIO], object]) -> int:
        """Write a file through *write* so that it is either whole on disk or absent.

        Returns the size in bytes. The data is fsynced, renamed into place and the folder
        fsynced, so that when this returns the file survives a crash or power loss.
        """
        target = self.abspath(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", prefix=_tmp_prefix(), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            os.replace(tmp_name, target)
        except OSError as exc:
            _unlink_quietly(tmp_name)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpaceError(f"storage is full: {exc.strerror}") from exc
            raise
        except BaseException:
            _unlink_quietly(tmp_name)
            raise
        _fsync_dir(target.parent)
        return size

    def adopt(self, source: Path, relpath: str | Path) -> int:
        """Move a complete file written elsewhere (pynetdicom's stream of a received data set)
        into place, as durably as :meth:`write_atomic`; copied when it lies on another file
        system. Returns the size in bytes."""
        target = self.abspath(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        self.check_space(size)
        try:
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                if exc.errno in (28, 122):
                    raise OutOfSpaceError(f"storage is full: {exc.strerror}") from exc
                raise
            with source.open("rb") as fh:
                return self.write_atomic(relpath, lambda out: shutil.copyfileobj(fh, out, 2**20))
        _fsync_dir(target.parent)
        return size

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @staticmethod
    def partial_prefix() -> str:
        """The name prefix of a partial file this process writes in :attr:`tmp_dir` (its host
        and pid, so that :meth:`clean_tmp` of another process leaves it alone)."""
        return _tmp_prefix()

    def remove(self, relpath: str | Path) -> None:
        _unlink_quietly(self.abspath(relpath))

    def clean_tmp(self) -> int:
        """Delete partial files left by crashed processes of this machine (other machines
        sharing the folder, and live processes here, keep theirs); returns how many."""
        removed = 0
        for part in (self.root / "tmp").glob("*.part"):
            host, pid = _tmp_owner(part.name)
            if host == _HOST and pid is not None and pid_alive(pid):
                continue
            if host not in (_HOST, None):
                continue
            _unlink_quietly(part)
            removed += 1
        return removed


_HOST = socket.gethostname()[:40].replace("~", "-")


def _tmp_prefix() -> str:
    return f"{_HOST}~{os.getpid()}~"


def _tmp_owner(name: str) -> tuple[str | None, int | None]:
    """(host, pid) of a partial file's writer; (None, None) for names of 0.2.0 ("in-...")."""
    parts = name.split("~")
    if len(parts) >= 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def pid_alive(pid: int) -> bool:
    """Whether process *pid* of this machine still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
