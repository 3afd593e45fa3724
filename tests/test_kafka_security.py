"""The project against a real broker that demands SASL (SCRAM-SHA-512) over TLS.

The broker (module scope) is the project's own Kafka 4.x from ``sitn/broker.py`` with a
:class:`~sitn.broker_security.SaslSslListener`: its only client listener is ``SASL_SSL`` (the controller
listener is ``PLAINTEXT`` on 127.0.0.1, brokers talk to each other over ``SASL_SSL``), the certificates are
made for the test with the JDK's ``keytool`` (a CA, the broker's keystore signed by it, a truststore, the CA
as PEM for the Python clients), and the SCRAM users are created when the storage is formatted.

- ``sitn run`` on the Kafka backend replays a slice of the shipped data through the secured broker and
  trains every event once; a standalone ``sitn serve`` replica fed by the secured updates topic reaches the
  run's last version and answers ``/recommend``. Everything is configured the way an operator does it:
  ``SITN_SECURITY_PROTOCOL``, ``SITN_SASL_*``, ``SITN_SSL_CAFILE``.
- A wrong password fails in seconds, naming authentication and the broker's reason: the login check
  (``stream/kafka_login.py``) and the ``sitn run`` / ``sitn serve`` commands that call it first.
- A plaintext client is refused: the port answers a plaintext Kafka request with a TLS alert and closes,
  and the project's producer cannot connect.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka.errors import InvalidReceiveError, KafkaTimeoutError

from sitn.broker import KafkaBroker, read_properties
from sitn.broker_security import SaslSslListener, ScramUser, make_tls_stores
from stream.errors import KafkaAuthenticationError
from stream.kafka_login import check_kafka_login
from stream.producer import make_kafka_producer
from stream.settings import StreamSettings
from tests.fixtures.kafka import free_ports, start_test_broker
from tests.fixtures.serving import replica_at_version

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
APP_USER = ScramUser("sitn-app", "sitn-app-Secret-1")
BROKER_USER = ScramUser("broker", "broker-Secret-1")
WRONG_PASSWORD = "not-the-Password-1"
N_EVENTS = 2000
RUN_TIMEOUT_S = 300.0
FAIL_FAST_S = 30.0  # a refused login, from process start to exit; the bare client would wait out 30 s of bootstrap


@pytest.fixture(scope="module")
def secured_broker(kafka_libs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    tls = make_tls_stores(tmp_path_factory.mktemp("tls"), "store-Pass-1")
    broker = start_test_broker(tmp_path_factory.mktemp("kafka-sasl-ssl"), SaslSslListener(tls, (BROKER_USER, APP_USER)))
    try:
        yield broker
    finally:
        broker.stop()


def security_env(broker: KafkaBroker, password: str = APP_USER.password) -> dict[str, str]:
    """The environment an operator sets for a secured cluster (and nothing else of the caller's SITN_*)."""
    assert broker.sasl_ssl is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITN_")}
    env.update(
        PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", COLUMNS="250", SITN_METRICS_DASHBOARD_PORT="0",
        SITN_SECURITY_PROTOCOL="SASL_SSL", SITN_SASL_MECHANISM="SCRAM-SHA-512",
        SITN_SASL_PLAIN_USERNAME=APP_USER.name, SITN_SASL_PLAIN_PASSWORD=password,
        SITN_SSL_CAFILE=str(broker.sasl_ssl.tls.ca_pem),
    )
    return env


def app_settings(broker: KafkaBroker, **overrides: Any) -> StreamSettings:
    assert broker.sasl_ssl is not None
    return StreamSettings(**{
        "kafka_bootstrap_servers": broker.bootstrap_servers, "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": APP_USER.name,
        "sasl_plain_password": APP_USER.password, "ssl_cafile": broker.sasl_ssl.tls.ca_pem, **overrides,
    })


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline_s:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def test_the_broker_listens_for_clients_on_sasl_ssl_only(secured_broker: KafkaBroker) -> None:
    props = read_properties(secured_broker.config_path.read_text())
    assert props["listeners"].split(",")[0] == f"SASL_SSL://{secured_broker.bootstrap_servers}"
    assert props["listener.security.protocol.map"] == "CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
    assert (props["inter.broker.listener.name"], props["sasl.enabled.mechanisms"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert "PLAINTEXT://" not in props["advertised.listeners"]
    assert secured_broker.status().bootstrap_servers == secured_broker.bootstrap_servers


def test_the_login_check_accepts_the_user_and_names_every_refusal(secured_broker: KafkaBroker) -> None:
    host, port = secured_broker.bootstrap_servers.split(":")
    assert check_kafka_login(app_settings(secured_broker)) == (
        f"user '{APP_USER.name}' logged in via SCRAM-SHA-512 (SASL_SSL at {host}:{port})")
    refusals: dict[str, tuple[dict[str, Any], str]] = {
        "wrong password": ({"sasl_plain_password": WRONG_PASSWORD},
                           f"Kafka authentication failed for user '{APP_USER.name}' (SCRAM-SHA-512) at {host}:{port}: "
                           "Authentication failed during authentication due to invalid credentials with SASL "
                           "mechanism SCRAM-SHA-512 (error code 58)"),
        "unknown user": ({"sasl_plain_username": "nobody"}, "Kafka authentication failed for user 'nobody'"),
        "mechanism not enabled": ({"sasl_mechanism": "SCRAM-SHA-256"}, "the broker enables ['SCRAM-SHA-512']"),
        "CA that did not sign the broker": ({"ssl_cafile": None}, f"Kafka TLS handshake with {host}:{port} failed: "
                                            "[SSL: CERTIFICATE_VERIFY_FAILED]"),
    }
    for what, (overrides, message) in refusals.items():
        started_s = time.monotonic()
        with pytest.raises(KafkaAuthenticationError) as refused:
            check_kafka_login(app_settings(secured_broker, **overrides))
        assert message in str(refused.value), what
        assert time.monotonic() - started_s < 5.0, what


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_wrong_password_stops_the_command_in_seconds_naming_authentication(
    secured_broker: KafkaBroker, events_csv: Path, tmp_path: Path, command: str
) -> None:
    argv = {
        "run": ["run", "--events", str(events_csv), "--limit", "100", "--run-dir", str(tmp_path / "run"), "--port", "0"],
        "serve": ["serve", "--port", str(free_ports(1)[0])],
    }[command]
    started_s = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sitn", *argv, "--kafka-bootstrap-servers", secured_broker.bootstrap_servers],
                          env=security_env(secured_broker, WRONG_PASSWORD), capture_output=True, text=True,
                          timeout=2 * FAIL_FAST_S, cwd=REPO)
    took_s = time.monotonic() - started_s
    assert done.returncode == 1, done.stderr[-3000:]
    assert (f"sitn {command}: Kafka authentication failed for user '{APP_USER.name}' (SCRAM-SHA-512) at "
            f"{secured_broker.bootstrap_servers}: Authentication failed during authentication due to invalid "
            "credentials") in done.stderr
    assert "Traceback" not in done.stderr
    assert WRONG_PASSWORD not in done.stderr + done.stdout
    assert took_s < FAIL_FAST_S, f"sitn {command} took {took_s:.1f}s to refuse a wrong password"


def test_a_plaintext_client_is_refused(secured_broker: KafkaBroker) -> None:
    from kafka.protocol.metadata.api_versions import ApiVersionsRequest
    from kafka.protocol.parser import KafkaProtocol

    # A plaintext Kafka request (ApiVersions, the first thing every client sends) gets a TLS alert and a close.
    wire = KafkaProtocol(client_id="sitn-plaintext-probe")
    wire.send_request(ApiVersionsRequest(version=0))
    host, port = secured_broker.bootstrap_servers.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.send_bytes())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer[:2] == b"\x15\x03" and answer[5] == 2, f"not a fatal TLS alert: {answer[:16]!r}"  # record type 21
    with pytest.raises(InvalidReceiveError):  # not a Kafka response: the alert read as a frame is 352 MB long
        wire.receive_bytes(answer)

    # The project's producer, configured for PLAINTEXT, never gets a connection: bootstrap fails and the broker
    # logs the failed handshakes.
    log_before = secured_broker.log_path.read_text().count("(SSL handshake failed)")
    plaintext = StreamSettings(kafka_bootstrap_servers=secured_broker.bootstrap_servers)
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        make_kafka_producer(plaintext, bootstrap_timeout_ms=3000)
    assert secured_broker.log_path.read_text().count("(SSL handshake failed)") > log_before


def test_the_pipeline_trains_every_event_and_a_standalone_replica_serves_through_sasl_ssl(
    secured_broker: KafkaBroker, events_csv: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    run_dir = tmp_path / "run"
    env = security_env(secured_broker)
    argv = [sys.executable, "-m", "sitn", "run", "--events", str(events_csv), "--limit", str(N_EVENTS),
            "--kafka-bootstrap-servers", secured_broker.bootstrap_servers, "--max", "--exit-after-replay",
            "--run-dir", str(run_dir), "--port", "0", "--consumers", "2", "--partitions", "2", "--batch-size", "64",
            "--learner-dim", "16", "--learner-max-len", "10", "--checkpoint-every-steps", "10"]
    started_s = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    run_s = time.monotonic() - started_s
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"user '{APP_USER.name}' logged in via SCRAM-SHA-512" in done.stderr
    assert (summary["ok"], summary["problems"]) == (True, [])
    # Every event produced, consumed and trained once, all through the secured listener.
    assert (summary["events_replayed"], summary["records_consumed"], summary["events_trained"],
            summary["dead_letters"]) == (N_EVENTS, N_EVENTS, N_EVENTS, 0)
    (last_version,) = {replica["served_version"] for replica in summary["serving_replicas"]}
    assert last_version > 0

    # A standalone replica reads the secured updates topic from the beginning up to the run's last version.
    (port,) = free_ports(1)
    serve_argv = [sys.executable, "-m", "sitn", "serve", "--port", str(port), "--dim", "16", "--index-factory", "Flat",
                  "--kafka-bootstrap-servers", secured_broker.bootstrap_servers]
    log_path = tmp_path / "replica.log"
    with log_path.open("w") as log_file:
        replica = subprocess.Popen(serve_argv, env={**env, "SITN_SERVING_INDEX_SEARCH_PARAMS": "{}"}, stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    started_s = time.monotonic()
    try:
        wait_for(replica_at_version(replica, url, last_version, log_path), 120,
                 f"the replica to apply version {last_version}")
        catch_up_s = time.monotonic() - started_s
        with events_csv.open(encoding="utf-8") as f:
            header = f.readline().strip().split(",")
            user_id = f.readline().strip().split(",")[header.index("user_id")]
        answer = httpx.get(f"{url}/recommend", params={"user_id": user_id, "k": 10}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["user_id"], body["index"]["version"], len(body["items"])) == (user_id, last_version, 10)
        assert f"user '{APP_USER.name}' logged in via SCRAM-SHA-512" in log_path.read_text()
    finally:
        replica.terminate()
        replica.wait(30)
    record_property("sasl_ssl_run_s", round(run_s, 1))
    record_property("sasl_ssl_events_per_s", round(summary["events_per_s"], 1))
    record_property("sasl_ssl_replica_catch_up_s", round(catch_up_s, 1))
