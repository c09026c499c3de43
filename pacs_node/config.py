"""Read ``config.toml`` into frozen, validated objects.

Every problem stops start-up with a :class:`ConfigError` whose message names the key's path
(``node.port``, ``peers[1].ae_title``) so an operator can fix the file without reading code.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai.selection import DEFAULT_RULES, Rule, RuleError, rule_from_table
from pacs_node.errors import ConfigError

AE_TITLE_MAX = 16
RUNTIMES = ("onnx", "keras")


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "AINODE"
    # the called AE titles an association may address; empty: ae_title only
    called_ae_titles: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 11112
    storage_dir: Path = Path("var")
    database_url: str = ""  # empty: SQLite file inside storage_dir
    accept_unknown_peers: bool = True
    min_free_mb: int = 200  # below this much free space, C-STORE answers "out of resources"
    max_pdu_bytes: int = 262144  # announced to peers and enforced; 0: none announced (16 MiB)
    max_associate_rq_bytes: int = 65536  # a longer A-ASSOCIATE-RQ is aborted unread
    pdu_timeout_s: float = 30.0  # a PDU's last byte must arrive this soon after its first
    associate_rq_timeout_s: float = 5.0  # the same for an A-ASSOCIATE-RQ
    max_associations: int = 32  # at once, in each receive process
    max_dataset_bytes: int = 2 * 2**30  # a larger C-STORE is answered 0xA700
    stream_to_disk: bool = True  # received data sets go to disk fragment by fragment
    max_stranger_connections: int = 8  # at once, from addresses of no configured peer
    max_connections_per_address: int = 16  # at once, from any one address
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    receive_processes: int = 1  # `serve` runs this many receive processes on the one port

    @property
    def accepted_called_ae_titles(self) -> tuple[str, ...]:
        return self.called_ae_titles or (self.ae_title,)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.storage_dir / 'node.sqlite3').resolve()}"


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    send_results: bool = True
    check_host: bool = True  # refuse this AE title when it calls from another address
    priority: int = 0  # added to the modality's priority for this peer's studies
    # before a multi-image series (CT) is analysed, ask this peer by C-FIND how many instances
    # it holds for the series and wait for them; off for a peer that does not answer C-FIND
    ask_completeness: bool = True
    # after sending results, ask this peer by C-FIND whether it holds them; one that answered
    # Success but does not is sent them again
    confirm_deliveries: bool = True
    storage_commitment: bool = True  # confirm by Storage Commitment first, where it offers it


@dataclass(frozen=True)
class TlsSettings:
    """DICOM over TLS on a second port (PS3.15 B.1, "The Basic TLS Secure Transport")."""

    enabled: bool = False
    port: int = 2762
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # client certificates must chain to this
    require_client_cert: bool = True


@dataclass(frozen=True)
class WebSettings:
    """The node's web server: DICOMweb under /dicomweb (issue 12), in a process of its own."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""  # every request needs "Authorization: Bearer <token>"; "": loopback only
    max_upload_bytes: int = 2 * 1024**3  # one STOW-RS request body, at most
    max_connections: int = 64  # at once; more are answered 503


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail (DICOM PS3.15 A.5 messages, :mod:`pacs_node.audit`): a file, one message
    a line, and optionally a syslog collector over TLS (RFC 5424 messages, RFC 5425 framing)."""

    enabled: bool = True
    file: Path | None = None  # None: audit/audit.log in node.storage_dir
    source_id: str = ""  # AuditSourceID; "": node.ae_title
    enterprise_site_id: str = ""
    syslog_host: str = ""  # "": no syslog
    syslog_port: int = 6514  # the port RFC 5425 assigns to syslog over TLS
    syslog_ca_file: Path | None = None  # the collector's certificate is checked against it
    syslog_cert_file: Path | None = None  # the node's certificate, when the collector asks
    syslog_key_file: Path | None = None
    syslog_queue: int = 10_000  # messages held while the collector is unreachable


DEFAULT_MODALITY_PRIORITY = (("CR", 10), ("DX", 10))  # radiographs ahead of CT


@dataclass(frozen=True)
class WorkerSettings:
    processes: int = 1  # work processes `serve` runs on this machine
    poll_interval_s: float = 0.2  # how often an idle role looks for due tasks
    lease_s: float = 60.0  # renewed every lease_s / 4 while a task runs
    deadline_s: float = 300.0  # one analysis attempt, at most; then it is stopped
    max_attempts: int = 3
    retry_backoff_s: float = 10.0
    ct_quiet_period_s: float = 5.0  # without an answer from the sender: wait this long
    # for a peer that answers C-FIND: the series is checked this long after its last instance,
    # and again as often while the peer holds more than the node
    completeness_settle_s: float = 1.0
    completeness_wait_s: float = 600.0  # no new instance for this long: analyse what is here
    completeness_timeout_s: float = 10.0  # the C-FIND to the peer, at most
    modality_priority: tuple[tuple[str, int], ...] = DEFAULT_MODALITY_PRIORITY
    # a series the node stores but does not analyse (no model for its modality, not a chest
    # radiograph, too small, undecodable) gets an SR back that says so and why
    report_not_analysed: bool = True
    # the heatmap also as a DICOM Parametric Map (besides the secondary capture); off for a
    # PACS that refuses Parametric Map Storage
    parametric_map: bool = True
    # the work role's scheduling niceness (0-19); above 0 analysis yields the CPU to the DICOM
    # services. 0 by default: on two cores 10 did not speed up receiving during a burst and
    # made the burst 20-30 % slower
    nice: int = 0
    # first attempts at single-image series (CR, DX) of one model claimed together, at most;
    # their results indexed and owed in one transaction. 1: a job at a time
    batch_size: int = 8

    def priority(self, modality: str) -> int:
        return dict(self.modality_priority).get(modality, 0)


@dataclass(frozen=True)
class DeliverySettings:
    max_attempts: int = 8
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 600.0
    also_send_to: tuple[str, ...] = ()
    commitment_wait_s: float = 60.0  # no Storage Commitment report by then: checked by C-FIND


@dataclass(frozen=True)
class ModelBinding:
    """Which model file serves which modalities."""

    name: str
    modalities: tuple[str, ...]
    path: str = ""  # empty: the model shipped inside the package under this name
    enabled: bool = True
    runtime: str = "onnx"  # "onnx" (ONNX Runtime, the faster on CPU) or "keras"
    # which images and series it reads (ai.selection): skip and prefer rules over headers
    rules: tuple[Rule, ...] = DEFAULT_RULES
    one_series_per_study: bool = False  # several series in a study: the prefer rules pick one


DEFAULT_MODELS = (
    ModelBinding(name="cxr", modalities=("CR", "DX")),
    ModelBinding(name="ct", modalities=("CT",), one_series_per_study=True),
)


@dataclass(frozen=True)
class Config:
    node: NodeSettings = field(default_factory=NodeSettings)
    peers: tuple[Peer, ...] = ()
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    web: WebSettings = field(default_factory=WebSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    models: tuple[ModelBinding, ...] = DEFAULT_MODELS
    log_level: str = "INFO"

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def model_named(self, name: str) -> ModelBinding | None:
        return next((m for m in self.models if m.name == name), None)

    def model_for(self, modality: str) -> ModelBinding | None:
        for binding in self.models:
            if binding.enabled and modality in binding.modalities:
                return binding
        return None


# -- parsing helpers -------------------------------------------------------------------------


def _take(
    table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str, default: Any
) -> Any:
    if key not in table:
        return default
    value = table[key]
    # bool is an int subclass; refuse it where a number is wanted
    if (
        isinstance(value, bool)
        and kind is not bool
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise ConfigError(f"{path}.{key}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(
            f"{path}.{key}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _number(
    table: Mapping[str, Any], key: str, path: str, default: float, *, minimum: float = 0.0
) -> float:
    value = float(_take(table, key, (int, float), path, default))
    if value < minimum:
        raise ConfigError(f"{path}.{key}: must be at least {minimum}, got {value}")
    return value


def _reject_unknown(table: Mapping[str, Any], known: set[str], path: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})"
        )


def validate_ae_title(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string AE title, got {value!r}")
    title = value.strip()
    if not title or len(title) > AE_TITLE_MAX:
        raise ConfigError(f"{path}: AE title must be 1 to 16 characters, got {value!r}")
    if "\\" in title or any(ord(c) < 0x20 or ord(c) > 0x7E for c in title):
        raise ConfigError(
            f"{path}: AE title may hold only printable ASCII without backslash, got {value!r}"
        )
    return title


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{path}: expected a TCP port 0-65535, got {value!r}")
    return value


def _host(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: expected a host name or IP address, got {value!r}")
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if any(c.isspace() for c in value):
            raise ConfigError(f"{path}: not a valid host name: {value!r}") from None
    return value


def _called_ae_titles(table: Mapping[str, Any]) -> tuple[str, ...]:
    value = table.get("called_ae_titles", [])
    if not isinstance(value, list):
        raise ConfigError("node.called_ae_titles: expected a list of AE titles")
    return tuple(validate_ae_title(v, f"node.called_ae_titles[{i}]") for i, v in enumerate(value))


def _parse_node(table: Mapping[str, Any], base_dir: Path) -> NodeSettings:
    known = {f for f in NodeSettings.__dataclass_fields__}
    _reject_unknown(table, known, "node")
    d = NodeSettings()
    storage_dir = Path(_take(table, "storage_dir", str, "node", str(d.storage_dir)))
    if not storage_dir.is_absolute():
        storage_dir = base_dir / storage_dir
    database_url = _take(table, "database_url", str, "node", d.database_url)
    if database_url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(database_url)
        except ArgumentError as exc:
            raise ConfigError(f"node.database_url: not an SQLAlchemy URL: {exc}") from None
    return NodeSettings(
        ae_title=validate_ae_title(table.get("ae_title", d.ae_title), "node.ae_title"),
        called_ae_titles=_called_ae_titles(table),
        host=_host(table.get("host", d.host), "node.host"),
        port=_port(table.get("port", d.port), "node.port"),
        storage_dir=storage_dir,
        database_url=database_url,
        accept_unknown_peers=_take(
            table, "accept_unknown_peers", bool, "node", d.accept_unknown_peers
        ),
        min_free_mb=int(_number(table, "min_free_mb", "node", d.min_free_mb)),
        max_pdu_bytes=_max_pdu(table, d.max_pdu_bytes),
        max_associate_rq_bytes=int(
            _number(table, "max_associate_rq_bytes", "node", d.max_associate_rq_bytes, minimum=1024)
        ),
        pdu_timeout_s=_number(table, "pdu_timeout_s", "node", d.pdu_timeout_s, minimum=1),
        associate_rq_timeout_s=_number(
            table, "associate_rq_timeout_s", "node", d.associate_rq_timeout_s, minimum=0.5
        ),
        network_timeout_s=_number(
            table, "network_timeout_s", "node", d.network_timeout_s, minimum=1
        ),
        acse_timeout_s=_number(table, "acse_timeout_s", "node", d.acse_timeout_s, minimum=1),
        dimse_timeout_s=_number(table, "dimse_timeout_s", "node", d.dimse_timeout_s, minimum=1),
        receive_processes=_receive_processes(table, d.receive_processes),
        max_associations=_count(table, "max_associations", d.max_associations),
        max_dataset_bytes=int(
            _number(table, "max_dataset_bytes", "node", d.max_dataset_bytes, minimum=1024)
        ),
        stream_to_disk=_take(table, "stream_to_disk", bool, "node", d.stream_to_disk),
        max_stranger_connections=_count(
            table, "max_stranger_connections", d.max_stranger_connections
        ),
        max_connections_per_address=_count(
            table, "max_connections_per_address", d.max_connections_per_address
        ),
    )


def _count(table: Mapping[str, Any], key: str, default: int) -> int:
    value = _take(table, key, int, "node", default)
    if not 1 <= value <= 10_000:
        raise ConfigError(f"node.{key}: must be 1 to 10000, got {value}")
    return int(value)


def _max_pdu(table: Mapping[str, Any], default: int) -> int:
    value = int(_number(table, "max_pdu_bytes", "node", default))
    if value and not 4096 <= value <= 16 * 2**20:
        raise ConfigError(f"node.max_pdu_bytes: must be 0 or 4096 to 16777216, got {value}")
    return value


def _receive_processes(table: Mapping[str, Any], default: int) -> int:
    value = _take(table, "receive_processes", int, "node", default)
    if not 1 <= value <= 64:
        raise ConfigError(f"node.receive_processes: must be 1 to 64, got {value}")
    if value > 1 and table.get("port", 11112) == 0:
        raise ConfigError("node.receive_processes: more than one needs a fixed node.port, not 0")
    return value


def _parse_peers(items: Any) -> tuple[Peer, ...]:
    if not isinstance(items, list):
        raise ConfigError("peers: expected [[peers]] tables")
    peers: list[Peer] = []
    for i, item in enumerate(items):
        path = f"peers[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: expected a table")
        _reject_unknown(
            item,
            {"ae_title", "host", "port", "send_results", "check_host", "priority",
             "ask_completeness", "confirm_deliveries", "storage_commitment"},
            path,
        )  # fmt: skip
        for key in ("ae_title", "host", "port"):
            if key not in item:
                raise ConfigError(f"{path}.{key}: required")
        peer = Peer(
            ae_title=validate_ae_title(item["ae_title"], f"{path}.ae_title"),
            host=_host(item["host"], f"{path}.host"),
            port=_port(item["port"], f"{path}.port"),
            send_results=_take(item, "send_results", bool, path, True),
            check_host=_take(item, "check_host", bool, path, True),
            priority=_take(item, "priority", int, path, 0),
            ask_completeness=_take(item, "ask_completeness", bool, path, True),
            confirm_deliveries=_take(item, "confirm_deliveries", bool, path, True),
            storage_commitment=_take(item, "storage_commitment", bool, path, True),
        )
        if any(p.ae_title == peer.ae_title for p in peers):
            raise ConfigError(f"{path}.ae_title: {peer.ae_title!r} is listed twice")
        peers.append(peer)
    return tuple(peers)


def _parse_worker(table: Mapping[str, Any]) -> WorkerSettings:
    _reject_unknown(table, set(WorkerSettings.__dataclass_fields__), "worker")
    d = WorkerSettings()
    max_attempts = _take(table, "max_attempts", int, "worker", d.max_attempts)
    if max_attempts < 1:
        raise ConfigError(f"worker.max_attempts: must be at least 1, got {max_attempts}")
    processes = _take(table, "processes", int, "worker", d.processes)
    if not 1 <= processes <= 64:
        raise ConfigError(f"worker.processes: must be 1 to 64, got {processes}")
    nice = _take(table, "nice", int, "worker", d.nice)
    if not 0 <= nice <= 19:
        raise ConfigError(f"worker.nice: must be 0 to 19, got {nice}")
    batch_size = _take(table, "batch_size", int, "worker", d.batch_size)
    if not 1 <= batch_size <= 64:
        raise ConfigError(f"worker.batch_size: must be 1 to 64, got {batch_size}")
    priorities = _take(table, "modality_priority", dict, "worker", dict(d.modality_priority))
    for modality, value in priorities.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"worker.modality_priority.{modality}: expected an integer, got {value!r}"
            )
    return WorkerSettings(
        processes=processes,
        poll_interval_s=_number(
            table, "poll_interval_s", "worker", d.poll_interval_s, minimum=0.01
        ),
        lease_s=_number(table, "lease_s", "worker", d.lease_s, minimum=1),
        deadline_s=_number(table, "deadline_s", "worker", d.deadline_s, minimum=1),
        modality_priority=tuple(sorted((m.upper(), v) for m, v in priorities.items())),
        max_attempts=max_attempts,
        retry_backoff_s=_number(table, "retry_backoff_s", "worker", d.retry_backoff_s),
        ct_quiet_period_s=_number(table, "ct_quiet_period_s", "worker", d.ct_quiet_period_s),
        completeness_settle_s=_number(
            table, "completeness_settle_s", "worker", d.completeness_settle_s, minimum=0.05
        ),
        completeness_wait_s=_number(table, "completeness_wait_s", "worker", d.completeness_wait_s),
        completeness_timeout_s=_number(
            table, "completeness_timeout_s", "worker", d.completeness_timeout_s, minimum=0.5
        ),
        report_not_analysed=_take(
            table, "report_not_analysed", bool, "worker", d.report_not_analysed
        ),
        parametric_map=_take(table, "parametric_map", bool, "worker", d.parametric_map),
        nice=nice,
        batch_size=batch_size,
    )


def _parse_delivery(table: Mapping[str, Any], peers: tuple[Peer, ...]) -> DeliverySettings:
    _reject_unknown(table, set(DeliverySettings.__dataclass_fields__), "delivery")
    d = DeliverySettings()
    max_attempts = _take(table, "max_attempts", int, "delivery", d.max_attempts)
    if max_attempts < 1:
        raise ConfigError(f"delivery.max_attempts: must be at least 1, got {max_attempts}")
    also = _take(table, "also_send_to", list, "delivery", [])
    titles = []
    for i, title in enumerate(also):
        title = validate_ae_title(title, f"delivery.also_send_to[{i}]")
        if not any(p.ae_title == title for p in peers):
            raise ConfigError(f"delivery.also_send_to[{i}]: {title!r} is not one of the [[peers]]")
        titles.append(title)
    initial = _number(table, "backoff_initial_s", "delivery", d.backoff_initial_s)
    maximum = _number(table, "backoff_max_s", "delivery", d.backoff_max_s)
    if maximum < initial:
        raise ConfigError(
            "delivery.backoff_max_s: must not be less than delivery.backoff_initial_s"
        )
    return DeliverySettings(
        max_attempts,
        initial,
        maximum,
        tuple(titles),
        commitment_wait_s=_number(
            table, "commitment_wait_s", "delivery", d.commitment_wait_s, minimum=0.1
        ),
    )


def _parse_tls(table: Mapping[str, Any], base_dir: Path) -> TlsSettings:
    _reject_unknown(table, set(TlsSettings.__dataclass_fields__), "tls")
    d = TlsSettings()
    enabled = _take(table, "enabled", bool, "tls", d.enabled)
    files: dict[str, Path | None] = {}
    for key in ("cert_file", "key_file", "ca_file"):
        value = _take(table, key, str, "tls", "")
        path = (base_dir / value) if value and not Path(value).is_absolute() else Path(value)
        files[key] = path if value else None
        if enabled and value and not path.is_file():
            raise ConfigError(f"tls.{key}: no such file {path}")
    require = _take(table, "require_client_cert", bool, "tls", d.require_client_cert)
    if enabled:
        for key in ("cert_file", "key_file"):
            if files[key] is None:
                raise ConfigError(f"tls.{key}: required when tls.enabled is true")
        if require and files["ca_file"] is None:
            raise ConfigError("tls.ca_file: required when tls.require_client_cert is true")
    return TlsSettings(
        enabled=enabled,
        port=_port(table.get("port", d.port), "tls.port"),
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        ca_file=files["ca_file"],
        require_client_cert=require,
    )


def _parse_web(table: Mapping[str, Any]) -> WebSettings:
    _reject_unknown(table, set(WebSettings.__dataclass_fields__), "web")
    d = WebSettings()
    token = _take(table, "token", str, "web", d.token)
    if token and (len(token) < 16 or any(c.isspace() for c in token)):
        raise ConfigError("web.token: at least 16 characters, no spaces")
    return WebSettings(
        enabled=_take(table, "enabled", bool, "web", d.enabled),
        host=_host(table.get("host", d.host), "web.host"),
        port=_port(table.get("port", d.port), "web.port"),
        token=token,
        max_upload_bytes=int(
            _number(table, "max_upload_bytes", "web", d.max_upload_bytes, minimum=1024)
        ),
        max_connections=int(_number(table, "max_connections", "web", d.max_connections, minimum=1)),
    )


def _parse_audit(table: Mapping[str, Any], base_dir: Path) -> AuditSettings:
    _reject_unknown(table, set(AuditSettings.__dataclass_fields__), "audit")
    d = AuditSettings()
    paths: dict[str, Path | None] = {}
    for key in ("file", "syslog_ca_file", "syslog_cert_file", "syslog_key_file"):
        value = _take(table, key, str, "audit", "")
        paths[key] = (
            (Path(value) if Path(value).is_absolute() else base_dir / value) if value else None
        )
    host = _take(table, "syslog_host", str, "audit", "")
    if host:
        host = _host(host, "audit.syslog_host")
        if paths["syslog_ca_file"] is None:
            raise ConfigError(
                "audit.syslog_ca_file: required with audit.syslog_host (the collector's "
                "certificate is checked; RFC 5425 allows no plain connection)"
            )
    if (paths["syslog_cert_file"] is None) != (paths["syslog_key_file"] is None):
        raise ConfigError("audit.syslog_cert_file and audit.syslog_key_file: give both or neither")
    for key in ("syslog_ca_file", "syslog_cert_file", "syslog_key_file"):
        path = paths[key]
        if host and path is not None and not path.is_file():
            raise ConfigError(f"audit.{key}: no such file {path}")
    source_id = _take(table, "source_id", str, "audit", "")
    site = _take(table, "enterprise_site_id", str, "audit", "")
    for key, value in (("source_id", source_id), ("enterprise_site_id", site)):
        if any(c.isspace() for c in value):
            raise ConfigError(f"audit.{key}: no spaces (it is an XML token)")
    return AuditSettings(
        enabled=_take(table, "enabled", bool, "audit", d.enabled),
        file=paths["file"],
        source_id=source_id,
        enterprise_site_id=site,
        syslog_host=host,
        syslog_port=_port(table.get("syslog_port", d.syslog_port), "audit.syslog_port"),
        syslog_ca_file=paths["syslog_ca_file"],
        syslog_cert_file=paths["syslog_cert_file"],
        syslog_key_file=paths["syslog_key_file"],
        syslog_queue=int(_number(table, "syslog_queue", "audit", d.syslog_queue, minimum=1)),
    )


def _parse_rules(item: Mapping[str, Any], path: str) -> tuple[Rule, ...]:
    """A model's ``rules`` (they replace the defaults, ai.selection.DEFAULT_RULES)."""
    if "rules" not in item:
        return DEFAULT_RULES
    tables = item["rules"]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}.rules: expected a list of tables")
    try:
        return tuple(rule_from_table(t, f"{path}.rules[{i}]") for i, t in enumerate(tables))
    except RuleError as exc:
        raise ConfigError(str(exc)) from None


def _parse_models(items: Any, base_dir: Path) -> tuple[ModelBinding, ...]:
    if not isinstance(items, list):
        raise ConfigError("models: expected [[models]] tables")
    bindings: list[ModelBinding] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        path = f"models[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: expected a table")
        _reject_unknown(
            item,
            {"name", "modalities", "path", "enabled", "runtime", "rules", "one_series_per_study"},
            path,
        )
        name = _take(item, "name", str, path, None)
        if not name:
            raise ConfigError(f"{path}.name: required")
        modalities = _take(item, "modalities", list, path, None)
        if not modalities or not all(isinstance(m, str) and m.strip() for m in modalities):
            raise ConfigError(f"{path}.modalities: expected a non-empty list of modality codes")
        model_path = _take(item, "path", str, path, "")
        if model_path and not Path(model_path).is_absolute():
            model_path = str(base_dir / model_path)
        if model_path and not Path(model_path).exists():
            raise ConfigError(f"{path}.path: no model at {model_path}")
        enabled = _take(item, "enabled", bool, path, True)
        mods = tuple(m.strip().upper() for m in modalities)
        if enabled:
            for m in mods:
                if m in seen:
                    raise ConfigError(
                        f"{path}.modalities: {m} is already served by model {seen[m]!r}"
                    )
                seen[m] = name
        runtime = _take(item, "runtime", str, path, "onnx")
        if runtime not in RUNTIMES:
            raise ConfigError(
                f"{path}.runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}"
            )
        bindings.append(
            ModelBinding(
                name=name,
                modalities=mods,
                path=model_path,
                enabled=enabled,
                runtime=runtime,
                rules=_parse_rules(item, path),
                one_series_per_study=_take(item, "one_series_per_study", bool, path, "CT" in mods),
            )
        )
    return tuple(bindings)


def parse(data: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Build a :class:`Config` from a parsed TOML mapping."""
    base_dir = base_dir or Path.cwd()
    _reject_unknown(
        data,
        {"node", "peers", "worker", "delivery", "tls", "web", "audit", "models", "logging"},
        "",
    )
    for key in ("node", "worker", "delivery", "tls", "web", "audit", "logging"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{key}: expected a [{key}] table")
    peers = _parse_peers(data.get("peers", []))
    logging_table = data.get("logging", {})
    _reject_unknown(logging_table, {"level"}, "logging")
    level = _take(logging_table, "level", str, "logging", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"logging.level: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    config = Config(
        node=_parse_node(data.get("node", {}), base_dir),
        peers=peers,
        worker=_parse_worker(data.get("worker", {})),
        delivery=_parse_delivery(data.get("delivery", {}), peers),
        tls=_parse_tls(data.get("tls", {}), base_dir),
        web=_parse_web(data.get("web", {})),
        audit=_parse_audit(data.get("audit", {}), base_dir),
        models=_parse_models(data["models"], base_dir) if "models" in data else DEFAULT_MODELS,
        log_level=level,
    )
    if not config.node.accept_unknown_peers and not config.peers:
        raise ConfigError(
            "node.accept_unknown_peers: false, but no [[peers]] are listed, so nobody could connect"
        )
    web = config.web
    if web.enabled and not web.token and not is_loopback(web.host):
        raise ConfigError(
            f"web.host: {web.host!r} is not a loopback address; set web.token (every request "
            "must then carry it) or keep the web server on 127.0.0.1"
        )
    if config.tls.enabled and config.tls.port == config.node.port:
        raise ConfigError("tls.port: must differ from node.port")
    if config.peer(config.node.ae_title):
        raise ConfigError(
            f"peers: {config.node.ae_title!r} is this node's own AE title (node.ae_title)"
        )
    return config


def load(path: str | Path | None) -> Config:
    """Load the TOML file at *path*; ``None`` gives the built-in defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
