"""Security: secrets never reach the log, Kafka clients get the security settings, Ray listens on loopback.

What binds where, what the project sets and what an operator must do is written down in
docs/security.md. Covered elsewhere, not repeated here: the admin routes need the bearer token
(tests/test_api.py::test_admin_needs_the_bearer_token and ::test_admin_is_disabled_without_a_configured_token;
tests/test_fuzz_http.py fuzzes the tokens) and ``kafka_client_kwargs`` maps every security option
(the doctests of stream/settings.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import ValidationError

from serving.settings import ServingSettings
from sitn.cli import build_parser
from stream.kafka_source import kafka_consumer_config
from stream.settings import StreamSettings

SASL_PASSWORD = "sasl-secret-Pa55word"
SSL_PASSWORD = "ssl-key-secret-Pa55"
ADMIN_TOKEN = "admin-secret-token-0123456789"
SECRETS = (SASL_PASSWORD, SSL_PASSWORD, ADMIN_TOKEN)


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every secret the project knows, set the way an operator sets them: in the environment."""
    for name, value in {
        "SITN_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # never contacted: the pipeline is stubbed out
        "SITN_SECURITY_PROTOCOL": "SASL_SSL",
        "SITN_SASL_MECHANISM": "SCRAM-SHA-512",
        "SITN_SASL_PLAIN_USERNAME": "sitn-app",
        "SITN_SASL_PLAIN_PASSWORD": SASL_PASSWORD,
        "SITN_SSL_PASSWORD": SSL_PASSWORD,
        "SITN_SERVING_ADMIN_TOKEN": ADMIN_TOKEN,
    }.items():
        monkeypatch.setenv(name, value)
    # The commands check the Kafka login first (stream/kafka_login.py); tests/test_kafka_security.py runs it
    # against a real SASL_SSL broker. Here it only records that the secrets reached it.
    monkeypatch.setattr("stream.kafka_login.check_kafka_login", LOGINS_CHECKED.append)
    LOGINS_CHECKED.clear()


LOGINS_CHECKED: list[Any] = []


def test_sitn_run_logs_every_settings_object_with_the_secrets_hidden(
    secret_environment: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    import sitn.commands.run as run_command

    started: dict[str, Any] = {}

    def pipeline(
        run: Any, stream: Any, serving: Any, config: Any, run_dir: Path, telemetry: Any = None, drift: Any = None
    ) -> int:
        started.update(stream=stream, serving=serving)
        return 0

    monkeypatch.setattr(run_command, "run_pipeline", pipeline)
    args = build_parser().parse_args(["run", "--run-dir", str(tmp_path)])
    with caplog.at_level(logging.INFO, logger="sitn.commands.run"):
        assert args.func(args) == 0

    dump = "\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("settings "))
    for name in ("run", "stream", "serving", "telemetry", "learner"):
        assert f"settings {name}=" in dump, name
    for key in ("sasl_plain_password=SecretStr('**********')", "ssl_password=SecretStr('**********')",
                "admin_token=SecretStr('**********')", "sasl_plain_username='sitn-app'"):  # fmt: skip
        assert key in dump, key
    for secret in SECRETS:
        assert secret not in caplog.text
    # The secrets did arrive: hidden in the log, not lost.
    assert started["stream"].sasl_plain_password.get_secret_value() == SASL_PASSWORD
    assert started["serving"].admin_token.get_secret_value() == ADMIN_TOKEN
    assert [s.sasl_plain_password.get_secret_value() for s in LOGINS_CHECKED] == [SASL_PASSWORD]


def test_sitn_serve_logs_its_settings_with_the_token_hidden(
    secret_environment: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from serving.update_consumer import UpdateConsumer

    class Stop(Exception):
        pass

    def connect(*_: object, **__: object) -> None:
        raise Stop  # the settings were logged before the first connection

    monkeypatch.setattr(UpdateConsumer, "connect", connect)
    args = build_parser().parse_args(["serve", "--port", "0"])
    with caplog.at_level(logging.INFO, logger="sitn.commands.serve"), pytest.raises(Stop):
        args.func(args)
    assert "settings serving=" in caplog.text
    assert "admin_token=SecretStr('**********')" in caplog.text
    assert ADMIN_TOKEN not in caplog.text
    assert [(s.security_protocol, s.sasl_plain_username) for s in LOGINS_CHECKED] == [("SASL_SSL", "sitn-app")]


@pytest.mark.parametrize(
    ("build", "secret", "message"),
    [
        (
            lambda: ServingSettings(admin_token="short-secret"),
            "short-secret",
            "admin_token must have at least 16",
        ),
        (
            lambda: StreamSettings(security_protocol="SASL_PLAINTEXT", sasl_plain_password=SASL_PASSWORD),
            SASL_PASSWORD,
            "security_protocol=SASL_PLAINTEXT needs sasl_mechanism",
        ),
        (
            lambda: StreamSettings(sasl_mechanism="PLAIN", sasl_plain_password=SASL_PASSWORD, partitions=0),
            SASL_PASSWORD,
            "partitions",
        ),
    ],
)
def test_a_rejected_setting_does_not_echo_a_secret(build: Any, secret: str, message: str) -> None:
    """pydantic puts the input into its errors (a model check: the whole input); these settings hide it."""
    with pytest.raises(ValidationError) as err:
        build()
    assert message in str(err.value)
    assert secret not in str(err.value) and secret not in repr(err.value)  # what a log or a traceback shows


def test_kafka_consumers_get_the_security_settings() -> None:
    settings = StreamSettings(
        kafka_bootstrap_servers="broker:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_plain_username="app",
        sasl_plain_password=SASL_PASSWORD,
        ssl_cafile=Path("/etc/kafka/ca.pem"),
        ssl_certfile=Path("/etc/kafka/client.pem"),
        ssl_keyfile=Path("/etc/kafka/client.key"),
        ssl_password=SSL_PASSWORD,
        ssl_check_hostname=False,
    )
    config = kafka_consumer_config(settings, "g")
    assert {k: config[k] for k in config if k.startswith(("security", "sasl", "ssl"))} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "app",
        "sasl_plain_password": SASL_PASSWORD,  # the client needs the value itself
        "ssl_cafile": "/etc/kafka/ca.pem",
        "ssl_certfile": "/etc/kafka/client.pem",
        "ssl_keyfile": "/etc/kafka/client.key",
        "ssl_password": SSL_PASSWORD,
        "ssl_check_hostname": False,
    }
    assert SASL_PASSWORD not in repr(settings) and SSL_PASSWORD not in str(settings)


def test_network_services_bind_loopback_by_default() -> None:
    from stream.exporter import TelemetrySettings

    assert ServingSettings().host == "127.0.0.1"
    telemetry = TelemetrySettings(**{})
    assert (telemetry.host, telemetry.dashboard_host) == ("127.0.0.1", "127.0.0.1")


# --- Ray ---------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, how a dual-stack socket shows 127.0.0.1
    return address.is_loopback


def _routable_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: any non-local address picks the default route
        except OSError:
            return None
        host = str(probe.getsockname()[0])
    return None if _is_loopback(host) else host


@pytest.mark.ray
def test_the_local_ray_cluster_listens_on_loopback_only(ray_cluster: dict[str, Any]) -> None:
    """Every listening TCP socket of the cluster this session started (the driver -- this process -- the
    GCS, the raylet, the agents and the workers, all descendants of this process) is on loopback."""
    import ray

    @ray.remote
    def worker_pid() -> int:
        return os.getpid()

    worker = ray.get(worker_pid.remote(), timeout=60)  # a worker is running while the sockets are read
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    assert worker in {p.pid for p in processes}
    listening: list[tuple[str, str, int]] = []
    for process in processes:
        try:
            name = process.name()
            listening += [(name, c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]  # fmt: skip
        except psutil.NoSuchProcess:
            continue
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert [entry for entry in listening if not _is_loopback(entry[1])] == []
    assert str(ray_cluster["node_ip_address"]) == "127.0.0.1"

    routable = _routable_address()
    if routable is not None:  # the GCS is not reachable on the machine's own network address
        gcs_port = int(str(ray_cluster["gcs_address"]).rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError), socket.create_connection((routable, gcs_port), timeout=5):
            pass
