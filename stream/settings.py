"""Runtime settings of the event stream: one frozen, typed object read from ``SITN_*`` environment variables.

Read it once at the entry point (``StreamSettings()``) and pass it down; library code never reads the
environment. ``kafka_bootstrap_servers`` unset means the embedded, file-backed log is used.

>>> s = StreamSettings(kafka_bootstrap_servers="127.0.0.1:9092", sasl_plain_password="hunter2")
>>> "hunter2" in repr(s)
False
>>> kafka_client_kwargs(s)["bootstrap_servers"]
'127.0.0.1:9092'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]


class StreamSettings(BaseSettings):
    """Where events come from and go to, and how they are consumed. Environment prefix ``SITN_``."""

    # hide_input_in_errors: a validation error would otherwise echo the input, passwords included.
    model_config = SettingsConfigDict(env_prefix="SITN_", frozen=True, extra="forbid", hide_input_in_errors=True)

    # -- backend ----------------------------------------------------------------------------------
    # What unset means is kept out of the description (json_schema_extra "unset"): a command's help says it only
    # where that command's default is unset (sitn run, sitn replay), not in sitn serve, which has a broker as its
    # default and no embedded log (sitn.cli_settings).
    kafka_bootstrap_servers: str | None = Field(
        default=None, description="the Kafka brokers to connect to, host:port[,host:port]",
        json_schema_extra={"unset": "no Kafka: the embedded file-backed log"},
    )
    embedded_log_dir: Path = Field(default=Path("var/stream"), description="directory of the embedded log")
    embedded_fsync: bool = Field(default=False, description="fsync the embedded log on every flush (durable, slower)")
    embedded_segment_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, description="embedded segment size")

    # -- topics -----------------------------------------------------------------------------------
    topic_interactions: str = Field(default="sitn.interactions", description="topic of the interaction events")
    topic_dead_letters: str = Field(default="sitn.interactions.dead-letters", description="topic of undecodable records")
    topic_embedding_updates: str = Field(default="sitn.embedding-updates", description="compacted topic of the "
                                         "published embedding updates (the learner writes, serving replicas read)")
    partitions: int = Field(default=4, ge=1, le=1024, description="partitions of the interactions topic")
    replication_factor: int = Field(default=1, ge=1, description="replication factor of created Kafka topics")
    domains: tuple[str, str] = Field(default=("movie", "book"), description="(source, target) domains accepted")

    # -- consuming --------------------------------------------------------------------------------
    consumer_group: str = Field(
        default="sitn-learner",
        description="group the learner commits its checkpointed positions to, for lag tools (nothing reads them back)",
    )
    batch_size: int = Field(default=2000, ge=1, le=100_000, description="max records per poll")
    poll_timeout_s: float = Field(default=0.5, gt=0, le=60,
                                  description="seconds a consumer's poll waits for records when none are there")

    # -- Kafka security passthrough (kafka_client_kwargs: kafka-python's options of the same names) ------
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT", description="how clients reach the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT "
        "(a login, no TLS) or SASL_SSL (a login over TLS)")
    sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="SASL login mechanism; needed with SASL_PLAINTEXT and SASL_SSL")
    sasl_plain_username: str | None = Field(
        default=None, description="SASL user name; needed with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512")
    sasl_plain_password: SecretStr | None = Field(
        default=None, description="password of the SASL user (a secret: environment only)")
    ssl_cafile: Path | None = Field(
        default=None, description="PEM file of the CA certificates the brokers' certificates are checked against "
        "(SSL, SASL_SSL); unset = the system's default CAs")
    ssl_certfile: Path | None = Field(
        default=None, description="PEM client certificate (chain) sent to brokers that ask for one (mutual TLS); "
        "unset = none")
    ssl_keyfile: Path | None = Field(
        default=None, description="PEM private key of the client certificate; unset = the key is in ssl_certfile")
    ssl_password: SecretStr | None = Field(
        default=None, description="password of the client certificate's private key (a secret: environment only)")
    ssl_check_hostname: bool = Field(
        default=True, description="check that a broker's certificate names the host connected to (SSL, SASL_SSL)")

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _servers_have_ports(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"each bootstrap server must be host:port, got {server!r} in {value!r}")
        return value

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> StreamSettings:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol={self.security_protocol} needs sasl_mechanism")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            self.sasl_plain_username is None or self.sasl_plain_password is None
        ):
            raise ValueError(f"sasl_mechanism={self.sasl_mechanism} needs sasl_plain_username and _password")
        return self

    @property
    def uses_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is not None


def kafka_client_kwargs(settings: StreamSettings) -> dict[str, Any]:
    """Connection and security keyword arguments shared by KafkaProducer, KafkaConsumer and KafkaAdminClient.

    Only the options that are set are passed, so kafka-python keeps its own defaults for the rest.

    >>> kafka_client_kwargs(StreamSettings(kafka_bootstrap_servers="h:1"))
    {'bootstrap_servers': 'h:1', 'security_protocol': 'PLAINTEXT'}
    >>> sasl = StreamSettings(kafka_bootstrap_servers="h:1", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
    ...                       sasl_plain_username="app", sasl_plain_password="pw", ssl_cafile="/ca.pem")
    >>> kafka_client_kwargs(sasl)  # doctest: +NORMALIZE_WHITESPACE
    {'bootstrap_servers': 'h:1', 'security_protocol': 'SASL_SSL', 'sasl_mechanism': 'PLAIN',
     'sasl_plain_username': 'app', 'sasl_plain_password': 'pw', 'ssl_cafile': '/ca.pem', 'ssl_check_hostname': True}
    >>> StreamSettings(security_protocol="SASL_PLAINTEXT")
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for StreamSettings
      Value error, security_protocol=SASL_PLAINTEXT needs sasl_mechanism ...
    """
    if settings.kafka_bootstrap_servers is None:
        raise ValueError("kafka_bootstrap_servers is unset: the embedded log is configured, not Kafka")
    out: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism is not None:
        out["sasl_mechanism"] = settings.sasl_mechanism
    if settings.sasl_plain_username is not None:
        out["sasl_plain_username"] = settings.sasl_plain_username
    if settings.sasl_plain_password is not None:
        out["sasl_plain_password"] = settings.sasl_plain_password.get_secret_value()
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, name)
        if value is not None:
            out[name] = str(value)
    if settings.ssl_password is not None:
        out["ssl_password"] = settings.ssl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_check_hostname"] = settings.ssl_check_hostname
    return out
