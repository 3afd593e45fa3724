"""Check the configured Kafka login before anything starts: one TLS handshake and one SASL exchange.

Why the entry points (``sitn run``, ``sitn serve``, ``sitn replay``) call :func:`check_kafka_login` first:
kafka-python 3.0.12, the pinned client, does not report a refused login. Kafka answers the last
``SaslAuthenticate`` request with error 58 and its reason ("Authentication failed during authentication due
to invalid credentials with SASL mechanism SCRAM-SHA-512") and closes the connection at once; the client's
transport reads the response and the close in one go and drops the response, so every client retries its
bootstrap until its timeout (30 s) and raises ``KafkaTimeoutError('Unable to bootstrap from ...')``, a
plaintext client against a TLS listener the same. Measured against the secured test broker of
``tests/test_kafka_security.py``. This check drives kafka-python's own request codecs and SASL mechanism
over one blocking socket, so a wrong password, an unknown user, a mechanism the broker does not enable or a
certificate the CA file does not vouch for fails in well under a second, with the broker's reason.

It checks the login only, not what the user may do (there is no authorizer on the test broker).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

from stream.errors import BrokerError, KafkaAuthenticationError
from stream.settings import StreamSettings, kafka_client_kwargs

logger = logging.getLogger(__name__)

_SASL_HANDSHAKE_VERSION = 1  # v1: the exchange that follows is framed in SaslAuthenticate requests
_SASL_AUTHENTICATE_VERSION = 2  # Kafka 1.0+ (v0), 2.2+ (v1), 2.8+ (v2)
_MAX_SASL_ROUNDS = 10  # SCRAM needs 2, PLAIN 1: a guard against a mechanism that never finishes


def check_kafka_login(settings: StreamSettings, timeout_s: float = 10.0) -> str:
    """Log in to the first bootstrap server that takes a connection, as the clients will; return what succeeded.

    A ``PLAINTEXT`` configuration has nothing to check and returns at once. Raises
    :class:`KafkaAuthenticationError` when the TLS handshake or the SASL login is refused (the message names
    the server, the user, the mechanism and the broker's reason), :class:`BrokerError` when no bootstrap
    server takes a TCP connection within ``timeout_s``.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return "PLAINTEXT: no login to check"
    started_s = time.monotonic()
    deadline_s = started_s + timeout_s
    options = kafka_client_kwargs(settings)
    refused: list[str] = []
    for server in options["bootstrap_servers"].split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            raw = socket.create_connection((host, int(port)), timeout=max(0.1, deadline_s - time.monotonic()))
        except OSError as exc:
            refused.append(f"{host}:{port} ({exc})")
            continue
        with raw:
            raw.settimeout(max(0.1, deadline_s - time.monotonic()))
            sock = _tls_handshake(raw, host, port, settings) if protocol in ("SSL", "SASL_SSL") else raw
            done = f"{protocol} at {host}:{port}"
            if protocol.startswith("SASL"):
                done = f"user {settings.sasl_plain_username!r} logged in via {settings.sasl_mechanism} ({done})"
                _sasl_login(sock, host, port, options)
        logger.info("kafka login checked %s check_s=%.2f", done, time.monotonic() - started_s)
        return done
    raise BrokerError(f"no Kafka bootstrap server took a connection within {timeout_s:.0f}s: {'; '.join(refused)}")


def _tls_handshake(raw: socket.socket, host: str, port: str, settings: StreamSettings) -> ssl.SSLSocket:
    """The TLS context kafka-python builds from the same settings: the CA file (else the system's), the host
    name checked unless ``ssl_check_hostname`` is off, a client certificate when one is configured."""
    context = ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile is not None:
        password = settings.ssl_password.get_secret_value() if settings.ssl_password is not None else None
        context.load_cert_chain(str(settings.ssl_certfile), str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
                                password)
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except ssl.SSLError as exc:  # CertificateError is a subclass: a host name the certificate does not name
        raise KafkaAuthenticationError(
            f"Kafka TLS handshake with {host}:{port} failed: {exc}. Operator action: check that "
            f"SITN_SSL_CAFILE ({settings.ssl_cafile}) holds the CA that signed the broker's certificate and that "
            f"the certificate names {host}"
        ) from exc


def _sasl_login(sock: socket.socket, host: str, port: str, options: dict[str, Any]) -> None:
    """SaslHandshake, then SaslAuthenticate rounds until the mechanism is done; a non-zero error code raises."""
    from kafka.net.sasl import get_sasl_mechanism
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

    wire = KafkaProtocol(client_id="sitn-login-check")
    name, user = options["sasl_mechanism"], options.get("sasl_plain_username")
    who = f"user {user!r} ({name}) at {host}:{port}"
    handshake = _exchange(sock, wire, SaslHandshakeRequest(mechanism=name, version=_SASL_HANDSHAKE_VERSION), who)
    if handshake.error_code != 0 or name not in handshake.mechanisms:
        raise KafkaAuthenticationError(
            f"Kafka authentication failed for {who}: the broker enables {list(handshake.mechanisms)} "
            f"(error code {handshake.error_code}). Operator action: set SITN_SASL_MECHANISM to one of them"
        )
    mechanism = get_sasl_mechanism(name)(host=host, **options)
    for _ in range(_MAX_SASL_ROUNDS):
        if mechanism.is_done():
            break
        request = SaslAuthenticateRequest(auth_bytes=mechanism.auth_bytes(), version=_SASL_AUTHENTICATE_VERSION)
        response = _exchange(sock, wire, request, who)
        if response.error_code != 0:
            raise KafkaAuthenticationError(
                f"Kafka authentication failed for {who}: {response.error_message} (error code "
                f"{response.error_code}). Operator action: check SITN_SASL_PLAIN_USERNAME and SITN_SASL_PLAIN_PASSWORD"
            )
        mechanism.receive(response.auth_bytes)
    if not mechanism.is_authenticated():
        raise KafkaAuthenticationError(f"Kafka authentication did not complete for {who} in {_MAX_SASL_ROUNDS} rounds")


def _exchange(sock: socket.socket, wire: Any, request: Any, who: str) -> Any:
    """Send one request and read until its response is decoded (the socket's timeout bounds every read)."""
    wire.send_request(request)
    sock.sendall(wire.send_bytes())
    while True:
        try:
            data = sock.recv(65536)
        except (TimeoutError, OSError) as exc:
            raise KafkaAuthenticationError(f"Kafka authentication for {who}: no answer to {type(request).__name__} ({exc!r})") from exc
        if not data:
            raise KafkaAuthenticationError(
                f"Kafka authentication failed for {who}: the broker closed the connection during {type(request).__name__}"
            )
        responses = wire.receive_bytes(data)
        if responses:
            return responses[0][1]
