"""The BlobStore contract: every implementation passes these tests, `file://` and `s3://` on a real S3 server.

The S3 store runs against the session's SeaweedFS (tests/s3.py: signatures checked), a bucket of its own per test.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import obstore
import pytest

from services.common.blobs import BlobStore, FileBlobStore, open_blob_store, video_key
from services.common.errors import InvalidInput, NotFound, PayloadTooLarge, Unavailable
from services.common.s3_blobs import S3BlobStore
from tests.process import free_port
from tests.s3 import CLIENT, S3Server, fresh_bucket


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "file":
        yield FileBlobStore(tmp_path / "bucket")
        return
    server: S3Server = request.getfixturevalue("s3")
    async with fresh_bucket(server) as bucket:
        yield S3BlobStore(f"s3://{bucket}/cattube", config=server.config(), client_options=CLIENT)  # type: ignore[arg-type]


@pytest.fixture
async def s3_bucket(s3: S3Server) -> AsyncIterator[str]:
    async with fresh_bucket(s3) as bucket:
        yield bucket


async def chunks(*parts: bytes, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("client went away")
        yield part


async def read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


async def leftovers(store: BlobStore) -> list[str]:
    """Everything the store holds below its root, seen around the store's own `list`: temporary files of
    the file store, and for S3 every object under the prefix less the checksum sidecars of listed objects."""
    listed = await store.list("")
    if isinstance(store, FileBlobStore):
        raw = sorted(str(Path(d, f).relative_to(store.root)) for d, _, files in os.walk(store.root) for f in files)
    else:
        assert isinstance(store, S3BlobStore)
        paths = [meta["path"] async for batch in obstore.list(store.store, store.prefix) for meta in batch]
        sidecars = {"/".join([*key.split("/")[:-1], f".{key.split('/')[-1]}.sha256"]) for key in listed}
        raw = sorted(p.removeprefix(store.prefix + "/") for p in paths)
        raw = [p for p in raw if p not in sidecars]
    assert set(listed) <= set(raw)
    return raw


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
    assert await leftovers(store) == []

    await store.write("videos/v1/old.mp4", chunks(b"old"))
    with pytest.raises(ConnectionResetError):
        await store.write("videos/v1/old.mp4", chunks(b"new", b"more", fail_after=1))
    assert await read_all(store, "videos/v1/old.mp4") == b"old"
    assert await leftovers(store) == ["videos/v1/old.mp4"]


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
    assert await leftovers(store) == []


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
    assert await leftovers(store) == []

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
    assert await leftovers(store) == ["videos/v1/720p.mp4"]


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
    assert await leftovers(store) == []


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


async def test_delete_removes_one_object_and_its_checksum(store: BlobStore) -> None:
    await store.write(video_key("v1", "master.mp4"), chunks(b"streamed"))  # on S3 its checksum has a sidecar
    await store.write(video_key("v1", "poster.jpg"), chunks(b"kept"))
    await store.delete(video_key("v1", "master.mp4"))
    assert await store.stat(video_key("v1", "master.mp4")) is None
    assert await leftovers(store) == ["videos/v1/poster.jpg"]  # no sidecar, no temporary file left
    await store.delete(video_key("v1", "master.mp4"))  # already gone: nothing to do
    await store.delete("videos/v1")  # a prefix, not an object: nothing to do
    await store.delete("videos/v1/poster.jpg/below")  # below an object: nothing there
    assert await store.list("") == ["videos/v1/poster.jpg"]
    with pytest.raises(InvalidInput):
        await store.delete("../escape")


def test_file_store_reads_in_place_and_writes_under_its_root(tmp_path: Path) -> None:
    store = open_blob_store((tmp_path / "bucket").as_uri())
    assert isinstance(store, FileBlobStore)
    path = store.local_path("videos/v1/master.mp4")
    assert path == tmp_path / "bucket" / "videos" / "v1" / "master.mp4"
    assert store.uri("videos/v1/master.mp4") == path.as_uri()


@pytest.mark.parametrize(
    "url", ["s3://Bad_Bucket/prefix", "s3://bucket/../x", "file://relative/dir", "http://x", "bucket"]
)
def test_open_blob_store_refuses_what_it_cannot_open(url: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        open_blob_store(url)
    assert refused.value.field == "blob_url"


def test_video_key_validates_its_parts() -> None:
    assert video_key("abc_DEF-123", "720p.mp4") == "videos/abc_DEF-123/720p.mp4"
    for video_id, name in [("../x", "a"), ("", "a"), ("x" * 65, "a"), ("a", "../b"), ("a", "b/c"), ("a", ".x")]:
        with pytest.raises(InvalidInput):
            video_key(video_id, name)


async def test_putting_an_object_under_another_key_keeps_its_checksum(tmp_path: Path) -> None:
    # Only the file store has local files to put (an S3 store's local_path is None).
    store = FileBlobStore(tmp_path / "bucket")
    first = await store.write("videos/v1/incoming/master.upload", chunks(b"master bytes"))
    source = store.local_path(first.key)
    assert source is not None
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


async def test_list_names_whole_objects_under_a_prefix(store: BlobStore) -> None:
    assert await store.list("") == []
    for key in ("videos/v1/master.mp4", "videos/v1/hls/seg1.m4s", "videos/v10/master.mp4", "other"):
        await store.write(key, chunks(b"x"))
    assert await store.list("videos/v1/") == ["videos/v1/hls/seg1.m4s", "videos/v1/master.mp4"]
    assert await store.list("") == ["other", "videos/v1/hls/seg1.m4s", "videos/v1/master.mp4", "videos/v10/master.mp4"]
    assert await store.list("nothing/") == []
    for bad in ("videos/v1", "../", "/"):
        with pytest.raises(InvalidInput):
            await store.list(bad)


async def test_copy_keeps_bytes_and_checksum_and_leaves_the_source(store: BlobStore, tmp_path: Path) -> None:
    streamed = await store.write("videos/v1/incoming", chunks(b"streamed ", b"bytes"))
    copied = await store.copy("videos/v1/incoming", "videos/v1/master.mp4")
    assert copied.key == "videos/v1/master.mp4" and copied.size_bytes == 14
    assert copied.sha256 == streamed.sha256 == hashlib.sha256(b"streamed bytes").hexdigest()
    assert await read_all(store, "videos/v1/master.mp4") == b"streamed bytes"
    assert await read_all(store, "videos/v1/incoming") == b"streamed bytes"
    stat = await store.stat("videos/v1/master.mp4")
    assert stat is not None and stat.sha256 == streamed.sha256

    source = tmp_path / "file.bin"
    source.write_bytes(b"from a file")
    put = await store.put_file("videos/v1/put", source)
    again = await store.copy("videos/v1/put", "videos/v2/put")
    assert again.sha256 == put.sha256 == hashlib.sha256(b"from a file").hexdigest()

    with pytest.raises(NotFound):
        await store.copy("videos/v1/missing", "videos/v1/elsewhere")
    with pytest.raises(InvalidInput):
        await store.copy("videos/v1/incoming", "../escape")
    assert await leftovers(store) == ["videos/v1/incoming", "videos/v1/master.mp4", "videos/v1/put", "videos/v2/put"]


async def test_overwriting_a_streamed_object_never_reports_the_old_checksum(store: BlobStore, tmp_path: Path) -> None:
    await store.write("k", chunks(b"old bytes"))
    source = tmp_path / "new"
    source.write_bytes(b"new bytes")
    await store.put_file("k", source)
    stat = await store.stat("k")
    assert stat is not None and stat.sha256 in (None, hashlib.sha256(b"new bytes").hexdigest())
    await store.write("k", chunks(b"newest"))
    stat = await store.stat("k")
    assert stat is not None and stat.sha256 == hashlib.sha256(b"newest").hexdigest()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


STREAM_BYTES = 50 * 1024 * 1024
RSS_GROWTH_LIMIT_KIB = 32 * 1024  # well under the 50 MB streamed: a store that buffers the body cannot pass


async def test_a_large_streamed_write_keeps_memory_flat(store: BlobStore) -> None:
    block = os.urandom(64 * 1024)

    async def source() -> AsyncIterator[bytes]:
        for _ in range(STREAM_BYTES // len(block)):
            yield bytes(bytearray(block))  # a new object each time, as a network read gives: keeping them would show

    Path("/proc/self/clear_refs").write_text("5")  # noqa: ASYNC240  resets VmHWM (the peak RSS) to the current RSS
    before = _rss_kib("VmRSS")
    info = await store.write("videos/v1/master.mp4", source())
    growth = _rss_kib("VmHWM") - before
    print(f"{type(store).__name__}: peak RSS growth {growth} KiB for {STREAM_BYTES >> 20} MiB streamed")
    assert info.size_bytes == STREAM_BYTES
    assert growth < RSS_GROWTH_LIMIT_KIB
    assert await read_all(store, "videos/v1/master.mp4", STREAM_BYTES - 5) == (block * 2)[-5:]


async def test_s3_wrong_secret_is_a_clear_unavailable(s3: S3Server, s3_bucket: str) -> None:
    config = {**s3.config(), "secret_access_key": "not-the-secret"}
    store = S3BlobStore(f"s3://{s3_bucket}", config=config, client_options=CLIENT)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as refused:
        await store.write("videos/v1/master.mp4", chunks(b"x"))
    assert "refused" in refused.value.detail and "AWS_SECRET_ACCESS_KEY" in refused.value.detail
    assert refused.value.status == 503


async def test_s3_unreachable_endpoint_is_a_clear_unavailable(s3: S3Server) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3BlobStore("s3://cattube-nowhere", config={**s3.config(), "endpoint": endpoint}, client_options=CLIENT)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as unreachable:
        await store.stat("videos/v1/master.mp4")
    assert endpoint in unreachable.value.detail
    with pytest.raises(Unavailable):
        await store.write("videos/v1/master.mp4", chunks(b"x"))


async def test_s3_missing_bucket_is_named_at_first_use(s3: S3Server) -> None:
    store = S3BlobStore("s3://cattube-no-such-bucket/p", config=s3.config(), client_options=CLIENT)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as missing:
        await store.check()
    assert "'cattube-no-such-bucket' does not exist" in missing.value.detail
    with pytest.raises(Unavailable, match="cattube-no-such-bucket"):
        await store.write("videos/v1/master.mp4", chunks(b"x"))


def test_open_blob_store_reads_s3_urls_and_the_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    store = open_blob_store("s3://cattube-media/prod")
    assert isinstance(store, S3BlobStore) and store.endpoint == "http://127.0.0.1:9"
    assert store.uri("videos/v1/master.mp4") == "s3://cattube-media/prod/videos/v1/master.mp4"
    assert store.key_of("s3://cattube-media/prod/videos/v1/master.mp4") == "videos/v1/master.mp4"
    assert store.local_path("videos/v1/master.mp4") is None
    with pytest.raises(InvalidInput):
        store.key_of("s3://cattube-media/other/videos/v1/master.mp4")


def test_the_test_s3_server_listens_on_loopback_only(s3: S3Server) -> None:
    if s3.pid is None:
        pytest.skip("an external S3 server: not ours to inspect")
    inodes = {
        os.readlink(f"/proc/{s3.pid}/fd/{fd}")[8:-1]
        for fd in os.listdir(f"/proc/{s3.pid}/fd")
        if os.readlink(f"/proc/{s3.pid}/fd/{fd}").startswith("socket:[")
    }
    bound = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{s3.pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (state == "0A" or table.startswith("udp")):  # 0A: LISTEN
                bound.append(local.split(":")[0])
    assert bound, "found none of the server's sockets"
    loopback = {"0100007F", "00000000000000000000000001000000"}
    assert set(bound) <= loopback


async def test_s3_a_refused_or_cancelled_write_leaves_no_unfinished_upload(s3: S3Server, s3_bucket: str) -> None:
    if s3.filer is None:
        pytest.skip("an external S3 server: its unfinished uploads are not visible through obstore")
    store = S3BlobStore(f"s3://{s3_bucket}", config=s3.config(), client_options=CLIENT)  # type: ignore[arg-type]
    block = os.urandom(64 * 1024)
    # Past one 5 MiB part, so that a multipart upload has begun when the write stops.
    enough = 12 * 1024 * 1024 // len(block)

    # Each source waits until the two parts it filled are stored before it stops the write: a part still
    # in flight at the abort may land after it, on S3 as on SeaweedFS (see wait_for_stored_parts), and
    # what this test checks is the abort itself.
    async def too_big() -> AsyncIterator[bytes]:
        for i in range(enough):
            if i == 11 * 1024 * 1024 // len(block):
                await s3.wait_for_stored_parts(s3_bucket, 2)
            yield bytes(bytearray(block))

    with pytest.raises(PayloadTooLarge):
        await store.write("videos/v1/big.mp4", too_big(), max_bytes=11 * 1024 * 1024)
    assert await s3.unfinished_uploads(s3_bucket) == []

    stalled = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        for _ in range(enough):
            yield bytes(bytearray(block))
        await s3.wait_for_stored_parts(s3_bucket, 2)
        stalled.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(store.write("videos/v1/slow.mp4", stalls()))
    await stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await s3.unfinished_uploads(s3_bucket) == []
    assert await store.list("") == []


async def test_presigned_url_reads_the_object_without_credentials_or_is_none(store: BlobStore) -> None:
    key = "videos/v1/720p.mp4"
    await store.write(key, chunks(b"0123456789" * 100))
    url = await store.presigned_url(key, "GET", 60)
    if isinstance(store, FileBlobStore):
        assert url is None  # no URL of its own: the store service serves the file
        return
    assert url is not None
    async with httpx.AsyncClient() as anyone:
        assert (await anyone.get(url)).content == b"0123456789" * 100
        ranged = await anyone.get(url, headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == b"0123456789"
        assert (await anyone.head(url)).status_code == 403  # signed for GET only
        head = await store.presigned_url(key, "HEAD", 60)
        assert head is not None and (await anyone.head(head)).headers["content-length"] == "1000"
    with pytest.raises(InvalidInput, match="method"):
        await store.presigned_url(key, "PUT", 60)
