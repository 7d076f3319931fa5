"""SASL/SSL settings reach every Kafka client livectr creates; secrets are never written or printed.

The embedded broker (tansu 0.6) cannot complete a SASL handshake here: its SCRAM users must be
created through an authenticated connection to a broker with persistent storage, and without
``--authentication`` it refuses every mechanism. So the real clients are shown to *negotiate*
SASL with it (librdkafka's own log of the handshake), and the settings themselves are checked on
the property dicts the factories build.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from pathlib import Path

import pytest
from runs import REPO, livectr_run

from livectr.cli import main
from livectr.core import bus
from livectr.core.config import (
    REDACTED,
    Config,
    ConfigError,
    KafkaConfig,
    from_dict,
    from_env,
    is_secret_option,
    parse_options,
    to_dict,
)

PASSWORD = "hunter2-sasl"
KEY_PASSWORD = "hunter2-key"


def secured(bootstrap: str = "broker:9093") -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password=PASSWORD,
        ssl_ca_location="/etc/ssl/kafka-ca.pem",
        extra=f"ssl.key.password={KEY_PASSWORD}, ssl.cipher.suites=ECDHE-RSA-AES128-GCM-SHA256,AES256-SHA",
    )


EXPECTED = {
    "bootstrap.servers": "broker:9093",
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "alice",
    "sasl.password": PASSWORD,
    "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
    "ssl.key.password": KEY_PASSWORD,
    "ssl.cipher.suites": "ECDHE-RSA-AES128-GCM-SHA256,AES256-SHA",
}


def test_every_client_factory_gets_the_security_settings() -> None:
    kafka = secured()
    built = {
        "producer": bus.producer_config(kafka),
        "consumer (assign)": bus.consumer_config(kafka),
        "consumer (group)": bus.consumer_config(kafka, "livectr-join"),
        "admin": bus.admin_config(kafka),
    }
    for name, props in built.items():
        assert {k: props.get(k) for k in EXPECTED} == EXPECTED, name


def test_no_module_builds_a_kafka_client_outside_the_factories() -> None:
    """Every client goes through livectr.core.bus, so every client gets the settings."""
    clients = {"Producer", "Consumer", "AdminClient", "KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}
    allowed = {
        Path("livectr/core/bus.py"),
        Path("livectr/core/broker.py"),  # the embedded broker's readiness probe of its own tansu
    }
    offenders = []
    for package in ("livectr", "streams", "learner", "semantic_cache", "simulators"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name in clients and rel not in allowed:
                        offenders.append(f"{rel}:{node.lineno} {name}(...)")
    assert not offenders, offenders


def test_options_parse_with_commas_in_values_and_refuse_junk() -> None:
    assert parse_options("a.b=1, c=x,y,z ,d.e = 2") == {"a.b": "1", "c": "x,y,z", "d.e": "2"}
    assert parse_options("") == {}
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_options("=nokey")
    assert all(
        is_secret_option(k)
        for k in ("sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret")
    )
    assert not any(is_secret_option(k) for k in ("sasl.username", "security.protocol", "ssl.ca.location"))


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.integration
def test_real_clients_negotiate_sasl_with_the_broker(kafka_config: Config) -> None:
    """Producer, consumer and admin client built by the factories open SASL_PLAINTEXT connections
    and start a SCRAM-SHA-512 handshake with the embedded broker (which then refuses it)."""
    kafka = kafka_config.kafka
    kafka.security_protocol, kafka.sasl_mechanism = "SASL_PLAINTEXT", "SCRAM-SHA-512"
    kafka.sasl_username, kafka.sasl_password = "alice", PASSWORD
    for name in ("producer", "consumer", "admin"):
        capture = _Capture()
        logger = logging.getLogger(f"test.kafka-security.{name}")
        logger.propagate = False
        logger.addHandler(capture)
        deadline = time.monotonic() + 10
        if name == "producer":
            client = bus.producer(kafka, logger=logger)
            while not capture.lines and time.monotonic() < deadline:
                client.poll(0.2)
        elif name == "consumer":
            consumer = bus.consumer(kafka, logger=logger)
            while not capture.lines and time.monotonic() < deadline:
                consumer.poll(0.2)
            consumer.close()
        else:
            admin = bus.admin(kafka, logger=logger)
            while not capture.lines and time.monotonic() < deadline:
                with pytest.raises(Exception):  # noqa: B017 - no metadata without authentication
                    admin.list_topics(timeout=0.5)
                admin.poll(0.1)
        assert any("sasl_plaintext://" in line and "SASL SCRAM-SHA-512" in line for line in capture.lines), (
            name,
            capture.lines[:3],
        )
        assert not any(PASSWORD in line for line in capture.lines)
    with pytest.raises(bus.BrokerUnreachable):
        bus.check_reachable(kafka, timeout_s=2.0)


def test_secrets_are_redacted_in_the_dict_repr_and_config_file_and_come_back_from_the_env() -> None:
    cfg = Config()
    cfg.kafka = secured()
    text = json.dumps(to_dict(cfg))
    assert PASSWORD not in text and KEY_PASSWORD not in text
    assert PASSWORD not in repr(cfg) and KEY_PASSWORD not in repr(cfg) and PASSWORD not in str(cfg.kafka)
    assert to_dict(cfg)["kafka"]["sasl_password"] == REDACTED
    assert parse_options(to_dict(cfg)["kafka"]["extra"])["ssl.key.password"] == REDACTED
    assert cfg.kafka.client_properties()["sasl.password"] == PASSWORD  # the object itself keeps them

    # A child stage reads the file and takes the secrets from the environment it inherited.
    env = {
        "LIVECTR_KAFKA__SASL_PASSWORD": PASSWORD,
        "LIVECTR_KAFKA__EXTRA": f"ssl.key.password={KEY_PASSWORD}",
    }
    child = from_dict(json.loads(text), environ=env)
    assert {k: child.kafka.client_properties().get(k) for k in EXPECTED} == EXPECTED
    with pytest.raises(ConfigError, match="LIVECTR_KAFKA__SASL_PASSWORD"):
        from_dict(json.loads(text), environ={})
    with pytest.raises(ConfigError, match="ssl.key.password"):
        from_dict(json.loads(text), environ={"LIVECTR_KAFKA__SASL_PASSWORD": PASSWORD})
    # Without secrets nothing needs the environment.
    assert from_dict(to_dict(Config()), environ={}) == Config()


def test_security_settings_come_from_the_env() -> None:
    cfg = from_env(
        {
            "LIVECTR_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "LIVECTR_KAFKA__SASL_MECHANISM": "PLAIN",
            "LIVECTR_KAFKA__SASL_USERNAME": "bob",
            "LIVECTR_KAFKA__SASL_PASSWORD": PASSWORD,
            "LIVECTR_KAFKA__SSL_CA_LOCATION": "/ca.pem",
            "LIVECTR_STOP_GRACE_S": "3",  # someone else's variable: ignored, not an error
        }
    )
    assert cfg.kafka.security_properties() == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "bob",
        "sasl.password": PASSWORD,
        "ssl.ca.location": "/ca.pem",
    }


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_cli_refuses_secrets_on_the_command_line_and_bad_options_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["topics", "--bootstrap-servers", "127.0.0.1:1"]
    code, out = _cli([*base, "--kafka-option", f"sasl.password={PASSWORD}"], capsys)
    assert code == 2 and "process list" in out and "LIVECTR_KAFKA__SASL_PASSWORD" in out and PASSWORD not in out
    assert len(out.strip().splitlines()) == 1

    code, out = _cli([*base, "--kafka-option", "no.such.property=1"], capsys)
    assert code == 2 and "No such configuration property" in out and len(out.strip().splitlines()) == 1

    code, out = _cli([*base, "--security-protocol", "TLS"], capsys)
    assert code == 2 and 'Invalid value "TLS"' in out and len(out.strip().splitlines()) == 1

    code, out = _cli([*base, "--kafka-option", "justakey"], capsys)
    assert code == 2 and "KEY=VALUE" in out


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_passes_secrets_to_its_stages_without_writing_them(
    kafka_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``livectr run`` with secrets in the environment: every stage gets them (a stage without them
    would fail on the redacted config file), and no file of the run holds them."""
    cfg = kafka_config
    cfg.data_dir = tmp_path / "data"
    # Settings the plaintext embedded broker tolerates: a password unused without SASL, and a
    # key password unused without a client certificate.
    monkeypatch.setenv("LIVECTR_KAFKA__SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("LIVECTR_KAFKA__EXTRA", f"ssl.key.password={KEY_PASSWORD}")
    summary = livectr_run(
        cfg, tmp_path / "summary.json", "--events", "3000", "--semantics", "off", "--kafka-option", "client.id=sec-test"
    )
    assert summary["ok"] and summary["examples_trained"] > 0
    config = json.loads((cfg.data_dir / "run" / "config.json").read_text())
    assert config["kafka"]["sasl_password"] == REDACTED
    assert parse_options(config["kafka"]["extra"]) == {"ssl.key.password": REDACTED, "client.id": "sec-test"}
    for path in [tmp_path / "summary.json", *cfg.data_dir.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and KEY_PASSWORD.encode() not in data, path
