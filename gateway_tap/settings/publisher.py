"""``tap.publisher``: the event publisher's queue, Kafka producer and disk spool (all read once at start)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway_tap.settings.base import Section


class PublisherSettings(Section):
    """How the tap hands events to Kafka without ever blocking a request.

    Events go to a bounded in-memory queue drained by one Kafka producer. When Kafka
    is unreachable or the queue is full they go to an append-only disk spool that is
    drained in order once Kafka is back (also after a restart). Nothing is dropped
    unless ``spool_max_bytes`` is set and exhausted.
    """

    queue_max_events: int = Field(default=10_000, gt=0, description="Bounded in-memory queue in front of the producer.")
    spool_dir: str = Field(default=".gateway-tap/spool",
                           description="Spool directory; each tap worker process uses its own worker-<n> subfolder.")
    spool_max_bytes: int | None = Field(default=None, gt=0,
                                        description="Disk budget of the spool; None = unbounded = never drop.")
    on_spool_full: Literal["drop_newest", "drop_oldest"] = Field(default=
        "drop_newest", description="What to drop when spool_max_bytes is exhausted (counted in a metric).")
    spool_segment_bytes: int = Field(default=8 * 1024 * 1024, ge=4096,
                                     description="Segment files roll at this size; a drained segment is deleted.")
    spool_fsync_interval_s: float = Field(default=
        1.0, ge=0,
        description="fsync the spool at most this often (0 = after every write batch). Every batch is flushed to "
                    "the OS at once, so a tap crash loses nothing; a power loss loses at most this interval.")
    linger_ms: int = Field(default=20, ge=0,
                           description="Producer linger: how long a batch waits to fill up. The publisher awaits each "
                                       "group's acknowledgements, so fewer, fuller batches cost less CPU per event "
                                       "(docs/decisions.md, 12); events reach Kafka that much later.")
    max_batch_bytes: int = Field(default=1024 * 1024, gt=0,
                                 description="Producer batch size; also the largest event sent.")
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = Field(
        default="lz4", description="Compression codec of producer batches (lz4: the cheapest for librdkafka; "
                                   "every codec is built into it, and the collectors read them all).")
    enable_idempotence: bool = Field(default=True,
                                     description="Idempotent producer: a retried send is never written twice.")
    acks: Literal["all", 1, 0] = Field(
        default="all", description="Acknowledgements a send waits for (all: every in-sync replica).")
    retry_interval_s: float = Field(default=1.0, gt=0, description="How often to re-probe Kafka while spooling.")
    delivery_timeout_s: float = Field(default=
        10.0, gt=0,
        description="A send not acknowledged within this time counts as failed: the events are spooled "
                    "(they may still arrive later, so sinks see a duplicate at worst).")
    send_group_events: int = Field(default=2_000, gt=0,
                                   description="Events sent before awaiting their acknowledgements.")
