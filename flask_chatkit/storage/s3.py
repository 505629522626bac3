"""Attachment bytes in an S3-compatible bucket (AWS, MinIO, Ceph, R2, moto…).

Selected with ``CHATKIT_ATTACHMENTS_URL = "s3://bucket/optional/prefix"``; the
object key is ``<prefix>/<attachment id>``. Endpoint, region and credentials
come from boto3's standard configuration (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, shared config files), so this module
adds no config keys of its own.

Besides the blob-storage methods of :class:`~flask_chatkit.storage.disk.AttachmentStorage`
it offers presigned URLs (two-phase uploads go straight to the bucket, previews
redirect to it) and :meth:`S3Storage.stat`, which checks what a client put there.
Every boto3 call made from a gevent greenlet runs on one of a few native threads
(:class:`~flask_chatkit.storage.offload.OffloadPool`): boto3 builds, hashes and
signs requests in Python, which would otherwise stall every stream of the worker.
Unreachable endpoints, a missing bucket and rejected credentials raise
:class:`~flask_chatkit.storage.disk.StorageUnavailable` with the fix in the message.

Imports nothing of Flask; needs ``boto3`` (``pip install flask-chatkit[s3]``).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from typing import IO, Any
from urllib.parse import quote, urlsplit

from ..bridge.native import native_lock
from .disk import AttachmentTooLarge, BlobInfo, StorageUnavailable, is_valid_attachment_id
from .offload import OffloadPool

__all__ = ["BlobInfo", "S3Storage", "parse_s3_url"]


# S3's minimum part size is 5 MiB (all parts but the last); bigger parts mean
# fewer round trips, smaller ones less memory per upload in flight.
PART_SIZE = 8 * 1024 * 1024
# boto3 calls made from gevent greenlets run on this many native threads per
# process: enough to overlap network waits, few enough not to starve the hub of
# the GIL (boto3 is mostly Python). Calls from other threads run where they are.
THREADS = 2
UPLOAD_URL_SECONDS = 300
DOWNLOAD_URL_SECONDS = 60
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Error codes that mean "the storage is not usable as configured / right now".
_UNAVAILABLE_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "403",
        "503",
        "500",
    }
)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix/")``; ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not _BUCKET_RE.fullmatch(parts.netloc or ""):
        raise ValueError(
            f"CHATKIT_ATTACHMENTS_URL must look like s3://bucket/optional/prefix, got {url!r}"
        )
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def _client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


class S3Storage:
    """One object per attachment under ``s3://bucket/prefix/``.

    ``client`` is a boto3 S3 client; by default one is made (per process, on
    first use) from the standard AWS configuration.
    """

    def __init__(
        self,
        url: str,
        *,
        client: Any = None,
        part_size: int = PART_SIZE,
        upload_url_seconds: int = UPLOAD_URL_SECONDS,
        download_url_seconds: int = DOWNLOAD_URL_SECONDS,
        threads: int = THREADS,
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        if part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5 MiB (an S3 limit)")
        self.part_size = part_size
        self.upload_url_seconds = upload_url_seconds
        self.download_url_seconds = download_url_seconds
        self._given_client = client
        self._client: Any = client
        self._client_pid = os.getpid()
        self._lock = native_lock()
        self._threads = OffloadPool(threads)
        self._checked = False
        if client is None:
            try:
                import boto3  # noqa: F401
            except ImportError:
                raise RuntimeError(
                    "CHATKIT_ATTACHMENTS_URL is an s3:// URL but boto3 is not installed: "
                    "pip install 'flask-chatkit[s3]'"
                ) from None

    # -- plumbing ---------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 client; re-made after a fork (its connection pool is not ours)."""
        if self._client is None or (self._given_client is None and self._client_pid != os.getpid()):
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    import boto3
                    from botocore.config import Config

                    config = Config(
                        signature_version="s3v4",
                        # botocore's default CRC32 of every body (binascii.crc32)
                        # holds the GIL for a whole part: it stalled the hub (docs:
                        # benchmarks).
                        # S3 does not require it; SigV4 still hashes the payload.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=5,
                        read_timeout=30,
                    )
                    self._client = boto3.session.Session().client("s3", config=config)
                    self._client_pid = os.getpid()
        return self._client

    def key(self, attachment_id: str) -> str:
        if not is_valid_attachment_id(attachment_id):
            raise ValueError(f"Invalid attachment id {attachment_id!r}")
        return self.prefix + attachment_id

    def _describe(self) -> str:
        endpoint = getattr(getattr(self._client, "meta", None), "endpoint_url", None) or "AWS"
        return f"bucket {self.bucket!r} at {endpoint}"

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        code = _client_error_code(exc)
        if code in ("NoSuchBucket", "404"):
            hint = "the bucket does not exist: create it or fix CHATKIT_ATTACHMENTS_URL"
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            hint = "the credentials were refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        elif code is None and type(exc).__name__ == "NoCredentialsError":
            hint = "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        else:
            hint = f"{type(exc).__name__}: {exc}"
        return StorageUnavailable(f"Attachment storage {self._describe()} is unavailable: {hint}")

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """A boto3 call off the hub; outages and refusals become StorageUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        def run() -> Any:  # the client too is made off the hub (it loads JSON models)
            if isinstance(kwargs.get("Body"), list):  # chunks: joined here, not on the hub
                kwargs["Body"] = b"".join(kwargs["Body"])
            return getattr(self.client, operation)(**kwargs)

        try:
            return self._threads.run(run)
        except ClientError as exc:
            if _client_error_code(exc) in _UNAVAILABLE_CODES:
                self._checked = False
                raise self._unavailable(exc) from None
            raise
        except BotoCoreError as exc:  # connection refused, timeouts, no credentials
            self._checked = False
            raise self._unavailable(exc) from None

    def _ready_client(self) -> Any:
        """The client, made off the hub when it does not exist yet (for presigning)."""
        if self._client is None or self._client_pid != os.getpid():
            self._threads.run(lambda: self.client)
        return self.client

    def check(self) -> None:
        """HEAD the bucket now (the health route): StorageUnavailable, with the fix, if unusable."""
        from botocore.exceptions import ClientError

        try:
            self._call("head_bucket", Bucket=self.bucket)
        except ClientError as exc:
            raise self._unavailable(exc) from None
        self._checked = True

    def ready(self) -> None:
        """:meth:`check` on first use and again after any failure; a no-op otherwise."""
        if not self._checked:
            self.check()

    # -- AttachmentStorage -------------------------------------------------------
    def save(
        self,
        attachment_id: str,
        chunks: Iterable[bytes],
        max_bytes: int,
        content_type: str = "application/octet-stream",
    ) -> int:
        """Stream ``chunks`` to the bucket: one PUT when small, else a multipart upload.

        At most one part is held in memory; past ``max_bytes`` the multipart
        upload is aborted and nothing is stored.
        """
        key = self.key(attachment_id)
        self.ready()
        # A list of chunks, not a growing bytearray: its reallocations copied each
        # part many times over on the hub's thread.
        buffer: list[bytes] = []
        buffered = 0
        total = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:  # read on the caller's greenlet (cooperative socket reads)
                total += len(chunk)
                if total > max_bytes:
                    raise AttachmentTooLarge(max_bytes)
                buffer.append(chunk)
                buffered += len(chunk)
                if buffered >= self.part_size:
                    if upload_id is None:
                        upload_id = self._call(
                            "create_multipart_upload",
                            Bucket=self.bucket,
                            Key=key,
                            ContentType=content_type,
                        )["UploadId"]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, buffer))
                    buffer, buffered = [], 0
            if upload_id is None:
                self._call(
                    "put_object",
                    Bucket=self.bucket,
                    Key=key,
                    Body=buffer,
                    ContentType=content_type,
                )
                return total
            if buffer:
                parts.append(self._upload_part(key, upload_id, len(parts) + 1, buffer))
            self._call(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            upload_id = None
            return total
        finally:
            if upload_id is not None:  # failed or too large: leave nothing behind
                self._abort(key, upload_id)

    def _upload_part(
        self, key: str, upload_id: str, number: int, body: list[bytes]
    ) -> dict[str, Any]:
        answer = self._call(
            "upload_part",
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        return {"ETag": answer["ETag"], "PartNumber": number}

    def _abort(self, key: str, upload_id: str) -> None:
        # On failure the bucket's lifecycle rules reclaim the abandoned upload.
        with contextlib.suppress(Exception):
            self._call("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)

    def open(self, attachment_id: str) -> IO[bytes]:
        from botocore.exceptions import ClientError

        try:
            answer = self._call("get_object", Bucket=self.bucket, Key=self.key(attachment_id))
        except ClientError as exc:
            if _client_error_code(exc) in ("NoSuchKey", "404"):
                raise FileNotFoundError(attachment_id) from None
            raise
        body: IO[bytes] = answer["Body"]
        return body

    def delete(self, attachment_id: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self.key(attachment_id))

    def exists(self, attachment_id: str) -> bool:
        return self.stat(attachment_id) is not None

    def stat(self, attachment_id: str) -> BlobInfo | None:
        """Size and content type of the stored object, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            head = self._call("head_object", Bucket=self.bucket, Key=self.key(attachment_id))
        except ClientError as exc:
            if _client_error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return BlobInfo(int(head["ContentLength"]), str(head.get("ContentType") or ""))

    # -- presigned URLs (signing is local: no network call) ----------------------
    def presign_upload(
        self, attachment_id: str, content_type: str, size: int
    ) -> tuple[str, dict[str, str]]:
        """A PUT URL signed for exactly this content type and length, and the headers to send."""
        url = self._ready_client().generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.bucket,
                "Key": self.key(attachment_id),
                "ContentType": content_type,
                "ContentLength": size,
            },
            ExpiresIn=self.upload_url_seconds,
            HttpMethod="PUT",
        )
        return str(url), {"Content-Type": content_type}

    def presign_download(
        self, attachment_id: str, *, content_type: str, filename: str, inline: bool
    ) -> str:
        disposition = "inline" if inline else "attachment"
        params = {
            "Bucket": self.bucket,
            "Key": self.key(attachment_id),
            "ResponseContentType": content_type,
            "ResponseContentDisposition": f"{disposition}; filename*=UTF-8''{quote(filename)}",
            "ResponseCacheControl": f"private, max-age={self.download_url_seconds}",
        }
        return str(
            self._ready_client().generate_presigned_url(
                "get_object", Params=params, ExpiresIn=self.download_url_seconds
            )
        )
