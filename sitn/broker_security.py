"""A local broker's client listener secured with SASL over TLS: SCRAM users and the TLS stores it serves with.

:class:`SaslSslListener` is what :class:`sitn.broker.KafkaBroker` takes to listen for clients on
``SASL_SSL`` instead of ``PLAINTEXT``. In KRaft the SCRAM credentials live in the cluster metadata, so
they are created when the storage is formatted (``kafka-storage format --add-scram``), not with
``kafka-configs`` on a running broker. The controller listener stays ``PLAINTEXT`` on 127.0.0.1 (a
process on this machine only); inter-broker traffic uses the ``SASL_SSL`` listener itself, as the first
user (the broker's own), so a cluster's replication is authenticated and encrypted like any client.

There is no authorizer: every authenticated user may do everything. This is authentication and
encryption on the wire, not access control.

:func:`make_tls_stores` makes the certificates with the JDK's ``keytool`` (no download): a CA, the
broker's key pair with a certificate signed by it (subject alternative names ``localhost`` and
``127.0.0.1``, so clients can check the host name), the truststore holding the CA, and the CA
certificate as PEM for Python clients (``ssl_cafile``). They are for tests and local development;
production brokers bring their own.

>>> tls = TlsStores(Path("/s/broker.p12"), Path("/s/truststore.p12"), Path("/s/ca.pem"), "pw")
>>> listener = SaslSslListener(tls, (ScramUser("broker", "b-secret"), ScramUser("app", "a-secret")))
>>> listener.format_args()  # doctest: +NORMALIZE_WHITESPACE
['--add-scram', 'SCRAM-SHA-512=[name=broker,password=b-secret]',
 '--add-scram', 'SCRAM-SHA-512=[name=app,password=a-secret]']
>>> listener.client_kwargs("app")["sasl_plain_username"], "a-secret" in repr(listener)
('app', False)
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.errors import BrokerError

logger = logging.getLogger(__name__)

LISTENER_NAME = "SASL_SSL"
"""The client listener's name in ``server.properties``, the same as its security protocol."""
MECHANISM = "SCRAM-SHA-512"
_SCRAM_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A password goes into --add-scram's [name=..,password=..] and into a JAAS line in double quotes.
_SCRAM_PASSWORD = re.compile(r"^[A-Za-z0-9._~+-]{8,128}$")
_KEYTOOL_TIMEOUT_S = 120


@dataclass(frozen=True)
class ScramUser:
    """A SCRAM-SHA-512 user created at format time. Names and passwords are restricted to characters that
    need no quoting in ``--add-scram`` and the JAAS line (passwords: 8-128 of ``[A-Za-z0-9._~+-]``)."""

    name: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not _SCRAM_NAME.match(self.name):
            raise ValueError(f"a SCRAM user name must be 1-64 characters of [A-Za-z0-9._-], got {self.name!r}")
        if not _SCRAM_PASSWORD.match(self.password):
            raise ValueError(
                f"the password of SCRAM user {self.name!r} must be 8-128 characters of [A-Za-z0-9._~+-] "
                f"(got {len(self.password)} characters)"
            )


@dataclass(frozen=True)
class TlsStores:
    """The broker's keystore and truststore (PKCS12, both under ``password``) and the CA certificate (PEM)
    that clients verify the broker with."""

    keystore: Path
    truststore: Path
    ca_pem: Path
    password: str = field(repr=False)


@dataclass(frozen=True)
class SaslSslListener:
    """The client listener of a broker that demands SCRAM-SHA-512 over TLS.

    ``users[0]`` is the broker's own user: inter-broker connections and the broker's readiness probe
    authenticate as it. Clients need no certificate of their own (``ssl.client.auth=none``).
    """

    tls: TlsStores
    users: tuple[ScramUser, ...]

    def __post_init__(self) -> None:
        if not self.users:
            raise ValueError("a SASL_SSL listener needs at least one SCRAM user (the first is the broker's own)")
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            raise ValueError(f"SCRAM user names must be distinct, got {names}")

    def server_properties(self) -> dict[str, str]:
        """The listener's SASL and TLS settings for ``server.properties`` (listeners themselves: the caller's)."""
        broker = self.users[0]
        jaas = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{broker.name}" password="{broker.password}";'
        return {
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.{LISTENER_NAME.lower()}.{MECHANISM.lower()}.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.tls.keystore),
            "ssl.keystore.password": self.tls.password,
            "ssl.truststore.type": "PKCS12",
            "ssl.truststore.location": str(self.tls.truststore),
            "ssl.truststore.password": self.tls.password,
            "ssl.client.auth": "none",
            # Brokers check each other's host name against the certificate, as clients do.
            "ssl.endpoint.identification.algorithm": "https",
        }

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments that create every user's SCRAM credential in the metadata."""
        return [arg for user in self.users for arg in ("--add-scram", f"{MECHANISM}=[name={user.name},password={user.password}]")]

    def client_kwargs(self, user_name: str | None = None) -> dict[str, Any]:
        """kafka-python connection settings for ``user_name`` (default: the broker's own user)."""
        user = self.user(user_name) if user_name is not None else self.users[0]
        return {
            "security_protocol": LISTENER_NAME,
            "sasl_mechanism": MECHANISM,
            "sasl_plain_username": user.name,
            "sasl_plain_password": user.password,
            "ssl_cafile": str(self.tls.ca_pem),
        }

    def user(self, name: str) -> ScramUser:
        for user in self.users:
            if user.name == name:
                return user
        raise ValueError(f"user must be one of {[u.name for u in self.users]}, got {name!r}")


def make_tls_stores(
    directory: Path,
    password: str,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    validity_days: int = 2,
) -> TlsStores:
    """A fresh CA and a broker certificate it signed, made with the JDK's ``keytool`` in ``directory``.

    Files: ``ca.p12`` (the CA's key, needed only here), ``broker.p12`` (the broker's key and its chain),
    ``truststore.p12`` (the CA), ``ca.pem`` (the CA for Python clients). EC P-256 keys: quicker to make than
    RSA and supported by Java and OpenSSL alike. Raises :class:`BrokerError` naming the keytool step that
    failed.
    """
    if not 1 <= validity_days <= 3650:
        raise ValueError(f"validity_days must be in 1..3650, got {validity_days}")
    if len(password) < 6:
        raise ValueError(f"a PKCS12 store password needs at least 6 characters (keytool's rule), got {len(password)}")
    keytool = shutil.which("keytool")
    if keytool is None:
        raise BrokerError("no `keytool` on PATH; it comes with the JDK that Kafka needs (apt-get install openjdk-17-jdk-headless)")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ca_store, keystore, truststore = directory / "ca.p12", directory / "broker.p12", directory / "truststore.p12"
    ca_pem, request, signed = directory / "ca.pem", directory / "broker.csr", directory / "broker.pem"
    for stale in (ca_store, keystore, truststore, ca_pem, request, signed):
        stale.unlink(missing_ok=True)  # keytool adds to an existing store instead of replacing it
    san = ",".join([*(f"dns:{name}" for name in dns_names), *(f"ip:{ip}" for ip in ip_addresses)])
    ec_key = ["-keyalg", "EC", "-groupname", "secp256r1", "-validity", str(validity_days)]
    steps: list[tuple[str, list[str]]] = [
        ("make the CA", ["-genkeypair", "-alias", "ca", *ec_key, "-dname", "CN=sitn-test-ca",
                         "-ext", "bc:c", "-ext", "ku:c=keyCertSign,cRLSign", "-keystore", str(ca_store)]),
        ("make the broker's key", ["-genkeypair", "-alias", "broker", *ec_key, "-dname", f"CN={(dns_names or ip_addresses)[0]}",
                                   "-keystore", str(keystore)]),
        ("request the broker's certificate", ["-certreq", "-alias", "broker", "-keystore", str(keystore), "-file", str(request)]),
        ("sign it with the CA", ["-gencert", "-alias", "ca", "-keystore", str(ca_store), "-infile", str(request),
                                 "-outfile", str(signed), "-rfc", "-validity", str(validity_days), "-ext", f"SAN={san}",
                                 "-ext", "ku:c=digitalSignature,keyAgreement", "-ext", "eku=serverAuth,clientAuth"]),
        ("export the CA as PEM", ["-exportcert", "-alias", "ca", "-keystore", str(ca_store), "-rfc", "-file", str(ca_pem)]),
        ("add the CA to the broker's chain", ["-importcert", "-alias", "ca", "-file", str(ca_pem), "-keystore", str(keystore)]),
        ("install the signed certificate", ["-importcert", "-alias", "broker", "-file", str(signed), "-keystore", str(keystore)]),
        ("make the truststore", ["-importcert", "-alias", "ca", "-file", str(ca_pem), "-keystore", str(truststore)]),
    ]
    started = time.monotonic()
    for what, args in steps:
        cmd = [keytool, *args, "-storetype", "PKCS12", "-storepass", password, "-noprompt"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_KEYTOOL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"keytool took over {exc.timeout:.0f}s to {what} in {directory}") from exc
        if done.returncode != 0:
            raise BrokerError(f"keytool failed to {what} in {directory} (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-1000:]}")
    request.unlink()
    logger.info("tls stores made directory=%s san=%s make_s=%.1f", directory, san, time.monotonic() - started)
    return TlsStores(keystore, truststore, ca_pem, password)
