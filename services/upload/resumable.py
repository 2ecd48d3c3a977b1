"""Resumable uploads: the tus operations on `Partials`, and the last byte handed to `Uploads` like any upload.

    resumable = Resumable(partials, uploads, max_upload_bytes=limit)
    partial = await resumable.create(length, request.headers.get("upload-metadata"))
    partial = await resumable.append(upload_id, offset, request.stream(), declared_bytes=n, checksum=None)
    partial = await resumable.progress(upload_id)       # HEAD
    await resumable.terminate(upload_id)                # DELETE

One request at a time works on an upload, and the newest wins: a request for an upload whose PATCH
is still reading (the client behind it reloaded its page, or its connection dropped without a word)
stops that PATCH, which keeps the bytes it has on disk, then goes ahead. A PATCH keeps its bytes as
they come: every `CHECKPOINT_BYTES` it fsyncs the data file and only then commits the new offset,
and it does the same when its client goes away; a PATCH with `Upload-Checksum` keeps nothing until
its checksum is verified.

The last byte makes the upload whole: its file goes through `Uploads.receive`, the very path of
`POST /videos` (stored in the bucket while hashed, probed, its event committed to the outbox), under
the upload's id as its video id. A refusal there (not a video, hostile, truncated) removes the upload
and answers that PATCH with the same problem as `POST /videos` would; the upload then counts as
complete only once it was accepted, so a crash in between leaves it one send short of finishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiofiles

from services.common.errors import CatTubeError, Conflict, InsufficientStorage, InvalidInput, NotFound, PayloadTooLarge
from services.upload.metadata import clean_title, parse_renditions, title_from_filename
from services.upload.partials import Partial, PartialFile, Partials
from services.upload.tus import Checksum, parse_checksum, parse_metadata
from services.upload.uploads import NO_SPACE, Uploads, _pieces

__all__ = ["CHECKPOINT_BYTES", "ExpirySweeper", "Resumable"]

log = logging.getLogger(__name__)

# How often a long PATCH makes its bytes count (fsync, then commit the offset): at most this much is
# sent again after a crash of the service. A few fsyncs per second at loopback speed.
CHECKPOINT_BYTES = 8 << 20
PIECE_BYTES = 1 << 20
OCTET_STREAM = "application/octet-stream"


@dataclass
class _Turn:
    """Who is at an upload: the lock its requests take in turn, and the body reader a newer one may stop."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    reader: asyncio.Future[None] | None = None


class Resumable:
    def __init__(
        self,
        partials: Partials,
        uploads: Uploads,
        *,
        max_upload_bytes: int,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.partials = partials
        self.uploads = uploads
        self.max_upload_bytes = max_upload_bytes
        self.on_change = on_change  # an upload was created or a request let go of one: the sweeper looks again
        self._turns: dict[str, _Turn] = {}

    async def start_up(self) -> None:
        """Before serving: drop what expired while the service was down, and data files no upload owns."""
        expired = await self.partials.sweep()
        strays = await self.partials.remove_strays()
        if expired or strays:
            log.info("removed %d expired resumable upload(s) and %d stray data file(s)", len(expired), strays)

    async def sweep(self) -> list[str]:
        """Remove the uploads that have expired, except those a request is at (it renews them)."""
        expired = await self.partials.sweep(busy=self._turns.__contains__)
        if expired:
            log.info("removed %d resumable upload(s) left unfinished past their expiry", len(expired))
        return expired

    async def create(self, length: int, raw_metadata: str | None) -> Partial:
        """A new upload of `length` bytes; its title and renditions are checked now, before any byte."""
        metadata = parse_metadata(raw_metadata)
        title, renditions = metadata.get("title"), metadata.get("renditions")
        filename = metadata.get("filename") or metadata.get("name")  # tus clients and Uppy say either
        try:
            if title is not None:
                clean_title(title)
            if renditions is not None:
                parse_renditions(renditions)
        except InvalidInput as exc:
            raise InvalidInput(f"header.Upload-Metadata.{exc.field}", exc.expected) from None
        partial = await self.partials.create(
            length, raw_metadata or "", title=title, renditions=renditions, filename=filename
        )
        self.on_change()
        log.info("resumable upload %s created: %d bytes to come", partial.upload_id, length)
        return partial

    async def progress(self, upload_id: str) -> Partial:
        async with self._turn(upload_id):
            return await self._known(upload_id)

    async def terminate(self, upload_id: str) -> None:
        async with self._turn(upload_id):
            await self._known(upload_id)
            await self.partials.remove(upload_id)
        log.info("resumable upload %s terminated by its client", upload_id)

    async def append(
        self,
        upload_id: str,
        offset: int,
        body: AsyncIterable[bytes],
        *,
        declared_bytes: int | None,
        checksum: str | None,
    ) -> Partial:
        """Write `body` at `offset`; returns the upload as it now stands (complete after its last byte).

        `checksum` is the PATCH's `Upload-Checksum`, read once the upload is known to exist and be at `offset`.
        """
        async with self._turn(upload_id) as turn:
            partial = await self._known(upload_id)
            if partial.complete:
                if offset == partial.length and not declared_bytes:
                    return partial
                raise Conflict(
                    "Upload-Offset: the upload is complete; nothing more can be sent to it",
                    errors=[{"field": "header.Upload-Offset", "expected": str(partial.length)}],
                )
            if offset != partial.offset:
                raise Conflict(
                    f"Upload-Offset: expected {partial.offset} (the bytes this server has), got {offset}; "
                    "ask with HEAD and send from there",
                    errors=[{"field": "header.Upload-Offset", "expected": str(partial.offset)}],
                )
            remaining = partial.length - offset
            if declared_bytes is not None and declared_bytes > remaining:
                raise PayloadTooLarge("body", f"at most {remaining} bytes (Upload-Length - Upload-Offset)")
            expected = parse_checksum(checksum)
            try:
                with self.partials.writer(upload_id, offset) as file:
                    await self._receive(turn, partial, file, body, expected)
                    if file.offset < partial.length:
                        await file.sync()
                        expires_at = await self.partials.commit(upload_id, file.offset)
                        return replace(partial, offset=file.offset, expires_at=expires_at)
                    await file.sync()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    log.error("resumable upload %s: the server's storage is full (%s)", upload_id, exc)
                    raise InsufficientStorage(NO_SPACE) from None
                raise
            return await self._finish(partial)

    async def _receive(
        self, turn: _Turn, partial: Partial, file: PartialFile, body: AsyncIterable[bytes], checksum: Checksum | None
    ) -> None:
        """Read the body into `file`, in a task a newer request for the upload may cancel."""
        start = file.offset
        promised = start
        hasher = checksum.hasher() if checksum else None

        async def read() -> None:
            nonlocal promised
            async for piece in _pieces(body, PIECE_BYTES):
                if file.offset + len(piece) > partial.length:
                    raise PayloadTooLarge(
                        "body", f"at most {partial.length - start} bytes (Upload-Length - Upload-Offset)"
                    )
                if hasher is not None:
                    hasher.update(piece)
                await file.write(piece)
                if hasher is None and file.offset - promised >= CHECKPOINT_BYTES and file.offset < partial.length:
                    await file.sync()
                    await self.partials.commit(partial.upload_id, file.offset)
                    promised = file.offset
                    log.debug(
                        "resumable upload %s: checkpoint, %d bytes on disk and promised", partial.upload_id, promised
                    )

        turn.reader = asyncio.ensure_future(read())
        try:
            await turn.reader
        except BaseException as exc:
            # Keep what can be kept whatever ended the request: the client left, a newer request took over,
            # the body was too long, the service is stopping.
            if hasher is not None:
                file.cut(start)  # unverified: nothing of it counts
            elif promised < file.offset < partial.length:
                await asyncio.shield(self._keep(partial.upload_id, file))
            current = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and current is not None and not current.cancelling():
                raise Conflict(
                    "a newer request for this upload took over; this one was stopped with its bytes kept",
                    errors=[{"field": "header.Upload-Offset", "expected": "one request at a time per upload"}],
                ) from None
            raise
        finally:
            turn.reader = None
        if checksum is not None and hasher is not None:
            try:
                checksum.check(hasher)
            except CatTubeError:
                file.cut(start)
                raise

    async def _keep(self, upload_id: str, file: PartialFile) -> None:
        await file.sync()
        await self.partials.commit(upload_id, file.offset)
        log.info("resumable upload %s: request ended early, %d bytes kept", upload_id, file.offset)

    async def _finish(self, partial: Partial) -> Partial:
        """Every byte is here: through the pipeline of `POST /videos`, under the upload's id."""
        upload_id = partial.upload_id
        # Accepted already when a crash came between the acceptance and noting it here.
        if await self.uploads.outbox.get(upload_id) is None:
            title = partial.title
            if not (title and clean_title(title)) and partial.filename:  # as a form's file name stands in for it
                title = title_from_filename(partial.filename)
            try:
                await self.uploads.receive(
                    OCTET_STREAM,
                    _file_chunks(self.partials.data_path(upload_id), partial.length),
                    title=title,
                    renditions=partial.renditions,
                    declared_bytes=partial.length,
                    video_id=upload_id,
                )
            except CatTubeError as exc:
                if exc.status < 500:  # refused as POST /videos would: nothing of it is kept
                    await self.partials.remove(upload_id)
                    log.info("resumable upload %s refused (%d): %s", upload_id, exc.status, exc.detail)
                raise
        await self.partials.complete(upload_id)
        return replace(partial, offset=partial.length, complete=True)

    async def _known(self, upload_id: str) -> Partial:
        partial = await self.partials.get(upload_id)
        if partial is None:
            raise NotFound(f"no resumable upload {upload_id!r} (it never existed, was terminated, refused or expired)")
        return partial

    @contextlib.asynccontextmanager
    async def _turn(self, upload_id: str) -> AsyncIterator[_Turn]:
        turn = self._turns.setdefault(upload_id, _Turn())
        turn.users += 1
        try:
            if turn.reader is not None:
                turn.reader.cancel()  # the newest request wins: the one reading has lost its client, or will
            async with turn.lock:
                yield turn
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[upload_id]
                self.on_change()


class ExpirySweeper:
    """Removes expired uploads when the soonest expiry comes (a timer, renewed on every change), never polling."""

    def __init__(self, resumable: Resumable, clock: Callable[[], float]) -> None:
        self.resumable = resumable
        self.clock = clock
        self.passes = 0
        self.swept = asyncio.Condition()  # notified after each pass (tests wait on it)
        self._changed = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._changed.set()

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    async def run(self) -> None:
        while not self._stopping:
            self._changed.clear()
            await self.resumable.sweep()
            async with self.swept:
                self.passes += 1
                self.swept.notify_all()
            soonest = await self.resumable.partials.next_expiry()
            delay = None if soonest is None else soonest - self.clock()
            if delay is not None and delay <= 0:
                delay = None  # only uploads a request is at are due: its end wakes us (`on_change`)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)


async def _file_chunks(path: Path, length: int) -> AsyncIterator[bytes]:
    left = length
    async with aiofiles.open(path, "rb") as file:
        while left > 0 and (chunk := await file.read(min(PIECE_BYTES, left))):
            left -= len(chunk)
            yield chunk
