"""The project's exception hierarchy: one base class, one-line subclasses per failure.

It lives in ``stream/``, the bottom layer, so that every layer (``stream``, ``learner``, ``serving`` and the
``sitn`` composition root) can raise and catch these without importing a layer above it.
"""


class SitnError(Exception):
    """Base class of every error this project raises on purpose."""


class DataFormatError(SitnError, ValueError):
    """An input file has a malformed row. The message names the file, the line and the problem."""


class EventDecodeError(SitnError, ValueError):
    """A wire message is not a valid event. Carries a short machine-readable ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CheckpointError(SitnError):
    """Operator action: a checkpoint is corrupt or incompatible; the message names it and what is wrong."""


class BrokerError(SitnError):
    """Operator action: the Kafka broker could not be fetched, started or reached; see its log file."""


class ConfigError(SitnError, ValueError):
    """A setting has a value outside what is allowed; the message says what was received and allowed."""


class KafkaAuthenticationError(BrokerError):
    """Operator action: Kafka refused the configured login (TLS or SASL); the message names the server, the user and why."""
