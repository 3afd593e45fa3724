"""Set a consumer group's committed offsets, for resuming exactly where a checkpoint left off.

Used by the pipeline's supervisor *while no consumer of the group runs*: before the consumers start, the
group's committed offsets are moved to the positions recorded in the learner's checkpoint (partitions
the checkpoint never saw go to offset 0), so what the checkpoint holds is neither lost nor applied twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from stream.settings import StreamSettings, kafka_client_kwargs

log = logging.getLogger(__name__)


def reset_group_offsets(settings: StreamSettings, offsets: Mapping[int, int], group: str | None = None) -> dict[int, int]:
    """Commit ``offsets`` (partition -> next offset to read; missing partitions -> 0) for the group.

    Returns the full mapping committed. The group must have no active members.
    """
    group = group or settings.consumer_group
    full = {p: int(offsets.get(p, 0)) for p in range(settings.partitions)}
    unknown = sorted(set(offsets) - set(full))
    if unknown:
        raise ValueError(f"offsets name partitions {unknown}, the topic has 0..{settings.partitions - 1}")
    if settings.uses_kafka:
        _reset_kafka(settings, group, full)
    else:
        from stream.embedded_log import EmbeddedLog

        log_ = EmbeddedLog.open(
            settings.embedded_log_dir, settings.topic_interactions, settings.partitions,
            segment_bytes=settings.embedded_segment_bytes,
        )
        try:
            log_.commit(group, full, fsync=True)
        finally:
            log_.close()
    log.info("group offsets reset group=%s offsets=%s", group, full)
    return full


def _reset_kafka(settings: StreamSettings, group: str, offsets: Mapping[int, int]) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, **kafka_client_kwargs(settings))
    try:
        tps = {p: TopicPartition(settings.topic_interactions, p) for p in offsets}
        consumer.assign(list(tps.values()))
        consumer.commit({tps[p]: OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    finally:
        consumer.close()
