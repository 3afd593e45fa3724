"""The project's Kafka topics and their creation (idempotent) through KafkaAdminClient.

- interactions: ``settings.partitions`` partitions, keyed by user_id, time-retained.
- dead letters: 1 partition (low volume; ordered per source partition by key anyway).
- embedding updates: 1 partition (a version's vector records must precede its version record), compacted:
  the latest vector per ``item:``/``user:`` key and every ``version:``/``consumed:`` record (each its own key) survive,
  which is the full state a serving replica rebuilds (``stream.events.encode_batch``).

**Replication.** A replication factor set explicitly (``SITN_REPLICATION_FACTOR``) is used as given;
left unset, it follows the cluster: min(3, brokers registered when the topics are created), read from
the cluster metadata, so one command line serves a single development broker (1) and a 3-node
cluster (3). Either way the topics get min.insync.replicas min(2, replication factor): with the
producer's acks=all an acknowledged write is on two replicas, and one broker may crash.

>>> [t.name for t in topic_specs(StreamSettings(partitions=8))]
['sitn.interactions', 'sitn.interactions.dead-letters', 'sitn.embedding-updates']
>>> topic_replication(StreamSettings(), brokers=1), topic_replication(StreamSettings(), brokers=5)
((1, 1), (3, 2))
>>> topic_replication(StreamSettings(replication_factor=2), brokers=5)
(2, 2)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from stream.settings import StreamSettings, kafka_client_kwargs

log = logging.getLogger(__name__)


def replication_for(nodes: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of a cluster of ``nodes``: (min(3, N), min(2, N)).

    With 3 or more nodes a write acknowledged with acks=all is on at least 2 of its 3 replicas, so one
    node may crash without losing it and the partition stays writable.

    >>> [replication_for(n) for n in (1, 2, 3, 5)]
    [(1, 1), (2, 2), (3, 2), (3, 2)]
    """
    if nodes < 1:
        raise ValueError(f"a cluster has at least 1 node, got {nodes}")
    return min(3, nodes), min(2, nodes)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: StreamSettings) -> list[TopicSpec]:
    return [
        TopicSpec(settings.topic_interactions, settings.partitions),
        TopicSpec(settings.topic_dead_letters, 1),
        TopicSpec(settings.topic_embedding_updates, 1, {"cleanup.policy": "compact"}),
    ]


def topic_replication(settings: StreamSettings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of created topics: the configured factor if set, else min(3, brokers)."""
    if "replication_factor" in settings.model_fields_set:
        return settings.replication_factor, min(2, settings.replication_factor)
    return replication_for(brokers)


def ensure_topics(settings: StreamSettings, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Waits until they have leaders.

    Replication per :func:`topic_replication`, the broker count read from the cluster's metadata.

    An existing interactions topic with a different partition count is an error (changing it would move
    users between partitions and break their order).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    from stream.errors import ConfigError

    admin = KafkaAdminClient(**kafka_client_kwargs(settings), client_id="sitn-admin")
    try:
        existing = set(admin.list_topics())
        specs = topic_specs(settings)
        missing = [s for s in specs if s.name not in existing]
        created: list[str] = []
        if missing:
            brokers = len(admin.describe_cluster()["brokers"])
            replication_factor, min_insync = topic_replication(settings, brokers)
            replicated = {"min.insync.replicas": str(min_insync)} if replication_factor > 1 else {}
            result = admin.create_topics(
                {
                    s.name: {
                        "num_partitions": s.partitions,
                        "replication_factor": replication_factor,
                        "configs": {**replicated, **s.configs},
                    }
                    for s in missing
                },
                timeout_ms=int(timeout_s * 1000),
                raise_errors=False,
            )
            for topic in result["topics"]:
                code = topic["error_code"]
                if code == 0:
                    created.append(topic["name"])
                elif code != TopicAlreadyExistsError.errno:  # a concurrent creator won the race: fine
                    raise ConfigError(f"creating topic {topic['name']!r} failed: error_code={code} {topic}")
            admin.wait_for_topics([s.name for s in specs], timeout_ms=int(timeout_s * 1000))
        # A topic just created can be listed before its partitions reach the metadata (seen on a 3-node
        # cluster): an empty partition list means "not yet", within the same timeout.
        deadline = time.monotonic() + timeout_s
        have = len(admin.describe_topics([settings.topic_interactions])[0]["partitions"])
        while have == 0 and created and time.monotonic() < deadline:
            time.sleep(0.2)
            have = len(admin.describe_topics([settings.topic_interactions])[0]["partitions"])
        if have != settings.partitions:
            raise ConfigError(
                f"topic {settings.topic_interactions!r} has {have} partitions, configured {settings.partitions}"
            )
        if created:
            log.info(
                "created topics names=%s partitions=%s replication_factor=%d min_insync_replicas=%d brokers=%d",
                created, settings.partitions, replication_factor, min_insync, brokers,
            )
        return created
    finally:
        admin.close()
