"""The ``lake`` collector's config: ``collectors.<NAME>.config`` (the reference is docs/configuration.md)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from collectors.sinks.lake.layout import Layout
from gateway_tap.settings import Section

MIB = 1024 * 1024


class S3Settings(Section):
    """An S3-compatible destination. Credentials come from the environment (never from this file)."""

    bucket: str = Field(min_length=3, max_length=63, description="Bucket the objects are written to (must exist).")
    prefix: str = Field(default="", pattern=r"^([^/].*/)?$",
                        description="Key prefix under which the layout starts, empty or ending with '/'.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, SeaweedFS, R2, ...); "
                                                               "None: AWS S3 of `region`.")
    region: str | None = Field(default=None, description="Region (None: the AWS configuration's default).")
    access_key_id_env: str = Field(default="AWS_ACCESS_KEY_ID",
                                   description="Environment variable holding the access key id (unset: the AWS "
                                               "default credential chain, e.g. an instance role).")
    secret_access_key_env: str = Field(default="AWS_SECRET_ACCESS_KEY",
                                       description="Environment variable holding the secret access key.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="Bucket in the path or in the host name (most S3-compatible servers: path).")
    conditional_writes: bool = Field(
        default=True, description="Write objects with If-None-Match: * (an object, once complete, is never "
                                  "replaced); false for stores that reject the header.")
    multipart_threshold_bytes: int = Field(default=64 * MIB, ge=5 * MIB,
                                           description="Objects at least this large are uploaded in parts "
                                                       "(completed multipart upload); smaller ones in one PUT.")
    part_size_bytes: int = Field(default=16 * MIB, ge=5 * MIB, description="Part size of multipart uploads.")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Connection timeout of one request.")
    read_timeout_s: float = Field(default=60.0, gt=0, description="Read timeout of one request.")


class LakeConfig(Section):
    """The ``lake`` collector's config: exactly one of ``directory`` and ``s3``."""

    directory: str | None = Field(default=None, min_length=1,
                                  description="Local directory the layout starts in (objects are fsynced and "
                                              "renamed into place).")
    s3: S3Settings | None = Field(default=None, description="S3-compatible destination instead of a directory.")
    layout: str = Field(default="type={type}/dt={dt}/hour={hour}",
                        description="Hive-style directories under the root: 'name={placeholder}' segments, "
                                    "placeholders {type} (required), {dt} (YYYY-MM-DD), {year}, {month}, {day}, "
                                    "{hour}, from each event's emitted_at (UTC).")
    flush_max_rows: int = Field(default=100_000, ge=1,
                                description="An object is written once a partition holds this many events.")
    flush_max_bytes: int = Field(default=32 * MIB, ge=1024,
                                 description="... or events of this many bytes (as they were on Kafka); held "
                                             "events also count towards the collector's max_in_flight_bytes, "
                                             "which writes everything when reached.")
    rotate_interval_ms: int = Field(default=60_000, ge=100,
                                    description="... or when its oldest held event arrived this long ago "
                                                "(freshness: an event is readable within about this + 5 s).")
    row_group_rows: int = Field(default=122_880, ge=1024, description="Rows per Parquet row group.")
    compression_level: int = Field(default=3, ge=1, le=22, description="zstd level of the Parquet pages.")
    fsync: bool = Field(default=True, description="Local directory: fsync each object and its directory before "
                                                  "it counts as written (false: trust the page cache).")

    @model_validator(mode="after")
    def _one_destination(self) -> Self:
        if (self.directory is None) == (self.s3 is None):
            raise ValueError("set exactly one destination: directory or s3")
        Layout.parse(self.layout)  # a ValueError names what is wrong with it
        return self
