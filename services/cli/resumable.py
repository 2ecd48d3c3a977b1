"""`cattube upload` over tus 1.0: create the upload once, remember its URL, and send from the server's offset.

    remembered = Remembered(settings.data_dir)
    key = remembered.key(path)                 # the file's absolute path, size and modification time
    url = remembered.get(key)                  # the upload begun earlier for this very file, if any

The URL is kept in DATA_DIR/cli/uploads.json until the upload is complete or refused, so running the
same command again after a dropped connection, a Ctrl-C or a restart of the service asks the server
how much it has (HEAD) and sends only the rest. A changed file (another size or modification time)
is a new upload.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

import httpx

__all__ = ["TUS", "Remembered", "body_from", "metadata_header", "offset_of"]

TUS = {"Tus-Resumable": "1.0.0"}
PIECE_BYTES = 1 << 20


class Remembered:
    """Upload URLs by file, in one small JSON file (written whole, then renamed over the old one)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "cli" / "uploads.json"

    @staticmethod
    def key(path: Path, file: IO[bytes]) -> str:
        status = os.fstat(file.fileno())
        return f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"

    def _load(self) -> dict[str, str]:
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: start afresh rather than fail an upload over it
        return (
            {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(loaded, dict)
            else {}
        )

    def _save(self, entries: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(f".{self.path.name}.tmp")
        scratch.write_text(json.dumps(entries, indent=1))
        scratch.replace(self.path)

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, url: str) -> None:
        self._save({**self._load(), key: url})

    def forget(self, key: str) -> None:
        entries = self._load()
        if entries.pop(key, None) is not None:
            self._save(entries)


def metadata_header(**fields: str | None) -> str:
    """`Upload-Metadata`: each given value base64-encoded, as tus says."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in fields.items() if value)


async def body_from(file: IO[bytes], offset: int, on_sent: Callable[[int], None]) -> AsyncIterator[bytes]:
    """The file from `offset` to its end, a piece at a time, telling `on_sent` how far it has got."""
    file.seek(offset)
    sent = offset
    while piece := file.read(PIECE_BYTES):
        sent += len(piece)
        yield piece
        on_sent(sent)


async def offset_of(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> int | None:
    """How much of the upload at `url` the server has, or None if it no longer knows it."""
    response = await client.head(url, headers={**TUS, **headers})
    if response.status_code != 200 or not response.headers.get("upload-offset", "").isdigit():
        return None
    return int(response.headers["upload-offset"])
