"""MinIO / S3 object store (the ``minio`` SDK).

The bucket is created on first use. Large files go up in multipart uploads of
``multipart_part_size``. Transient faults (connection errors, timeouts, 5xx,
SlowDown) are retried with bounded exponential backoff and then raised as
``TransientError``; a missing object is ``FileNotFoundError``. S3 makes an object
visible only once its upload completes, so a half-written object is never seen.
"""
from __future__ import annotations

import functools
import http.client
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from tenacity import (
    RetryError,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from opensubject_tasks.errors import TransientError
from opensubject_tasks.storage.base import ObjectInfo, check_object_key, check_prefix

log = logging.getLogger(__name__)
T = TypeVar("T")

_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "OperationAborted", "XMinioServerNotInitialized", "XMinioStorageFull",
})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_LIST_PAGE = 1000
_CHUNK = 1024 * 1024
_MAX_PRESIGN_S = 7 * 24 * 3600


def is_transient(exc: BaseException) -> bool:
    """True for faults that may pass if we wait: network trouble and server-side errors."""
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", None)
        return exc.code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    if isinstance(exc, ServerError):
        return exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):  # a non-XML answer, e.g. a proxy's 502 page
        code = getattr(exc, "_code", 0) or 0
        return code in _TRANSIENT_STATUS or code >= 500
    return isinstance(exc, (urllib3.exceptions.HTTPError, http.client.HTTPException,
                            ConnectionError, TimeoutError))


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    # Accept "host:port" (the SDK's form) and "http(s)://host:port".
    for scheme, is_secure in (("https://", True), ("http://", False)):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme):].rstrip("/"), is_secure
    return endpoint, secure


class MinioStore:
    """ObjectStore on one bucket of a MinIO (or any S3-compatible) server."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        region: str | None = None,
        part_size: int = 16 * 1024 * 1024,
        presign_expiry_s: int = 900,
        retry_attempts: int = 8,
        retry_initial_s: float = 0.5,
        retry_max_wait_s: float = 20.0,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self.presign_expiry_s = presign_expiry_s
        self.retry_attempts = retry_attempts
        self.retry_initial_s = retry_initial_s
        self.retry_max_wait_s = retry_max_wait_s
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> MinioStore:  # noqa: ANN401 - StoreSettings
        endpoint, secure = _split_endpoint(settings.endpoint, settings.secure)
        # Our own HTTP pool: short connect timeout, and no hidden urllib3 retries, so
        # the backoff below is the only retry policy and its bound is the real one.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s),
            maxsize=16,
            retries=False,
            cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        client = Minio(
            endpoint,
            access_key=settings.access_key.get_secret_value() or None,
            secret_key=settings.secret_key.get_secret_value() or None,
            secure=secure,
            region=settings.region,
            http_client=http,
        )
        return cls(
            client, settings.bucket, region=settings.region,
            part_size=settings.multipart_part_size, presign_expiry_s=settings.presign_expiry_s,
            retry_attempts=settings.retry_attempts, retry_initial_s=settings.retry_initial_s,
            retry_max_wait_s=settings.retry_max_wait_s,
        )

    def __repr__(self) -> str:
        return f"MinioStore(bucket={self.bucket!r})"

    # -- plumbing ----------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn with the bucket ensured, retrying transient faults; map S3 errors."""
        retrying = Retrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential_jitter(initial=self.retry_initial_s, max=self.retry_max_wait_s),
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=False,
        )
        try:
            return retrying(self._with_bucket, fn)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise TransientError(
                f"object store {what} failed after {self.retry_attempts} attempts: {last}"
            ) from last
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise FileNotFoundError(f"no such object: {what}") from None
            raise

    def _with_bucket(self, fn: Callable[[], T]) -> T:
        if not self._bucket_ready:
            with self._bucket_lock:
                if not self._bucket_ready:
                    self._make_bucket()
                    self._bucket_ready = True
        return fn()

    def _make_bucket(self) -> None:
        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket, location=self.region)
        except S3Error as exc:  # another worker made it first
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    # -- writes ------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_object_key(key)
        data = bytes(data)
        self._call(f"put {key}", lambda: self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data), content_type=content_type,
            part_size=self.part_size,
        ))

    def put_file(self, key: str, path: str | Path, content_type: str = "application/octet-stream") -> None:
        check_object_key(key)
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file to upload: {path}")
        self._call(f"put {key}", lambda: self.client.fput_object(
            self.bucket, key, path, content_type=content_type, part_size=self.part_size,
        ))

    # -- reads -------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        check_object_key(key)

        def fetch() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(key, fetch)

    def get_file(self, key: str, path: str | Path) -> None:
        """Download to path through a temporary file beside it (renamed when complete)."""
        check_object_key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name[:50]}.", suffix=".part", dir=dest.parent)
        os.close(fd)

        def fetch() -> None:
            resp = self.client.get_object(self.bucket, key)
            try:
                with open(tmp, "wb") as out:  # every attempt starts over
                    for chunk in resp.stream(_CHUNK):
                        out.write(chunk)
            finally:
                resp.close()
                resp.release_conn()

        try:
            self._call(key, fetch)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def stat(self, key: str) -> ObjectInfo:
        check_object_key(key)
        st = self._call(key, lambda: self.client.stat_object(self.bucket, key))
        return ObjectInfo(key=key, size=int(st.size or 0), etag=(st.etag or "").strip('"'))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under prefix in key order (after ``start_after`` when given); a fault
        mid-listing resumes after the last key."""
        check_prefix(prefix)
        last: str | None = start_after or None
        while True:
            page = self._call(f"list {prefix!r}", functools.partial(self._list_page, prefix, last))
            # Folder markers ("a/") are not objects.
            yield from (o for o in page if not o.key.endswith("/"))
            if len(page) < _LIST_PAGE:
                return
            last = page[-1].key

    def _list_page(self, prefix: str, start_after: str | None) -> list[ObjectInfo]:
        objs = list(islice(self.client.list_objects(
            self.bucket, prefix=prefix or None, recursive=True, start_after=start_after,
        ), _LIST_PAGE))
        return [
            ObjectInfo(key=o.object_name, size=int(o.size or 0), etag=(o.etag or "").strip('"'))
            for o in objs
        ]

    # -- other -------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing one is not an error (as in S3)."""
        check_object_key(key)
        self._call(key, lambda: self.client.remove_object(self.bucket, key))

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A presigned GET URL valid for expires_s (default: the configured expiry)."""
        check_object_key(key)
        seconds = int(expires_s if expires_s is not None else self.presign_expiry_s)
        if not 1 <= seconds <= _MAX_PRESIGN_S:
            raise ValueError(f"presigned URL expiry must be 1 s to 7 days, got {seconds} s")
        return self._call(key, lambda: self.client.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=seconds),
        ))

