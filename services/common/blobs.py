"""The blob store: where masters, renditions and posters live, behind one small interface.

    store = open_blob_store("file:///var/lib/cattube/bucket")
    info = await store.write(video_key(video_id, "master.mp4"), request.stream(), max_bytes=limit)
    info.uri      # "file:///var/lib/cattube/bucket/videos/<id>/master.mp4", what events carry
    async for chunk in store.read(store.key_of(info.uri), start=0, end=1024):
        ...
    await store.delete_prefix(f"videos/{video_id}/")

Objects are named by *keys* (`videos/{video_id}/master.mp4`) inside a store and by *URIs*
(`file:///…` or `s3://bucket/key`) in events. Keys are checked before any use so that nothing
can name a file outside the store: segments of `[A-Za-z0-9._-]` that do not start with a dot
(which also refuses `.` and `..`, and keeps clear of the store's own temporary files), no
empty segment, no leading slash, no backslash.

Every write is atomic: readers see the old object or the whole new one, never a part. The
`file://` store writes a hidden temporary file in the object's directory, fsyncs it, renames
it over the key and fsyncs the directory; any error (a failing source, the size limit, a
cancelled task) removes the temporary file. The sha256 is computed while the bytes stream
through, and kept with the file (an extended attribute, where the filesystem has them) so
that `stat` can report it later.

The `s3://` store (`services/common/s3_blobs.py`) fits the same interface: `write` becomes a
multipart upload (parts of a few MiB buffered from the stream, aborted on any error, so nothing
is left behind either), `put_file` an upload of the file, `read` a ranged GET, `copy` a
server-side copy, `delete` a DeleteObjects, `delete_prefix` a listing plus batched deletes, and
`local_path` returns None, so callers that want a local file (ffmpeg) download it first.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import aiofiles
import aiofiles.os

from services.common.errors import InvalidInput, NotFound, PayloadTooLarge, Unavailable

__all__ = ["BlobInfo", "BlobStore", "FileBlobStore", "check_key", "check_prefix", "open_blob_store", "video_key"]

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 1024
CHUNK_BYTES = 1024 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA256_XATTR = "user.cattube.sha256"


@dataclass(frozen=True)
class BlobInfo:
    """What the store knows about one object. `sha256` (hex) is None when the store did not record it."""

    key: str
    size_bytes: int
    sha256: str | None
    modified_at: float
    uri: str


class BlobStore(Protocol):
    """The port every blob store implements (`file://` now, `s3://` later); one contract test suite covers all."""

    def uri(self, key: str) -> str:
        """The URI naming `key` in events: `file:///abs/path` or `s3://bucket/key`."""
        ...

    def key_of(self, uri: str) -> str:
        """The key a URI of this store names; `InvalidInput` for a URI outside this store."""
        ...

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> BlobInfo:
        """Stream `chunks` into `key` atomically, hashing as they go.

        Past `max_bytes` it raises `PayloadTooLarge` at once; on that or any other error (the
        source failing, cancellation) nothing is left behind and an older object at `key` stays.
        """
        ...

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        """Store a local file under `key` atomically. The file stays where it is; do not modify it in place
        afterwards (the `file://` store may share its data with the object), deleting it is fine."""
        ...

    # Declared without `async` so that an async generator implements it: `async for chunk in store.read(key)`.
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes `start` to `end` (exclusive, like a slice; None = to the end) of `key`.

        A missing key raises `NotFound` on the first iteration: `stat` first to answer 404 before
        a response starts.
        """
        ...

    async def stat(self, key: str) -> BlobInfo | None:
        """The object's size, checksum and time, or None when there is no such object."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The object's own file, to read in place (it may not exist); None when the store is not local."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the object at `key`, checksum included; nothing to do when there is none."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix` (which ends with `/`); returns how many."""
        ...

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """The keys of every object under `prefix` (which ends with `/`; "" for the whole store), sorted.

        Only whole objects: never a temporary file, an unfinished upload or the store's own bookkeeping.
        """
        ...

    async def copy(self, source: str, target: str) -> BlobInfo:
        """Copy the object at `source` to `target` atomically, checksum included; `NotFound` without a source."""
        ...

    async def presigned_url(self, key: str, method: str, expires_in_s: float) -> str | None:
        """A URL anyone may `method` (GET or HEAD) the object at until it expires, without credentials; None
        for a store that has none to give (`file://`). Nothing is asked of the store: the object may not exist."""
        ...

    async def check(self) -> None:
        """Raise `Unavailable`, saying why, unless the store can be used (an S3 bucket that exists, credentials
        that are taken); for a service's start-up, so that a wrong `CATTUBE_BLOB_URL` fails at once."""
        ...


def check_key(key: str) -> str:
    """`key` if it names an object inside a store, else `InvalidInput`. See the module docstring for the rules."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInput("key", f"a key of 1 to {MAX_KEY_LENGTH} characters")
    if ".." in key or "\\" in key or key.startswith("/"):
        raise InvalidInput("key", "a relative key without '..' or backslashes")
    if not all(_SEGMENT.fullmatch(segment) for segment in key.split("/")):
        raise InvalidInput("key", "'/'-separated segments of A-Z a-z 0-9 . _ - not starting with '.'")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix for `delete_prefix`: a valid key followed by `/`, so `videos/a/` can never reach `videos/ab/`."""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise InvalidInput("prefix", "a key prefix ending in '/', such as 'videos/<id>/'")
    check_key(prefix[:-1])
    return prefix


def video_key(video_id: str, name: str, *names: str) -> str:
    """The key of one of a video's objects: `videos/{video_id}/{name}` (`master.mp4`, `720p.mp4`, `poster.jpg`),
    or one in a folder of the video's: `video_key(id, "hls", "v1", "720p", "init.mp4")`."""
    if not isinstance(video_id, str) or not _VIDEO_ID.fullmatch(video_id):
        raise InvalidInput("video_id", "1 to 64 characters of A-Z a-z 0-9 _ -")
    for part in (name, *names):
        if not isinstance(part, str) or "/" in part or not _SEGMENT.fullmatch(part) or ".." in part:
            raise InvalidInput("name", "a file name of A-Z a-z 0-9 . _ - not starting with '.'")
    return "/".join(("videos", video_id, name, *names))


def open_blob_store(url: str) -> BlobStore:
    """The store a `CATTUBE_BLOB_URL` names: `file:///absolute/dir`, or `s3://bucket/prefix` with the
    standard `AWS_*` variables (see `services/common/s3_blobs.py`)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInput("blob_url", "file:///absolute/dir (three slashes, an absolute path)")
        return FileBlobStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        from services.common.s3_blobs import S3BlobStore  # here: s3_blobs imports this module

        return S3BlobStore(url)
    raise InvalidInput("blob_url", "file:///absolute/dir or s3://bucket/prefix")


class FileBlobStore:
    """Objects as files under one directory (created if missing); keys are relative paths under it."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise InvalidInput("blob_url", "an absolute directory")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self._root_uri = self.root.as_uri().rstrip("/") + "/"

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        parts = urlsplit(uri) if isinstance(uri, str) else None
        if parts is None or parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise InvalidInput("uri", f"a file:// URI under {self._root_uri}")
        path = unquote(parts.path)
        root = unquote(urlsplit(self._root_uri).path)
        if not path.startswith(root):
            raise InvalidInput("uri", f"a file:// URI under {self._root_uri}")
        try:
            return check_key(path[len(root) :])
        except InvalidInput:
            raise InvalidInput("uri", f"a file:// URI under {self._root_uri} naming a valid key") from None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> BlobInfo:
        path = self._path(key)
        await aiofiles.os.makedirs(path.parent, exist_ok=True)
        temporary = _temporary_name(path)
        writer = _HashingWriter(temporary)
        size = 0
        try:
            try:
                await aiofiles.os.wrap(writer.open)()
                async for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge("body", f"at most {max_bytes} bytes")
                    # Hashing and writing in one trip to a thread: the event loop only passes the chunk on.
                    await aiofiles.os.wrap(writer.write)(chunk)
                sha256 = await aiofiles.os.wrap(writer.finish)()
            finally:
                writer.close()
            await aiofiles.os.replace(temporary, path)
        except BaseException:
            # Synchronous on purpose: it must run to the end even when the task is being cancelled.
            _unlink_quietly(temporary)
            raise
        await aiofiles.os.wrap(_fsync_dir)(path.parent)
        return await self._info(key, path, sha256)

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        target = self._path(key)
        await aiofiles.os.makedirs(target.parent, exist_ok=True)
        temporary = _temporary_name(target)
        try:
            sha256 = await aiofiles.os.wrap(_link_or_copy)(path, temporary, self.root)
            await aiofiles.os.replace(temporary, target)
        except BaseException:
            _unlink_quietly(temporary)
            raise
        await aiofiles.os.wrap(_fsync_dir)(target.parent)
        return await self._info(key, target, sha256)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        if start < 0 or (end is not None and end < start):
            raise InvalidInput("range", "0 <= start <= end")
        try:
            file = await aiofiles.open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object {key!r}") from None
        try:
            await file.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                chunk = await file.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            await file.close()

    async def stat(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            return await self._info(key, path, None)
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        if await aiofiles.os.path.isdir(path):
            return  # a directory is not an object
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            await aiofiles.os.remove(path)

    async def delete_prefix(self, prefix: str) -> int:
        directory = self.root.joinpath(*check_prefix(prefix)[:-1].split("/"))
        return await aiofiles.os.wrap(_remove_tree)(directory)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        directory = self.root.joinpath(*check_prefix(prefix)[:-1].split("/")) if prefix else self.root
        return await aiofiles.os.wrap(_list_tree)(directory, self.root)

    async def copy(self, source: str, target: str) -> BlobInfo:
        path = self._path(source)
        if not path.is_file() or path.is_symlink():
            raise NotFound(f"no object {source!r}")
        # A link when possible: objects are only ever replaced by a rename, never changed in place.
        return await self.put_file(target, path)

    async def presigned_url(self, key: str, method: str, expires_in_s: float) -> str | None:
        check_key(key)
        return None  # files have no URL of their own: the store serves them

    async def check(self) -> None:
        if not await aiofiles.os.path.isdir(self.root):
            raise Unavailable(f"the blob directory {self.root} is gone")

    async def _info(self, key: str, path: Path, sha256: str | None) -> BlobInfo:
        facts = await aiofiles.os.stat(path)
        if not _is_regular(facts.st_mode):
            raise FileNotFoundError(path)
        if sha256 is None:
            sha256 = await aiofiles.os.wrap(_get_sha256)(path)
        return BlobInfo(key, facts.st_size, sha256, facts.st_mtime, path.as_uri())


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _temporary_name(path: Path) -> Path:
    # Starts with a dot: no valid key names it, so readers and listings never mistake it for an object.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (the rename itself lives in the directory's data)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A temporary file written and hashed in one go; its methods run on a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.file: BinaryIO | None = None

    def open(self) -> None:
        # "x": never through a file or link that is already there. Closed by close(), from the caller's finally.
        self.file = open(self.path, "xb")

    def write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.digest.update(chunk)  # hashlib lets go of the GIL for large chunks
        self.file.write(chunk)

    def finish(self) -> str:
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        sha256 = self.digest.hexdigest()
        _set_sha256(self.path, sha256)
        return sha256

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _link_or_copy(source: Path, temporary: Path, root: Path) -> str:
    """Put `source`'s bytes at `temporary` (a hard link when possible, else a copy), fsynced; return the sha256.

    A source that is itself an object of the store (under `root`) keeps the sha256 recorded when it
    was written, so moving an object to another key costs a link, not a second pass over its bytes.
    """
    digest = hashlib.sha256()
    try:
        os.link(source, temporary)
    except OSError:  # another filesystem, or links not allowed: copy
        with open(source, "rb") as src, open(temporary, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    else:
        recorded = _get_sha256(temporary) if source.resolve().is_relative_to(root) else None
        with open(temporary, "rb+") as linked:
            if recorded is not None:
                os.fsync(linked.fileno())
                return recorded
            while chunk := linked.read(CHUNK_BYTES):
                digest.update(chunk)
            os.fsync(linked.fileno())
    sha256 = digest.hexdigest()
    _set_sha256(temporary, sha256)
    return sha256


def _set_sha256(path: Path, sha256: str) -> None:
    # Extended attributes are best effort: without them `stat` reports sha256 None.
    with contextlib.suppress(OSError, AttributeError):
        os.setxattr(path, _SHA256_XATTR, sha256.encode())


def _get_sha256(path: Path) -> str | None:
    try:
        return os.getxattr(path, _SHA256_XATTR).decode()
    except (OSError, AttributeError, UnicodeDecodeError):
        return None


def _list_tree(directory: Path, root: Path) -> list[str]:
    if not directory.is_dir() or directory.is_symlink():
        return []
    keys = []
    for parent, _, files in os.walk(directory):
        for name in files:
            relative = Path(parent, name).relative_to(root).as_posix()
            with contextlib.suppress(InvalidInput):  # temporary files (dot names) are not objects
                keys.append(check_key(relative))
    return sorted(keys)


def _remove_tree(directory: Path) -> int:
    """Delete `directory` and everything in it; the number of objects (not temporary files) removed."""
    if not directory.is_dir() or directory.is_symlink():
        return 0
    count = sum(
        1
        for _, _, files in os.walk(directory)
        for name in files
        if not (name.startswith(".") and name.endswith(".tmp"))
    )
    shutil.rmtree(directory, ignore_errors=True)
    return count
