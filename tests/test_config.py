"""Config: defaults, the documented example, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ai.selection import DEFAULT_RULES
from pacs_node.config import Config, load
from pacs_node.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_defaults():
    config = load(None)
    assert config == Config()
    assert (config.node.ae_title, config.node.port, config.node.host) == (
        "AINODE",
        11112,
        "127.0.0.1",
    )
    assert config.node.resolved_database_url.startswith("sqlite:///")
    assert config.node.resolved_database_url.endswith("var/node.sqlite3")
    assert config.model_for("CR").name == "cxr" and config.model_for("CT").name == "ct"
    assert config.model_for("MR") is None


def test_documented_example_loads_with_every_key():
    config = load(ROOT / "config.toml")
    assert config.node.accept_unknown_peers is False
    assert config.peers[0].ae_title == "ORTHANC" and config.peers[0].send_results
    assert config.node.storage_dir == ROOT / "var"
    assert config.worker.ct_quiet_period_s == 5
    assert [m.name for m in config.models] == ["cxr", "ct"]
    assert config.peers[0].ask_completeness and config.worker.completeness_wait_s == 600
    # the rules written out in config.toml are the built-in defaults (the file documents them)
    cxr, ct = config.models
    assert ct.rules == DEFAULT_RULES and cxr.rules == DEFAULT_RULES
    assert ct.one_series_per_study and not cxr.one_series_per_study
    assert load(None).models == config.models
    assert config.web == load(None).web  # [web] as written is the built-in default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nport = 70000\n", "node.port: expected a TCP port"),
        ("[node]\nport = true\n", "node.port"),
        ('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', "node.ae_title: AE title must be"),
        ("[node]\nbogus = 1\n", "node.bogus: unknown key"),
        ('[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\n', "peers[0].port: required"),
        (
            '[[peers]]\nae_title = "A"\nhost = "h"\nport = 1\n[[peers]]\nae_title = "A"\n'
            'host = "h"\nport = 2\n',
            "peers[1].ae_title: 'A' is listed twice",
        ),
        ("[worker]\nmax_attempts = 0\n", "worker.max_attempts: must be at least 1"),
        ("[worker]\nprocesses = 0\n", "worker.processes: must be 1 to 64"),
        ("[worker]\nnice = 20\n", "worker.nice: must be 0 to 19"),
        ('[worker]\nmodality_priority = { CR = "high" }\n', "worker.modality_priority.CR"),
        ("[node]\nreceive_processes = 2\nport = 0\n", "node.receive_processes"),
        ('[worker]\nct_quiet_period_s = "five"\n', "worker.ct_quiet_period_s: expected a number"),
        ('[delivery]\nalso_send_to = ["NOBODY"]\n', "delivery.also_send_to[0]: 'NOBODY' is not"),
        (
            '[[models]]\nname = "x"\nmodalities = ["CR"]\npath = "/nonexistent"\n',
            "models[0].path: no model at /nonexistent",
        ),
        ("[node]\naccept_unknown_peers = false\n", "node.accept_unknown_peers: false, but no"),
        ('[node]\ndatabase_url = "not a url"\n', "node.database_url"),
        ("node = [\n", "not valid TOML"),
        ("[tls]\nenabled = true\n", "tls.cert_file: required when tls.enabled is true"),
        ('[tls]\nenabled = true\ncert_file = "absent.pem"\n', "tls.cert_file: no such file"),
        ("[node]\nmin_free_mb = -1\n", "node.min_free_mb: must be at least 0"),
        ('[web]\nhost = "0.0.0.0"\n', "web.host: '0.0.0.0' is not a loopback address; set web"),
        ('[web]\ntoken = "short"\n', "web.token: at least 16 characters"),
        ("[web]\nport = -1\n", "web.port: expected a TCP port"),
        ("[web]\nlisten = 1\n", "web.listen: unknown key"),
        (
            '[[peers]]\nae_title = "A"\nhost = "h"\nport = 1\ncheck_host = "yes"\n',
            "peers[0].check_host: expected true or false",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "absent.toml")


def test_priority_lanes_add_the_peers_priority_to_the_modalitys(tmp_path):
    from pacs_node.assembly import job_schedule

    config_file = tmp_path / "node.toml"
    config_file.write_text(
        '[[peers]]\nae_title = "ER"\nhost = "127.0.0.1"\nport = 104\npriority = 50\n'
        '[[peers]]\nae_title = "ARCHIVE"\nhost = "127.0.0.1"\nport = 105\npriority = -5\n'
        "[worker]\nmodality_priority = { CT = 3, dx = 12 }\ndeadline_s = 90\n"
    )
    config = load(config_file)
    assert job_schedule(config, "CT", "ER").priority == 53
    assert job_schedule(config, "DX", "ARCHIVE").priority == 7
    assert job_schedule(config, "CR", "SOMEONE").priority == 0  # not listed: 0
    assert job_schedule(config, "CT", "").deadline_s == 90
    defaults = Config()
    assert job_schedule(defaults, "CR", "").priority > job_schedule(defaults, "CT", "").priority
