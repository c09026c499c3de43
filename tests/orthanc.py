"""Test helper: run a private Orthanc server (from apt) and talk to it over REST.

This is not a test module.  Typical use::

    from tests.orthanc import OrthancServer

    with OrthancServer(tmp_path, modalities={"AINODE": ("AINODE", "127.0.0.1", port)}) as orthanc:
        orthanc.upload(path)
        orthanc.send_to_modality("AINODE", [study_id])

Only the standard library is used (urllib for REST), so the helper works before the
project's own dependencies are installed.

Notes on Orthanc 1.10:

* it has no bind-address option: it listens on all interfaces whatever the config, so we
  pick free ports on 127.0.0.1, set ``RemoteAccessAllowed: false`` and give an explicit
  ``DicomModalities`` list;
* ``POST /instances`` answers ``{"ID", "ParentPatient", "ParentStudy", "ParentSeries",
  "Path", "Status"}`` where ``Status`` is ``"Success"`` or ``"AlreadyStored"``;
* ``POST /tools/lookup`` answers a list of ``{"ID", "Path", "Type"}`` with ``Type`` one
  of ``"Patient"``, ``"Study"``, ``"Series"``, ``"Instance"``;
* ``POST /tools/lookup`` takes the bare UID as a text body; a study whose
  SeriesInstanceUID equals its StudyInstanceUID (some old CR files) yields two hits;
* ``POST /modalities/{id}/store`` with ``"Synchronous": true`` answers, once the C-STORE
  is done, the job content ``{"Description", "FailedInstancesCount", "InstancesCount",
  "LocalAet", "ParentResources", "RemoteAet"}``; an unreachable peer gives HTTP 500 with a
  JSON error body (``"OrthancStatus": 9``, "Error in the network protocol") at once.
  With ``"Synchronous": false`` it answers ``{"ID": job_id, "Path": "/jobs/<id>"}``; the
  job's ``State`` goes to ``"Success"`` or ``"Failure"`` (jobs are polled ~every 200 ms);
* an unknown resource gives HTTP 404 with an empty body;
* start-up takes ~0.2 s; a graceful stop (SIGTERM) takes ~3 s (HTTP server ~2 s,
  DICOM server ~1 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ORTHANC_BIN = "/usr/sbin/Orthanc"

# Absolute paths on purpose: on some machines Python "storescu" & co. shadow dcmtk on PATH.
DCMTK: dict[str, str] = {
    "storescu": "/usr/bin/storescu",
    "storescp": "/usr/bin/storescp",
    "findscu": "/usr/bin/findscu",
    "echoscu": "/usr/bin/echoscu",
    "movescu": "/usr/bin/movescu",
    "getscu": "/usr/bin/getscu",
    "dcmdump": "/usr/bin/dcmdump",
    "dsrdump": "/usr/bin/dsrdump",
}


def _shared_data() -> Path:
    override = os.environ.get("PACS_NODE_SHARED_DATA")
    if override:
        return Path(override).expanduser().resolve()
    # <repo>/tests/orthanc.py -> parents[1] is <repo>; shared/ lies beside the repo.
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


SHARED_DATA: Path = _shared_data()


def orthanc_available() -> bool:
    """True when the Orthanc server binary from apt is installed."""
    return os.path.isfile(ORTHANC_BIN) and os.access(ORTHANC_BIN, os.X_OK)


def dcmtk_available(*tools: str) -> bool:
    """True when the named dcmtk tools (default: storescu, storescp, echoscu) exist."""
    names = tools or ("storescu", "storescp", "echoscu")
    return all(os.access(DCMTK[name], os.X_OK) for name in names)


def dcmtk_env() -> dict[str, str]:
    """A copy of os.environ for dcmtk tools (TCP_NODELAY avoids a ~40 ms delay per file)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> list[int]:
    """Several distinct free ports, holding all sockets open at once so they differ."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:*port*."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet" (the last one is reported).
    Raises TimeoutError after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # polled predicates may fail transiently
            last_exc = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_exc!r}" if last_exc is not None else ""
            raise TimeoutError(f"timed out after {timeout_s:.1f} s waiting for {what}{detail}")
        time.sleep(interval_s)


class OrthancError(RuntimeError):
    """Orthanc failed to start, or a REST call failed."""


class _PortInUse(OrthancError):
    """Orthanc could not bind a port we picked (another process took it meanwhile)."""


class OrthancServer:
    """A private Orthanc 1.10 instance with its storage, index, config and log in ``workdir``.

    ``modalities`` maps the Orthanc-side modality name to ``(aet, host, port)``.
    Use as a context manager, or call ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        aet: str = "ORTHANC",
        name: str = "pacs-node-test",
        start_timeout_s: float = 30.0,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.name = name
        self.modalities = dict(modalities or {})
        self.start_timeout_s = start_timeout_s
        self.extra_config = dict(extra_config or {})
        self.host = "127.0.0.1"
        self.dicom_port, self.http_port = _free_ports(2)
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": self.name,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                key: [aet, host, int(port)] for key, (aet, host, port) in self.modalities.items()
            },
            "OrthancPeers": {},
            "Plugins": [],
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 10,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "LogExportedResources": False,
            "SaveJobs": False,
            "StorageCompression": False,
            "HttpDescribeErrors": True,
            "ExecuteLuaEnabled": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self, attempts: int = 3) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers.

        If a chosen port was taken in the meantime (free-port race), retry with new ports.
        """
        if self.proc is not None:
            return self
        if not orthanc_available():
            raise OrthancError(f"{ORTHANC_BIN} is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except _PortInUse:
                if attempt == attempts:
                    raise
                self.dicom_port, self.http_port = _free_ports(2)
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, "--no-jobs", str(self.config_path)],
            env=dcmtk_env(),  # Orthanc's DICOM side is dcmtk: TCP_NODELAY applies to it too
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                log = self.log_tail()
                new_log = self.log_path.read_bytes()[log_offset:].decode("utf-8", "replace")
                cls = _PortInUse if "already in use" in new_log else OrthancError
                raise cls(f"Orthanc exited with {rc} at start; log {self.log_path}:\n{log}")
            try:
                info = self.get("/system", timeout_s=2.0)
                if (
                    isinstance(info, dict)
                    and info.get("Name") == self.name
                    and info.get("DicomAet") == self.aet
                    and info.get("DicomPort") == self.dicom_port
                ):
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise OrthancError(
                    f"Orthanc did not answer on {self.url}/system within "
                    f"{self.start_timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; tests should use the context manager
        with contextlib.suppress(Exception):
            self.stop(timeout_s=2.0)

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return text[-max_chars:]

    # ------------------------------------------------------------------ REST
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bool = False,
        content_type: str | None = None,
        timeout_s: float = 60.0,
    ) -> Any:
        """One REST call. ``body``: bytes are sent as is, str as text, anything else as JSON.

        Returns parsed JSON (or bytes when ``raw``). Raises OrthancError on HTTP errors.
        """
        data: bytes | None
        headers: dict[str, str] = {}
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            headers["Content-Type"] = content_type or "application/dicom"
        elif isinstance(body, str):
            data = body.encode("utf-8")
            headers["Content-Type"] = content_type or "text/plain"
        else:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = content_type or "application/json"
        if not path.startswith("/"):
            path = "/" + path
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc
        if raw:
            return payload
        if not payload.strip():
            return None
        return json.loads(payload)

    def get(self, path: str, timeout_s: float = 60.0) -> Any:
        return self.request("GET", path, timeout_s=timeout_s)

    def post(self, path: str, body: Any = None, timeout_s: float = 60.0) -> Any:
        return self.request("POST", path, {} if body is None else body, timeout_s=timeout_s)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # ------------------------------------------------------------------ conveniences
    def upload(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """POST /instances with the file's bytes; returns Orthanc's answer (ID, ParentStudy..)."""
        result = self.request("POST", "/instances", Path(path).read_bytes())
        if not isinstance(result, dict):
            raise OrthancError(f"unexpected answer to POST /instances: {result!r}")
        return result

    def upload_many(self, paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
        return [self.upload(p) for p in paths]

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def study(self, study_id: str) -> dict[str, Any]:
        return dict(self.get(f"/studies/{study_id}"))

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The expanded series of a study (each has ID, MainDicomTags, Instances...)."""
        return list(self.get(f"/studies/{study_id}/series"))

    def instances_of_series(self, series_id: str) -> list[str]:
        return list(self.get(f"/series/{series_id}")["Instances"])

    def get_file(self, instance_id: str) -> bytes:
        return bytes(self.request("GET", f"/instances/{instance_id}/file", raw=True))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """GET /instances/{id}/simplified-tags (keyword -> value)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def find_study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's study ID for a StudyInstanceUID, or None if Orthanc does not have it."""
        for hit in self.post("/tools/lookup", study_instance_uid) or []:
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def series_modalities(self, study_instance_uid: str) -> list[str]:
        """Modality of each series of the study (e.g. ["CR", "SR", "SC"]); [] when absent."""
        study_id = self.find_study_id(study_instance_uid)
        if study_id is None:
            return []
        return [
            str(series.get("MainDicomTags", {}).get("Modality", ""))
            for series in self.study_series(study_id)
        ]

    def echo_modality(self, modality_name: str) -> bool:
        """C-ECHO from Orthanc to a configured modality."""
        try:
            self.post(f"/modalities/{modality_name}/echo", {})
        except OrthancError:
            return False
        return True

    def send_to_modality(
        self,
        modality_name: str,
        resources: list[str],
        synchronous: bool = True,
        timeout_s: float = 120.0,
        check: bool = True,
    ) -> Any:
        """C-STORE Orthanc resources (patient/study/series/instance IDs) to a modality.

        Synchronous: returns once done with the job content (``InstancesCount``,
        ``FailedInstancesCount``, ``RemoteAet``...), raising OrthancError on failure (also when
        ``FailedInstancesCount`` > 0 unless ``check`` is False).
        Asynchronous: returns {"ID": job_id, "Path": "/jobs/<id>"}; see ``wait_job``.
        """
        body = {"Resources": list(resources), "Synchronous": bool(synchronous)}
        result = self.post(f"/modalities/{modality_name}/store", body, timeout_s=timeout_s)
        if (
            check
            and synchronous
            and isinstance(result, dict)
            and int(result.get("FailedInstancesCount", 0) or 0) > 0
        ):
            raise OrthancError(f"C-STORE to {modality_name} partly failed: {result!r}")
        return result

    def wait_job(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait for a job to reach Success; raise OrthancError if it fails."""

        def done() -> dict[str, Any] | None:
            job = self.get(f"/jobs/{job_id}")
            if job.get("State") in ("Success", "Failure"):
                return dict(job)
            return None

        job = wait_for(done, timeout_s, what=f"Orthanc job {job_id}")
        assert job is not None  # wait_for only returns truthy values
        if job["State"] != "Success":
            raise OrthancError(f"job {job_id} failed: {json.dumps(job)[:2000]}")
        return job

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout_s: float,
        interval_s: float = 0.2,
        what: str = "condition",
    ) -> T:
        return wait_for(predicate, timeout_s, interval_s, what=what)

    def wait_for_study(self, study_instance_uid: str, timeout_s: float = 30.0) -> str:
        """Wait until Orthanc has the study; return its Orthanc ID."""
        study_id = wait_for(
            lambda: self.find_study_id(study_instance_uid),
            timeout_s,
            what=f"study {study_instance_uid} in Orthanc",
        )
        assert study_id is not None  # wait_for only returns truthy values
        return study_id


def storescp_cmd(output_dir: str | os.PathLike[str], port: int, aet: str = "STORESCP") -> list[str]:
    """A dcmtk storescp command line that accepts everything into ``output_dir``."""
    return [
        DCMTK["storescp"],
        "-aet",
        aet,
        "--promiscuous",
        "--output-directory",
        str(output_dir),
        str(port),
    ]


class StoreScp:
    """A dcmtk ``storescp`` destination on a free (or given) port, writing into *out_dir*."""

    def __init__(self, out_dir: Path, port: int | None = None, *extra: str) -> None:
        self.out_dir = Path(out_dir)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreScp:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*storescp_cmd(self.out_dir, self.port), *self.extra],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        wait_for(
            lambda: port_open(self.port), timeout_s=20, interval_s=0.05, what="storescp to listen"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def received(self) -> list[Path]:
        return sorted(self.out_dir.iterdir())


def findscu(port: int, *keys: str, calling: str = "FINDER", called: str = "AINODE") -> str:
    """Run dcmtk's Study Root ``findscu`` against 127.0.0.1:*port* with ``-k`` *keys*; its
    output (the matches are printed to stderr). Fails the caller on a non-zero exit."""
    args = [DCMTK["findscu"], "-S", "-aec", called, "-aet", calling, "127.0.0.1", str(port)]
    for key in keys:
        args += ["-k", key]
    run = subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr
