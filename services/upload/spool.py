"""Local copies of uploads for the probe, when the bucket is remote: written beside the stream, removed after.

    spools = Spools(settings.spool_dir)
    spools.sweep()                                   # at start-up: what a crash left behind
    with spools.open(video_id) as spool:             # DATA_DIR/upload/spool/<id>.upload, removed on exit
        info = await store.write(key, spool.tee(pieces), max_bytes=limit)
        probe = await probe_file(spool.path, ...)

The probe reads a file, and an `s3://` bucket has none to give: so while the body streams into the
bucket, each piece is also written to a spool file in the service's own scratch space, and the probe
reads that. A spool lives exactly as long as its upload is being received: leaving the `with` block
removes it, whatever happened (refused, failed, cancelled), and a process killed mid-upload leaves
files that `sweep` removes at the next start. The directory belongs to this service's data directory
and so to this instance alone (its outbox is there too), which is why the sweep may take everything in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["Spool", "Spools"]

log = logging.getLogger(__name__)


class Spool:
    """One upload's local copy: `tee` writes it as the pieces go by; `path` is what the probe reads."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self._file = file

    async def tee(self, pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """`pieces`, each written to the spool before it is passed on (so the spool holds what the bucket got)."""
        async for piece in pieces:
            # A thread does the write; the buffered file's own lock makes `close` wait for one in progress.
            await asyncio.to_thread(self._file.write, piece)
            yield piece

    async def finish(self) -> None:
        """Flush what `tee` wrote, so that the probe's child process reads all of it."""
        await asyncio.to_thread(self._file.flush)

    def remove(self) -> None:
        # Synchronous on purpose: it must run to the end even when the task is being cancelled.
        self._file.close()
        self.path.unlink(missing_ok=True)


class Spools:
    """The spool directory of one upload service (created when needed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextlib.contextmanager
    def open(self, video_id: str) -> Iterator[Spool]:
        """A new, empty spool for `video_id`, removed when the block ends (however it ends)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{video_id}.upload"
        spool = Spool(path, path.open("xb"))  # "x": a fresh file, never one that is already there
        try:
            yield spool
        finally:
            spool.remove()

    def sweep(self) -> tuple[int, int]:
        """Remove every spool left by a process that was killed mid-upload; returns (files, bytes).

        Call at start-up, before any upload is received: nothing in the directory belongs to a live upload.
        """
        if not self.directory.is_dir():
            return 0, 0
        files = size = 0
        for entry in self.directory.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                size += entry.lstat().st_size
                entry.unlink(missing_ok=True)
            files += 1
        if files:
            log.info("removed %d spool file(s) (%d bytes) left by uploads interrupted by the last stop", files, size)
        return files, size
