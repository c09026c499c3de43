"""``pacs-node serve`` (or one role) as a child process of a test: started, read, killed."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from storage.db import Database
from tests.orthanc import wait_for


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MiB; NaN where it is not stated."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class NodeProcess:
    """``pacs-node serve`` as a child process that can be killed and started again."""

    def __init__(self, workdir: Path, config_text: str, command: str = "serve") -> None:
        self.workdir = workdir
        self.config = workdir / "node.toml"
        if "[web]" not in config_text:  # the web role only where a test is about it
            config_text += "\n[web]\nenabled = false\n"
        self.config.write_text(config_text)
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, wait: str = "listening on") -> None:
        self.starts += 1
        log = (self.workdir / f"node{self.starts}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node.cli", self.command, "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        if wait:
            wait_for(lambda: wait in self.log(), timeout_s=120, what=f"node: {wait!r}")

    def log(self) -> str:
        return (self.workdir / f"node{self.starts}.log").read_text()

    def role_pids(self, role: str) -> list[int]:
        """The pids the supervisor logged for *role* ("receive", "work[0]", "send")."""
        pattern = re.escape(role) + r" started \(pid (\d+)\)"
        return [int(p) for p in re.findall(pattern, self.log())]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            return self.proc.wait(timeout=60)
        return self.proc.returncode if self.proc is not None else None

    def db(self) -> Database:
        return Database(f"sqlite:///{self.workdir / 'data' / 'node.sqlite3'}")
