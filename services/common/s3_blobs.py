"""The `s3://bucket/prefix` blob store: the `BlobStore` contract on any S3-compatible service, through obstore.

    store = open_blob_store("s3://cattube/videos-prod")   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... from the env
    await store.check()                                    # the bucket exists and the credentials are taken

Credentials and endpoint come from the standard variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), read by obstore.

- `write` streams the chunks into a multipart upload (parts of `PART_BYTES`, at most
  `PART_CONCURRENCY` in flight, so memory stays flat whatever the size); a failing source or the
  size limit aborts the upload, and S3 shows nothing until the upload completes.
- The sha256 is only known once the last byte went by, but S3 takes an object's metadata when the
  upload *starts*, and obstore has no copy-with-new-metadata. So a streamed object's checksum goes
  in a small sidecar object (`dir/.name.sha256`, a name no key can have) bound to the object's
  ETag: a sidecar left from an older version does not match and `stat` reports None rather than a
  wrong checksum. `put_file` hashes the file first and keeps the checksum as the object's own
  metadata (`x-amz-meta-sha256`), which a server-side `copy` carries along.
- `copy` is a server-side copy (CopyObject, at most 5 GiB), whose answer comes only once the server
  has copied every byte: its request may take `COPY_TIMEOUT`, far longer than any other.
- A missing bucket, refused credentials or an unreachable endpoint raise `Unavailable` naming the
  bucket and endpoint; the bucket is checked once, at first use (or at `check()`).

A task cancelled mid-`write` does not drop obstore's upload half-way (that would leave its parts
hidden in the bucket): the upload runs shielded, the source is stopped with an error, obstore sends
`AbortMultipartUpload`, and only then does the cancellation go on. Two cases still leave parts
behind: a process killed mid-upload, and a part still in flight when the abort is sent, which the
server may store after it (AWS documents this; obstore gives no upload id to abort again). Give the
bucket a lifecycle rule that aborts incomplete multipart uploads after a day.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from services.common.blobs import CHUNK_BYTES, BlobInfo, check_key, check_prefix
from services.common.errors import InvalidInput, NotFound, PayloadTooLarge, Unavailable

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ClientConfig, S3Config

__all__ = ["S3BlobStore"]

PART_BYTES = 5 * 1024 * 1024  # S3's smallest part size: the buffer each part in flight costs
PART_CONCURRENCY = 2  # parts uploading at once: ~2 parts + 1 filling stay in memory
SHA256_ATTRIBUTE = "sha256"  # x-amz-meta-sha256
# Unreachable endpoints fail within seconds rather than obstore's default 3 minutes of retries.
RETRY: Any = {"max_retries": 3, "retry_timeout": timedelta(seconds=20)}
CLIENT: Any = {"connect_timeout": timedelta(seconds=5)}
# A server-side copy answers only once the server has copied every byte: SeaweedFS took over 30 s (obstore's
# default request timeout, which then failed the copy) for 2 GiB on the loaded dev machine. Copies wait longer.
COPY_TIMEOUT = timedelta(minutes=10)
_HASH_IN_THREAD_BYTES = 256 * 1024
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class S3BlobStore:
    """Objects in one bucket, under an optional prefix; keys are paths below the prefix."""

    def __init__(self, url: str, *, config: S3Config | None = None, client_options: ClientConfig | None = None) -> None:
        """`config` and `client_options` add to what obstore reads from the `AWS_*` variables (tests use them)."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not _BUCKET.fullmatch(parts.netloc) or parts.query or parts.fragment:
            raise InvalidInput("blob_url", "s3://bucket/optional/prefix with a valid bucket name")
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except InvalidInput:
                raise InvalidInput("blob_url", "s3://bucket/prefix with a prefix of valid key segments") from None
        self.prefix = prefix
        # obstore takes `AWS_ALLOW_HTTP` from the environment only when no client options are given, and ours
        # always are (the timeouts): so it is read here, or a plain-HTTP endpoint fails with "builder error".
        allow_http: Any = {"allow_http": True} if os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true" else {}
        self.store = S3Store(
            self.bucket,
            config=config,
            client_options={**CLIENT, **allow_http, **(client_options or {})},
            retry_config=RETRY,
        )
        self._copier = S3Store(
            self.bucket,
            config=config,
            client_options={**CLIENT, **allow_http, **(client_options or {}), "timeout": COPY_TIMEOUT},
            retry_config=RETRY,
        )
        # For messages only: the endpoint obstore was given, else the one it read from the environment.
        self.endpoint = str(
            self.store.config.get("endpoint")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT")
            or "AWS"
        )
        self._root_uri = f"s3://{self.bucket}/" + (f"{prefix}/" if prefix else "")
        self._checked = False
        self._check_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"S3BlobStore({self._root_uri!r}, endpoint={self.endpoint!r})"

    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, path: str) -> str:
        return path[len(self.prefix) + 1 :] if self.prefix else path

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._path(key)}"

    def key_of(self, uri: str) -> str:
        if not isinstance(uri, str) or not uri.startswith(self._root_uri):
            raise InvalidInput("uri", f"an s3:// URI under {self._root_uri}")
        try:
            return check_key(uri[len(self._root_uri) :])
        except InvalidInput:
            raise InvalidInput("uri", f"an s3:// URI under {self._root_uri} naming a valid key") from None

    def local_path(self, key: str) -> Path | None:
        check_key(key)
        return None

    async def presigned_url(self, key: str, method: str, expires_in_s: float) -> str | None:
        """A SigV4 query-signed URL, made locally with the store's credentials (no request to S3)."""
        path = self._path(key)
        if method not in ("GET", "HEAD"):
            raise InvalidInput("method", "GET or HEAD")
        with self._errors("sign a URL for", self.uri(key)):
            return await obstore.sign_async(
                self.store, "GET" if method == "GET" else "HEAD", path, timedelta(seconds=expires_in_s)
            )

    async def check(self) -> None:
        """Raise `Unavailable` naming the bucket unless it exists and the credentials are taken (asked once)."""
        if self._checked:
            return
        async with self._check_lock:
            if self._checked:
                return
            with self._errors("list", self._root_uri):
                stream = obstore.list(self.store, self.prefix or None, chunk_size=1)
                async for _ in stream:
                    break
            self._checked = True

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> BlobInfo:
        path = self._path(key)
        await self.check()
        digest = hashlib.sha256()
        size = 0
        pulling: asyncio.Future[bytes] | None = None
        stopping = False

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size, pulling
            source = aiter(chunks)
            while not stopping:
                pulling = asyncio.ensure_future(anext(source))
                try:
                    chunk = await pulling
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    raise _WriteCancelled() from None  # an ordinary error, so obstore aborts the upload
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    # Raised inside obstore's upload, which aborts it and re-raises this very error.
                    raise PayloadTooLarge("body", f"at most {max_bytes} bytes")
                if len(chunk) >= _HASH_IN_THREAD_BYTES:
                    await asyncio.to_thread(digest.update, chunk)  # hashlib lets go of the GIL
                else:
                    digest.update(chunk)
                yield chunk
            raise _WriteCancelled()

        upload = asyncio.ensure_future(
            obstore.put_async(self.store, path, counted(), chunk_size=PART_BYTES, max_concurrency=PART_CONCURRENCY)
        )
        with self._errors("write", self.uri(key)):
            try:
                # Shielded: a cancelled caller must not drop obstore's upload half-way, which would leave its
                # parts in the bucket. Instead the source stops, obstore aborts the upload, and then we go.
                result = await asyncio.shield(upload)
            except asyncio.CancelledError:
                stopping = True
                if pulling is not None:
                    pulling.cancel()
                with contextlib.suppress(BaseException):
                    await upload
                if upload.done() and not upload.cancelled() and upload.exception() is None:
                    await obstore.delete_async(self.store, path)  # it completed as we were cancelled: undo
                raise
        sha256 = digest.hexdigest()
        try:
            await self._put_sidecar(path, result["e_tag"], sha256)
            info = await self._stat_path(key, path)
        except BaseException:
            # The object without its checksum would look whole; take it away again (best effort: S3 may be gone).
            with contextlib.suppress(Exception):
                await obstore.delete_async(self.store, path)
            raise
        if info is None:
            raise Unavailable(f"{self.uri(key)} vanished right after it was written")
        return info

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        target = self._path(key)
        sha256 = await asyncio.to_thread(_file_sha256, path)  # FileNotFoundError before anything is sent
        await self.check()
        with self._errors("write", self.uri(key)):
            await obstore.put_async(
                self.store,
                target,
                path,
                attributes={SHA256_ATTRIBUTE: sha256},
                chunk_size=PART_BYTES,
                max_concurrency=PART_CONCURRENCY,
            )
            # A sidecar from an earlier streamed version would not match the new ETag; remove it anyway.
            await obstore.delete_async(self.store, _sidecar(target))
        info = await self._stat_path(key, target)
        if info is None:
            raise Unavailable(f"{self.uri(key)} vanished right after it was written")
        return info

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        if start < 0 or (end is not None and end < start):
            raise InvalidInput("range", "0 <= start <= end")
        await self.check()
        meta = await self._head(path)  # the size, so that ranges past the end read as empty rather than 416
        if meta is None:
            raise NotFound(f"no object {key!r}")
        end = meta["size"] if end is None else min(end, meta["size"])
        if start >= end:
            return
        with self._errors("read", self.uri(key)):
            try:
                result = await obstore.get_async(self.store, path, options={"range": (start, end)})
            except _MISSING:
                raise NotFound(f"no object {key!r}") from None
            async for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
                yield bytes(chunk)

    async def stat(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        await self.check()
        return await self._stat_path(key, path)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        if prefix:
            check_prefix(prefix)
        await self.check()
        return sorted(self._key(meta["path"]) for meta in await self._list_raw(prefix) if not _is_sidecar(meta))

    async def copy(self, source: str, target: str) -> BlobInfo:
        source_path, target_path = self._path(source), self._path(target)
        await self.check()
        recorded = await self._stat_path(source, source_path)
        if recorded is None:
            raise NotFound(f"no object {source!r}")
        with self._errors("copy", self.uri(target)):
            try:
                await obstore.copy_async(self._copier, source_path, target_path)  # carries x-amz-meta-sha256
            except _MISSING:
                raise NotFound(f"no object {source!r}") from None
            await obstore.delete_async(self.store, _sidecar(target_path))
        info = await self._stat_path(target, target_path)
        if info is None:
            raise Unavailable(f"{self.uri(target)} vanished right after it was copied")
        if info.sha256 is None and recorded.sha256 is not None:
            meta = await self._head(target_path)
            if meta is not None:
                await self._put_sidecar(target_path, meta["e_tag"], recorded.sha256)
                info = BlobInfo(info.key, info.size_bytes, recorded.sha256, info.modified_at, info.uri)
        return info

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self.check()
        with self._errors("delete", self.uri(key)):
            await obstore.delete_async(self.store, [path, _sidecar(path)])  # batched; a missing one is no error

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        await self.check()
        listed = await self._list_raw(prefix)
        if listed:
            with self._errors("delete", self._root_uri + prefix):
                await obstore.delete_async(self.store, [meta["path"] for meta in listed])  # batched DeleteObjects
        return sum(1 for meta in listed if not _is_sidecar(meta))

    async def _list_raw(self, prefix: str) -> builtins.list[ObjectMeta]:
        full = "/".join(part for part in (self.prefix, prefix.rstrip("/")) if part) or None
        found: list[ObjectMeta] = []
        with self._errors("list", self._root_uri + prefix):
            async for batch in obstore.list(self.store, full, chunk_size=1000):
                found.extend(batch)
        return found

    async def _head(self, path: str) -> ObjectMeta | None:
        with self._errors("stat", f"s3://{self.bucket}/{path}"):
            try:
                return await obstore.head_async(self.store, path)
            except _MISSING:
                return None

    async def _stat_path(self, key: str, path: str) -> BlobInfo | None:
        with self._errors("stat", self.uri(key)):
            try:
                result = await obstore.get_async(self.store, path, options={"head": True})
            except _MISSING:
                return None
            meta = result.meta
            sha256 = result.attributes.get(SHA256_ATTRIBUTE) or await self._sidecar_sha256(path, meta["e_tag"])
        return BlobInfo(key, meta["size"], sha256, meta["last_modified"].timestamp(), self.uri(key))

    async def _sidecar_sha256(self, path: str, e_tag: str | None) -> str | None:
        try:
            result = await obstore.get_async(self.store, _sidecar(path))
            recorded = json.loads(bytes(await result.bytes_async()))
        except (*_MISSING, ValueError):
            return None
        if not isinstance(recorded, dict) or recorded.get("e_tag") != e_tag or e_tag is None:
            return None  # left by an older version of the object
        sha256 = recorded.get("sha256")
        return sha256 if isinstance(sha256, str) else None

    async def _put_sidecar(self, path: str, e_tag: str | None, sha256: str) -> None:
        body = json.dumps({"e_tag": e_tag, "sha256": sha256}).encode()
        with self._errors("write", f"s3://{self.bucket}/{_sidecar(path)}"):
            await obstore.put_async(self.store, _sidecar(path), body)

    @contextlib.contextmanager
    def _errors(self, action: str, uri: str) -> Iterator[None]:
        """obstore's errors as the project's: every failure to talk to S3 is `Unavailable`, saying why."""
        try:
            yield
        except _MISSING:
            raise
        except BaseError as error:
            raise self._unavailable(action, uri, error) from error

    def _unavailable(self, action: str, uri: str, error: BaseError) -> Unavailable:
        found = _S3_CODE.search(str(error))
        code = found.group(1) if found else None
        where = f"S3 at {self.endpoint}"
        if code == "NoSuchBucket":
            return Unavailable(f"the bucket {self.bucket!r} does not exist at {self.endpoint} (CATTUBE_BLOB_URL)")
        if isinstance(error, PermissionDeniedError | UnauthenticatedError) or code in _CREDENTIAL_CODES:
            return Unavailable(
                f"{where} refused to {action} {uri} ({code or type(error).__name__}): check AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY and that the bucket {self.bucket!r} exists and allows it"
            )
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return Unavailable(f"{where} could not {action} {uri}: {first_line}")


class _WriteCancelled(Exception):
    """Raised into obstore's upload from the source when the writing task is cancelled."""


# obstore raises its NotFoundError from some calls and Python's FileNotFoundError from others (get, head).
_MISSING = (NotFoundError, FileNotFoundError)
_CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "ExpiredToken"}


def _sidecar(path: str) -> str:
    directory, _, name = path.rpartition("/")
    return f"{directory}/.{name}.sha256" if directory else f".{name}.sha256"


def _is_sidecar(meta: ObjectMeta) -> bool:
    return meta["path"].rpartition("/")[2].startswith(".")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
