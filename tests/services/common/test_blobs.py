"""The BlobStore contract: every implementation (file:// now, s3:// later) passes these tests.

Add an implementation to `STORES` and the whole suite runs against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.common.blobs import BlobStore, FileBlobStore, open_blob_store, video_key
from services.common.errors import InvalidInput, NotFound, PayloadTooLarge

STORES: dict[str, Callable[[Path], BlobStore]] = {
    "file": lambda tmp: FileBlobStore(tmp / "bucket"),
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return STORES[request.param](tmp_path)


async def chunks(*parts: bytes, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("client went away")
        yield part


async def read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


def leftovers(store: BlobStore) -> list[str]:
    """Every file under the store's directory (temporary ones included), for stores that have one."""
    root = getattr(store, "root", None)
    if root is None:
        return []
    return sorted(str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files)


async def test_write_streams_hashes_and_reads_back(store: BlobStore) -> None:
    key = video_key("v1", "master.mp4")
    info = await store.write(key, chunks(b"hello ", b"whiskers", b""))

    assert info.key == key and info.size_bytes == 14
    assert info.sha256 == hashlib.sha256(b"hello whiskers").hexdigest()
    assert info.uri == store.uri(key) and store.key_of(info.uri) == key
    assert await read_all(store, key) == b"hello whiskers"
    stat = await store.stat(key)
    assert stat is not None and stat.size_bytes == 14 and stat.uri == info.uri
    assert stat.sha256 in (None, info.sha256)


async def test_overwrite_replaces_the_whole_object(store: BlobStore) -> None:
    await store.write("a/b", chunks(b"first version, longer"))
    await store.write("a/b", chunks(b"second"))
    assert await read_all(store, "a/b") == b"second"


async def test_a_failing_source_leaves_nothing_and_keeps_the_old_object(store: BlobStore) -> None:
    with pytest.raises(ConnectionResetError):
        await store.write("videos/v1/new.mp4", chunks(b"a" * 1000, b"b", fail_after=1))
    assert await store.stat("videos/v1/new.mp4") is None
    assert leftovers(store) == []

    await store.write("videos/v1/old.mp4", chunks(b"old"))
    with pytest.raises(ConnectionResetError):
        await store.write("videos/v1/old.mp4", chunks(b"new", b"more", fail_after=1))
    assert await read_all(store, "videos/v1/old.mp4") == b"old"
    assert leftovers(store) == ["videos/v1/old.mp4"]


async def test_a_cancelled_write_leaves_nothing(store: BlobStore) -> None:
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * 100
        started.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(store.write("videos/v1/slow.mp4", slow()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.stat("videos/v1/slow.mp4") is None
    assert leftovers(store) == []


async def test_max_bytes_is_refused_as_soon_as_crossed(store: BlobStore) -> None:
    pulled = []

    async def source() -> AsyncIterator[bytes]:
        for i in range(10):
            pulled.append(i)
            yield b"x" * 400

    with pytest.raises(PayloadTooLarge) as refused:
        await store.write("videos/v1/big.mp4", source(), max_bytes=1000)
    assert refused.value.status == 413 and "1000" in refused.value.expected
    assert pulled == [0, 1, 2]  # the third chunk crossed the limit; nothing more was read
    assert await store.stat("videos/v1/big.mp4") is None
    assert leftovers(store) == []

    exact = await store.write("videos/v1/exact.mp4", chunks(b"x" * 1000), max_bytes=1000)
    assert exact.size_bytes == 1000


async def test_ranges_are_half_open_like_slices(store: BlobStore) -> None:
    data = bytes(range(256)) * 10_000  # 2.5 MB: several read chunks
    await store.write("r", chunks(data))
    assert await read_all(store, "r", 0, 10) == data[:10]
    assert await read_all(store, "r", 5, 6) == data[5:6]
    assert await read_all(store, "r", 100) == data[100:]
    assert await read_all(store, "r", 1_000_000, 2_000_001) == data[1_000_000:2_000_001]
    assert await read_all(store, "r", len(data) - 3, len(data) + 100) == data[-3:]
    assert await read_all(store, "r", len(data) + 5) == b""
    assert await read_all(store, "r", 7, 7) == b""
    with pytest.raises(InvalidInput):
        await read_all(store, "r", 10, 5)
    with pytest.raises(InvalidInput):
        await read_all(store, "r", -1)


async def test_missing_objects(store: BlobStore) -> None:
    assert await store.stat("videos/none/master.mp4") is None
    with pytest.raises(NotFound):
        await read_all(store, "videos/none/master.mp4")
    await store.write("videos/v1/a", chunks(b"a"))
    assert await store.stat("videos/v1") is None  # a "directory" is not an object


async def test_put_file_stores_a_copy_atomically(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "out" / "720p.mp4"
    source.parent.mkdir()
    source.write_bytes(b"rendition bytes")
    info = await store.put_file("videos/v1/720p.mp4", source)
    assert info.size_bytes == 15 and info.sha256 == hashlib.sha256(b"rendition bytes").hexdigest()
    source.unlink()  # the caller may delete its file afterwards
    assert await read_all(store, "videos/v1/720p.mp4") == b"rendition bytes"
    with pytest.raises(FileNotFoundError):
        await store.put_file("videos/v1/missing.mp4", tmp_path / "nope")
    assert leftovers(store) == ["videos/v1/720p.mp4"]


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside",
        "videos/../../outside",
        "videos/v1/..",
        "videos/./x",
        "videos//x",
        "videos/x/",
        "videos\\..\\x",
        "videos/.hidden",
        "videos/a b",
        "videos/%2e%2e/x",
        "vidéos/x",
        "x" * 2000,
    ],
)
async def test_keys_that_could_escape_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidInput):
        await store.write(key, chunks(b"x"))
    with pytest.raises(InvalidInput):
        await store.stat(key)
    with pytest.raises(InvalidInput):
        await read_all(store, key)
    with pytest.raises(InvalidInput):
        store.uri(key)
    assert leftovers(store) == []


async def test_uris_outside_the_store_are_refused(store: BlobStore, tmp_path: Path) -> None:
    inside = store.uri("videos/v1/master.mp4")
    assert store.key_of(inside) == "videos/v1/master.mp4"
    for uri in [
        (tmp_path / "elsewhere" / "master.mp4").as_uri(),
        inside.replace("videos/v1/master.mp4", "videos/../../../etc/passwd"),
        "http://example.com/videos/v1/master.mp4",
        "s3://other-bucket/videos/v1/master.mp4",
        "not a uri",
    ]:
        with pytest.raises(InvalidInput):
            store.key_of(uri)


async def test_delete_prefix_removes_one_video_only(store: BlobStore) -> None:
    for name in ("master.mp4", "720p.mp4", "poster.jpg"):
        await store.write(video_key("v1", name), chunks(b"1"))
    await store.write(video_key("v10", "master.mp4"), chunks(b"10"))

    assert await store.delete_prefix("videos/v1/") == 3
    assert await store.stat(video_key("v1", "master.mp4")) is None
    assert await store.stat(video_key("v10", "master.mp4")) is not None
    assert await store.delete_prefix("videos/v1/") == 0
    for bad in ("videos/v1", "../", "/", "videos/../"):
        with pytest.raises(InvalidInput):
            await store.delete_prefix(bad)


def test_file_store_reads_in_place_and_writes_under_its_root(tmp_path: Path) -> None:
    store = open_blob_store((tmp_path / "bucket").as_uri())
    assert isinstance(store, FileBlobStore)
    path = store.local_path("videos/v1/master.mp4")
    assert path == tmp_path / "bucket" / "videos" / "v1" / "master.mp4"
    assert store.uri("videos/v1/master.mp4") == path.as_uri()


@pytest.mark.parametrize("url", ["s3://bucket/prefix", "file://relative/dir", "http://x", "bucket"])
def test_open_blob_store_refuses_what_it_cannot_open(url: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        open_blob_store(url)
    assert refused.value.field == "blob_url"


def test_video_key_validates_its_parts() -> None:
    assert video_key("abc_DEF-123", "720p.mp4") == "videos/abc_DEF-123/720p.mp4"
    for video_id, name in [("../x", "a"), ("", "a"), ("x" * 65, "a"), ("a", "../b"), ("a", "b/c"), ("a", ".x")]:
        with pytest.raises(InvalidInput):
            video_key(video_id, name)


async def test_putting_an_object_under_another_key_keeps_its_checksum(store: BlobStore, tmp_path: Path) -> None:
    first = await store.write("videos/v1/incoming/master.upload", chunks(b"master bytes"))
    source = store.local_path(first.key)
    if source is None:
        pytest.skip("the store has no local files")
    moved = await store.put_file("videos/v1/master.mp4", source)
    assert moved.sha256 == first.sha256 == hashlib.sha256(b"master bytes").hexdigest()
    assert await store.delete_prefix("videos/v1/incoming/") == 1
    assert await read_all(store, "videos/v1/master.mp4") == b"master bytes"

    # A checksum recorded on a file from outside the store is not taken on trust.
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"real bytes")
    try:
        os.setxattr(outside, "user.cattube.sha256", b"0" * 64)
    except OSError:
        pytest.skip("no extended attributes on this filesystem")
    info = await store.put_file("videos/v1/other.bin", outside)
    assert info.sha256 == hashlib.sha256(b"real bytes").hexdigest()
