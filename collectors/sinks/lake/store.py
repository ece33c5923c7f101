"""The lake's destinations: a local directory and any S3-compatible endpoint, behind one small interface.

Every method blocks (call them in a worker thread). An object is visible only once complete: locally it is
written to a hidden temporary file in its directory, fsynced, then linked (or renamed) into place and the
directory fsynced; on S3 it is one PUT, or a multipart upload that is only completed once every part is in
(and aborted otherwise). With ``if_absent`` an existing object is never replaced: ``os.link`` refuses an
existing name, S3 is asked with ``If-None-Match: *`` (412 when the object exists).

Errors are :class:`StoreError` with a message naming the setting to look at.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from collectors.sinks.lake.config import LakeConfig, S3Settings


class StoreError(Exception):
    """The destination refused or failed; the message names the setting to check."""


class Store(Protocol):
    """What the lake needs from a destination (keys are relative to the lake's root, '/'-separated)."""

    description: str

    def check(self) -> None:
        """Raise :class:`StoreError` when the destination cannot be written (missing bucket, bad credentials)."""

    def put(self, key: str, data: bytes, if_absent: bool) -> bool:
        """Write a complete object; False when ``if_absent`` and it already existed (nothing written)."""

    def get(self, key: str) -> bytes:
        """An object's content."""

    def list(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (recursively), sorted."""

    def delete(self, keys: Iterable[str]) -> None:
        """Remove objects (missing ones are fine)."""


class LocalStore:
    """A directory on a local file system."""

    def __init__(self, root: str | Path, fsync: bool = True, setting: str = "directory") -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.setting = setting
        self.description = str(self.root)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"{self.setting}: cannot write to {self.root}: {exc}") from exc

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put(self, key: str, data: bytes, if_absent: bool) -> bool:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                if if_absent:
                    try:
                        os.link(tmp, path)  # atomic, and refuses an existing name
                    except FileExistsError:
                        return False
                else:
                    os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            self._sync_dir(path.parent)
            return True
        except OSError as exc:
            raise StoreError(f"{self.setting}: cannot write {path}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as exc:
            raise StoreError(f"{self.setting}: cannot read {self.root / key}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base
        if not start.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue  # temporary files of writes in progress
                key = f"{rel}/{name}" if rel != "." else name
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, keys: Iterable[str]) -> None:
        dirs = set()
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                (self.root / key).unlink()
                dirs.add((self.root / key).parent)
        for d in dirs:
            with contextlib.suppress(OSError):
                self._sync_dir(d)


def _error_code(exc: Exception) -> tuple[str, int]:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Store:
    """A bucket (and prefix) on an S3-compatible endpoint, through boto3.

    boto3's own retries are off: the collector runtime retries with its backoff (one set of retry settings).
    """

    def __init__(self, settings: S3Settings, setting: str = "s3") -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self.setting = setting
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        where = settings.endpoint_url or f"AWS S3 ({settings.region or 'default region'})"
        self.description = f"s3://{settings.bucket}/{settings.prefix} at {where}"
        key_id = os.environ.get(settings.access_key_id_env)
        secret = os.environ.get(settings.secret_access_key_env)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region or "us-east-1",
            aws_access_key_id=key_id or None, aws_secret_access_key=secret or None,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=settings.connect_timeout_s,
                          read_timeout=settings.read_timeout_s, s3={"addressing_style": settings.addressing_style},
                          max_pool_connections=16))

    def explain(self, exc: Exception, doing: str) -> StoreError:
        """A :class:`StoreError` naming the setting behind ``exc``."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        s = self.setting
        code, status = _error_code(exc)
        if isinstance(exc, NoCredentialsError):
            msg = (f"{s}: no credentials: set {self.settings.access_key_id_env} and "
                   f"{self.settings.secret_access_key_env} (or an AWS profile or role)")
        elif isinstance(exc, EndpointConnectionError) or (not isinstance(exc, ClientError) and status == 0):
            msg = f"{s}.endpoint_url: cannot reach {self.settings.endpoint_url or 'AWS S3'} ({exc})"
        elif code in ("NoSuchBucket",) or (code in ("404", "NotFound") and doing == "check"):
            msg = f"{s}.bucket: bucket {self.bucket!r} does not exist at {self.description}"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            msg = (f"{s}: credentials refused ({code}): check {self.settings.access_key_id_env} and "
                   f"{self.settings.secret_access_key_env}")
        elif code in ("AccessDenied", "403", "Forbidden") or status == 403:
            msg = f"{s}: access denied to bucket {self.bucket!r} ({code or status}): check the credentials' rights"
        elif code == "NotImplemented" and doing == "put":
            msg = (f"{s}.conditional_writes: the store does not support If-None-Match ({exc}); "
                   "set conditional_writes: false")
        else:
            msg = f"{s}: {doing} failed on {self.description}: {type(exc).__name__}: {exc}"
        return StoreError(msg)

    def _errors(self) -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors() as exc:
            raise self.explain(exc, "check") from exc

    def put(self, key: str, data: bytes, if_absent: bool) -> bool:
        full = self.prefix + key
        cond = {"IfNoneMatch": "*"} if if_absent and self.settings.conditional_writes else {}
        try:
            if len(data) < self.settings.multipart_threshold_bytes:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **cond)
            else:
                self._multipart(full, data, cond)
            return True
        except self._errors() as exc:
            code, status = _error_code(exc)
            if status == 412 or code == "PreconditionFailed":
                return False  # complete already (a redelivery): objects are never replaced
            raise self.explain(exc, "put") from exc

    def _multipart(self, key: str, data: bytes, cond: dict[str, str]) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            size = self.settings.part_size_bytes
            for number, start in enumerate(range(0, len(data), size), start=1):
                answer = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number,
                                                 Body=data[start:start + size])
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                                  MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: a lifecycle rule cleans what an abort misses
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise

    def get(self, key: str) -> bytes:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
            return body
        except self._errors() as exc:
            raise self.explain(exc, "get") from exc

    def list(self, prefix: str) -> list[str]:
        try:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self.prefix + prefix):
                out += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
            return sorted(out)
        except self._errors() as exc:
            raise self.explain(exc, "list") from exc

    def delete(self, keys: Iterable[str]) -> None:
        todo = [self.prefix + k for k in keys]
        try:
            for start in range(0, len(todo), 1000):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in todo[start:start + 1000]], "Quiet": True})
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise StoreError(f"{self.setting}: delete of {first.get('Key')} refused: {first.get('Code')} "
                                     f"{first.get('Message')}")
        except self._errors() as exc:
            raise self.explain(exc, "delete") from exc


def open_store(config: LakeConfig, setting_prefix: str) -> Store:
    """The destination ``config`` names; ``setting_prefix`` (``collectors.lake.config``) prefixes error messages."""
    if config.s3 is not None:
        return S3Store(config.s3, f"{setting_prefix}.s3")
    assert config.directory is not None
    return LocalStore(config.directory, fsync=config.fsync, setting=f"{setting_prefix}.directory")
