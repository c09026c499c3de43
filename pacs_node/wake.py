"""Wake-ups between the roles of one machine: the role that queues a task nudges the roles
that run it, instead of leaving it to their next poll.

A work or send process listens on a Unix datagram socket in the abstract namespace (no file to
clean up after a crash) and registers its name as an empty file in ``<storage>/run/``; a nudge
is one datagram to every process of that role registered by this host. The database stays the
only thing that says what is due: a nudge only ends a role's wait early, and a lost one (or a
role on another machine, which this does not reach) costs at most ``worker.poll_interval_s``,
as before. A registration whose socket is gone (its process died) is removed by the next
nudge that finds it so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

WORK, SEND = "work", "send"
RELIST_S = 1.0  # a nudger reads the registrations again at most this often


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def _address(folder: Path, name: str) -> bytes:
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return b"\0pacs-node-" + digest.encode() + b"-" + name.encode()


class Listener:
    """This process's socket for *role*; sets *event* on every nudge (until :meth:`close`)."""

    def __init__(self, storage_dir: Path, role: str, event: threading.Event) -> None:
        self.folder = Path(storage_dir) / "run"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = f"{_host()}-{role}-{os.getpid()}"
        self.event = event
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(_address(self.folder, self.name))
        (self.folder / self.name).touch()
        self._thread = threading.Thread(target=self._listen, name=f"wake-{role}", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                data = self.sock.recv(64)
            except OSError:  # closed
                return
            if data == b"close":
                return
            self.event.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self.folder / self.name).unlink()
        with contextlib.suppress(OSError):
            self.sock.sendto(b"close", _address(self.folder, self.name))
        self._thread.join(timeout=2)
        self.sock.close()


class Nudger:
    """Nudges the processes of a role registered in a storage folder by this host."""

    def __init__(self, storage_dir: Path, role: str) -> None:
        self.folder = Path(storage_dir) / "run"
        self.prefix = f"{_host()}-{role}-"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self._names: list[str] = []
        self._listed = -RELIST_S
        self._lock = threading.Lock()

    def nudge(self) -> None:
        """Best effort; never raises."""
        with self._lock:
            now = time.monotonic()
            if now - self._listed >= RELIST_S:
                try:
                    self._names = [
                        p.name for p in self.folder.iterdir() if p.name.startswith(self.prefix)
                    ]
                except OSError:
                    self._names = []
                self._listed = now
            for name in list(self._names):
                try:
                    self.sock.sendto(b"!", _address(self.folder, name))
                except BlockingIOError:  # its queue is full: it has been nudged already
                    pass
                except (ConnectionRefusedError, FileNotFoundError):  # nobody listens any more
                    self._names.remove(name)
                    with contextlib.suppress(OSError):
                        (self.folder / name).unlink()
                except OSError as exc:
                    log.debug("nudge of %s failed: %s", name, exc)

    def close(self) -> None:
        self.sock.close()


def listen(storage_dir: Path, role: str, event: threading.Event) -> Listener | None:
    """A :class:`Listener`, or None (logged) where none can be made: the role then polls."""
    try:
        return Listener(storage_dir, role, event)
    except OSError as exc:
        log.warning("no wake-ups for the %s role (%s): it polls", role, exc)
        return None
