"""Receiving an upload: stream it into the bucket, probe it, name it, record it with its event.

    uploads = Uploads(store, outbox, settings, metrics, on_accepted=relay.wake)
    video_id = await uploads.receive("video/mp4", request.stream(), title="Whiskers", renditions="720p,360p")
    video_id = await uploads.receive(request.headers["content-type"], request.stream())   # multipart

The bytes go straight to `videos/{id}/incoming/master.upload` (a name the service chose), hashed
on the way; the probe then decides what the file is, and only then does it get its final name,
`videos/{id}/master.{ext}`, with the extension of the container the probe found (never the
client's file name). Any refusal, error or disconnect removes the whole `videos/{id}/`. An upload
is noted in the outbox database when it starts, so one cut short by a crash is swept at the next
start (`sweep`), and its record and event are committed together before the caller answers 202.

The probe reads a local file. With a `file://` bucket that is the incoming object itself, and the
final name is a hard link. With a remote (`s3://`) bucket the body is also written, piece by piece
as it streams to the bucket, to a spool file in local scratch (`services/upload/spool.py`) that the
probe reads and that is removed as soon as the upload is accepted or refused. There a final name
costs a server-side copy of every byte, so the body streams instead to the name its first bytes
make likely (`services/upload/containers.py`: `master.mp4` for a file that starts with an MP4 box);
when the probe agrees the master is in place at once, when not it is copied to the probe's name.
A bucket that cannot be reached, before or during the upload, is a 503 that keeps nothing: no
spool, no record; what a failed write began in the bucket it aborted itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from router.client import new_event
from services.common import contract
from services.common.blobs import BlobInfo, BlobStore, video_key
from services.common.errors import (
    BadRequest,
    CatTubeError,
    InsufficientStorage,
    PayloadTooLarge,
    UnsupportedMedia,
)
from services.upload.containers import likely_extension, media_type
from services.upload.forms import FormStream
from services.upload.metadata import UNTITLED, clean_title, parse_renditions, title_from_filename
from services.upload.metrics import UploadMetrics
from services.upload.outbox import Outbox
from services.upload.probe import Probe, ProbeRejected, probe_file
from services.upload.refusals import refusal
from services.upload.settings import UploadSettings
from services.upload.spool import Spool, Spools

log = logging.getLogger(__name__)

SOURCE = "cattube/upload"
# Room for the form's boundaries, part headers and text fields next to the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024
# The body arrives in pieces of up to 64 KiB; the bucket is written in pieces of about 1 MiB, so the
# file store's thread hand-offs stay few (memory stays flat: one piece at a time).
WRITE_CHUNK_BYTES = 1 << 20
# What the guess of a master's name looks at (services/upload/containers.py): the magic numbers at its start.
HEAD_BYTES = 4096
# The largest object S3 copies in one request (CopyObject); above it the master is uploaded again from the spool.
COPY_MAX_BYTES = 5 * 2**30
NO_SPACE = (
    "The server has no room left to store this upload (its disk or quota is full); nothing of it was kept. "
    "Try again once an operator has freed space."
)
EXPECTED_CONTENT_TYPES = "multipart/form-data, video/* or application/octet-stream"


@dataclass(frozen=True)
class Described:
    """What the client said about its upload, once checked."""

    title: str
    renditions: tuple[str, ...]


class Uploads:
    def __init__(
        self,
        store: BlobStore,
        outbox: Outbox,
        settings: UploadSettings,
        metrics: UploadMetrics,
        *,
        on_accepted: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics
        self.on_accepted = on_accepted
        self.spools = Spools(settings.spool_dir)
        self._probes = asyncio.Semaphore(settings.max_concurrent_probes)

    async def sweep_spools(self) -> None:
        """Remove the spools of uploads cut short by a crash. Only at start-up, before any upload is received:
        every spool there is then a leftover (the bucket's part of the sweep may come later, `sweep`)."""
        await asyncio.to_thread(self.spools.sweep)

    async def sweep(self) -> int:
        """Remove what uploads cut short by a crash left in the bucket; returns how many there were.

        An unreachable bucket keeps the rest for the next start.
        """
        leftovers = await self.outbox.unfinished()
        for swept, video_id in enumerate(leftovers):
            if not await self._discard(video_id):
                log.warning("%d interrupted upload(s) are left for the next start", len(leftovers) - swept)
                break
        else:
            if leftovers:
                log.info("removed the partial objects of %d upload(s) interrupted by the last stop", len(leftovers))
        return len(leftovers)

    async def receive(
        self,
        content_type: str,
        body: AsyncIterable[bytes],
        *,
        title: str | None = None,
        renditions: str | None = None,
        declared_bytes: int | None = None,
        video_id: str | None = None,
    ) -> str:
        """Store the video in `body` and queue its event; returns the new video id.

        A multipart/form-data body carries it in its `file` field (its `title` and `renditions` fields win
        over the arguments, which come from the query); a `video/*` or `application/octet-stream` body
        is the file itself. `video_id` is the id a finished resumable upload already has (its own).
        """
        try:
            media = content_type.split(";", 1)[0].strip().lower()
            if media == "multipart/form-data":
                return await self._receive_form(content_type, body, title, renditions, declared_bytes)
            if media.startswith("video/") or media == "application/octet-stream":
                self._check_declared(declared_bytes, self.settings.max_upload_bytes)
                described = self._describe(title, renditions, None)
                return await self._receive(body, lambda: described, video_id)
            raise UnsupportedMedia(
                f"Content-Type: expected {EXPECTED_CONTENT_TYPES}, got {media or 'none'!r}",
                errors=[{"field": "header.Content-Type", "expected": EXPECTED_CONTENT_TYPES}],
            )
        except CatTubeError as exc:
            self.metrics.refused.labels(str(exc.status)).inc()
            raise
        except BaseException:
            self.metrics.refused.labels("aborted").inc()
            raise

    async def _receive_form(
        self,
        content_type: str,
        body: AsyncIterable[bytes],
        title: str | None,
        renditions: str | None,
        declared_bytes: int | None,
    ) -> str:
        limit = self.settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        self._check_declared(declared_bytes, limit)
        self._describe(title, renditions, None)  # a bad query is refused before the body is read
        form = FormStream(content_type, body, max_body_bytes=limit, on_field=self._check_field)

        def described() -> Described:
            fields = form.fields
            return self._describe(fields.get("title", title), fields.get("renditions", renditions), form.filename)

        return await self._receive(form.file_chunks(), described)

    # -- the steps --------------------------------------------------------------------------------

    async def _receive(
        self, chunks: AsyncIterable[bytes], described: Callable[[], Described], video_id: str | None = None
    ) -> str:
        # A bucket that cannot be used now refuses the upload (503) before anything is noted or read.
        await self.store.check()
        video_id = video_id or uuid.uuid4().hex
        try:
            await self.outbox.begin(video_id)
        except Exception as exc:
            if _storage_full(exc):
                raise InsufficientStorage(NO_SPACE) from None
            raise
        written = False  # once the incoming object exists, the bucket holds something of this upload
        started = time.monotonic()
        try:
            with self._spool(video_id) as spool:
                head, body = await _peek(_pieces(chunks, WRITE_CHUNK_BYTES))
                incoming = await self.store.write(
                    _first_key(video_id, head, guess=spool is not None),
                    body if spool is None else spool.tee(body),
                    max_bytes=self.settings.max_upload_bytes,
                )
                written = True
                received = time.monotonic()
                if incoming.size_bytes == 0:
                    raise BadRequest("file", "a non-empty video file")
                about = described()
                if spool is not None:
                    await spool.finish()
                probe = await self._probe(self._local(incoming.key) if spool is None else spool.path)
                probed = time.monotonic()
                extension, content_type = media_type(probe)
                master = await self._name_master(video_id, incoming, extension, spool)
                named = time.monotonic()
            data = _uploaded(video_id, about, master, content_type, probe).dump()
            event = new_event(contract.UPLOADED, SOURCE, data, id=video_id, partitionkey=video_id)
            record = {name: value for name, value in data.items() if name != "video_id"}
            await self.outbox.accept(video_id, {**record, "container": probe.container}, event)
        except BaseException as exc:
            await asyncio.shield(self._discard(video_id, written=written))
            if _storage_full(exc):
                log.error("upload %s refused: the server's storage is full (%s)", video_id, exc)
                raise InsufficientStorage(NO_SPACE) from None
            raise
        self.metrics.accepted.inc()
        self.metrics.accepted_bytes.inc(master.size_bytes)
        log.info(
            "accepted upload %s: %d bytes, %s (received in %.2f s, probed in %.2f s, named in %.2f s, %.2f s in all)",
            video_id,
            master.size_bytes,
            probe.container,
            received - started,
            probed - received,
            named - probed,
            time.monotonic() - started,
        )
        self.on_accepted()
        return video_id

    def _spool(self, video_id: str) -> contextlib.AbstractContextManager[Spool | None]:
        """A local copy for the probe when the bucket keeps no local files; none when the probe can read the object."""
        if self.store.local_path(_incoming_key(video_id)) is not None:
            return contextlib.nullcontext()
        return self.spools.open(video_id)

    async def _name_master(self, video_id: str, incoming: BlobInfo, extension: str, spool: Spool | None) -> BlobInfo:
        """The master under its final name, `master.{extension}`, and the incoming object gone.

        Streamed under that very name (a remote bucket, a right guess) there is nothing to do. Otherwise: a hard
        link (file://) or a server-side copy (s3://; S3 copies at most 5 GiB in one request, so a larger master is
        uploaded again from the spool).
        """
        key = video_key(video_id, f"master.{extension}")
        if incoming.key == key:
            return incoming
        if spool is not None and incoming.size_bytes > COPY_MAX_BYTES:
            master = await self.store.put_file(key, spool.path)
        else:
            master = await self.store.copy(incoming.key, key)
        if incoming.key == _incoming_key(video_id):
            await self.store.delete_prefix(_incoming_prefix(video_id))
        else:
            await self.store.delete(incoming.key)  # a wrong guess of the name
        return master

    async def _probe(self, path: Path) -> Probe:
        async with self._probes:
            try:
                return await probe_file(
                    path,
                    max_pixels=self.settings.max_pixels,
                    max_duration_s=self.settings.max_duration_s,
                    timeout_s=self.settings.probe_timeout_s,
                    memory_limit_bytes=self.settings.probe_memory_limit_bytes,
                )
            except ProbeRejected as exc:
                raise refusal(exc) from None

    def _local(self, key: str) -> Path:
        path = self.store.local_path(key)
        assert path is not None, "only called for a store that keeps local files"
        return path

    async def _discard(self, video_id: str, *, written: bool = True) -> bool:
        """Remove what an upload left in the bucket and forget it; False when it stays noted as unfinished (the
        bucket may hold part of it and cannot be reached now), so that the next start's `sweep` tries again."""
        try:
            await self.store.delete_prefix(f"videos/{video_id}/")
        except Exception as exc:
            if written:
                log.error("removing the partial upload %s failed (%s); it is retried at the next start", video_id, exc)
                return False
            # The write failed, and a failed write leaves nothing in the bucket: there is nothing to come back for.
            log.warning(
                "could not look for what upload %s left in the bucket (%s); its write had failed", video_id, exc
            )
        try:
            await self.outbox.abandon(video_id)
        except Exception:
            log.exception("forgetting the refused upload %s failed; it is swept at the next start", video_id)
            return False
        return True

    # -- what the client said ---------------------------------------------------------------------

    def _check_declared(self, declared_bytes: int | None, limit: int) -> None:
        if declared_bytes is not None and declared_bytes > limit:
            raise PayloadTooLarge("body", f"at most {limit} bytes, got {declared_bytes}")

    def _check_field(self, name: str, value: str) -> None:
        if name == "title":
            clean_title(value)
        elif name == "renditions":
            parse_renditions(value)

    def _describe(self, title: str | None, renditions: str | None, filename: str | None) -> Described:
        cleaned = clean_title(title) if title is not None else ""
        names = parse_renditions(renditions) if renditions is not None else ()
        return Described(
            title=cleaned or (title_from_filename(filename) if filename else UNTITLED),
            renditions=names or self.settings.default_rendition_names,
        )


def _storage_full(exc: BaseException) -> bool:
    """A full disk or quota, as the bucket (OSError) or the outbox (SQLite's SQLITE_FULL) reports it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def _incoming_prefix(video_id: str) -> str:
    # Inside the video's own directory, so refusing the video removes it too; a directory of its own, so
    # `delete_prefix` can drop it alone once the master has its final name.
    return f"{video_key(video_id, 'incoming')}/"


def _incoming_key(video_id: str) -> str:
    return f"{_incoming_prefix(video_id)}master.upload"  # a name no client chose


def _first_key(video_id: str, head: bytes, *, guess: bool) -> str:
    """Where an upload streams to: with `guess`, the master's likely final name (from the body's first bytes)
    when there is one, so that no copy is needed once the probe agrees; else the incoming object."""
    extension = likely_extension(head) if guess else None
    return video_key(video_id, f"master.{extension}") if extension else _incoming_key(video_id)


def _uploaded(
    video_id: str, about: Described, master: BlobInfo, content_type: str, probe: Probe
) -> contract.VideoUploaded:
    return contract.VideoUploaded(
        video_id=video_id,
        title=about.title,
        master=contract.Master(
            uri=master.uri, size_bytes=master.size_bytes, sha256=master.sha256, content_type=content_type
        ),
        probe=probe.as_event_data(),
        renditions=list(about.renditions),
    )


async def _peek(pieces: AsyncIterator[bytes]) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first `HEAD_BYTES` of a stream (all of it when shorter), and the whole stream still to be read."""
    first = await anext(pieces, b"")
    return first[:HEAD_BYTES], _then(first, pieces)


async def _then(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    del first  # not held while the rest streams
    async for piece in rest:
        yield piece


async def _pieces(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """`chunks` regrouped into pieces of at least `size` bytes (the last may be shorter), copied once."""
    held: list[bytes] = []
    held_bytes = 0
    async for chunk in chunks:
        held.append(chunk)
        held_bytes += len(chunk)
        if held_bytes >= size:
            yield b"".join(held)
            held.clear()
            held_bytes = 0
    if held:
        yield b"".join(held)
