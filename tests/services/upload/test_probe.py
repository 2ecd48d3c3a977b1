"""The probe accepts self-contained videos and refuses everything else, reading nothing but the upload."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from services.common.media import ffmpeg_exe, hardened_input_args, run_process
from services.upload.probe import Probe, ProbeRejected, probe_file
from tests.media import ffmpeg, make_audio, make_clip, make_clip_with_subtitles, make_h264_bomb, make_image

MAX_PIXELS = 7680 * 4320
MAX_DURATION_S = 21600.0
ROOT = Path(__file__).parents[3]
SECCOMP = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


async def probe(path: Path, **overrides: Any) -> Probe:
    limits: dict[str, Any] = {"max_pixels": MAX_PIXELS, "max_duration_s": MAX_DURATION_S, **overrides}
    return await probe_file(path, **limits)


async def refused(path: Path, status: int, **overrides: Any) -> str:
    """Probe `path`, expect a refusal with `status` and a readable reason; return the reason."""
    with pytest.raises(ProbeRejected) as caught:
        await probe(path, **overrides)
    reason = caught.value.reason
    assert caught.value.status == status, reason
    assert reason[0].isupper() and reason.endswith(".") and len(reason) > 25, reason
    assert "Errno" not in reason and "avcodec" not in reason and "\n" not in reason, reason
    return reason


class Listener:
    """A loopback TCP server that only counts who connects."""

    def __init__(self) -> None:
        self.connections = 0
        self.url = ""

    def connected(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    spy = Listener()
    server = await asyncio.start_server(spy.connected, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spy.url = f"http://127.0.0.1:{port}"
    async with server:
        yield spy


class FifoSpy:
    """A named pipe standing in for another user's stored video: it notices any reader."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody has it open for reading
                continue
            self.opened = True
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[FifoSpy]:
    other = tmp_path / "videos" / "other-user"
    other.mkdir(parents=True)
    spy = FifoSpy(other / "master.mp4")
    yield spy
    spy.stop()


# Accepted videos


async def test_landscape_clip_with_audio(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "cat.mp4", 1280, 720, 5.0)
    found = await probe(path)
    assert found == Probe(
        container="mov",
        duration_s=found.duration_s,
        width=1280,
        height=720,
        fps=25.0,
        video_codec="h264",
        audio_codec="aac",
        rotation=0,
    )
    assert found.duration_s == pytest.approx(5.0, abs=0.1)
    assert found.as_event_data().dump() == {
        "duration_s": found.duration_s,
        "width": 1280,
        "height": 720,
        "fps": 25.0,
        "video_codec": "h264",
        "audio_codec": "aac",
        "rotation": 0,
    }


async def test_subtitles_that_end_after_the_video_are_not_truncation(tmp_path: Path) -> None:
    path = make_clip_with_subtitles(tmp_path / "credits.mkv", 2.0, subtitles_end_s=10.0)
    with av.open(str(path)) as container:
        assert container.duration / av.time_base == pytest.approx(10.0) and container.streams.subtitles
    found = await probe(path)
    assert (found.container, found.video_codec, found.audio_codec) == ("matroska", "h264", "aac")
    assert found.duration_s == pytest.approx(2.0, abs=0.1)  # the video's, not the subtitles'


@pytest.mark.parametrize("rotate", [90, 180, 270])
async def test_rotation_comes_from_the_display_matrix(tmp_path: Path, rotate: int) -> None:
    path = make_clip(tmp_path / "phone.mp4", 320, 176, 0.5, rotate=rotate)
    found = await probe(path)
    assert (found.width, found.height, found.rotation) == (320, 176, rotate)


async def test_portrait_phone_clip_turns_upright_in_ffmpeg(tmp_path: Path) -> None:
    """Rotation 90 is the one ffmpeg's autorotate turns into a portrait picture."""
    path = make_clip(tmp_path / "phone.mp4", 320, 176, 0.5, rotate=90)
    assert (await probe(path)).rotation == 90
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).rotation == -90  # counter-clockwise, as libavutil states it


async def test_clip_without_audio(tmp_path: Path) -> None:
    found = await probe(make_clip(tmp_path / "silent.mp4", 320, 240, 1.0, audio=False))
    assert found.audio_codec is None
    assert found.as_event_data().audio_codec is None


@pytest.mark.parametrize(
    ("fmt", "container", "video_codec", "audio_codec"),
    [
        ("mkv", "matroska", "h264", "aac"),
        ("webm", "matroska", "vp8", "opus"),
        ("mov", "mov", "h264", "aac"),
        ("ts", "mpegts", "h264", "aac"),
    ],
)
async def test_other_containers(tmp_path: Path, fmt: str, container: str, video_codec: str, audio_codec: str) -> None:
    found = await probe(make_clip(tmp_path / f"cat.{fmt}", 320, 240, 2.0, fmt=fmt))
    assert (found.container, found.video_codec, found.audio_codec) == (container, video_codec, audio_codec)
    assert (found.width, found.height) == (320, 240)
    assert found.duration_s == pytest.approx(2.0, abs=0.15)


async def test_names_mean_nothing_to_the_probe(tmp_path: Path) -> None:
    """`%d`, `.m3u8` or a URL-like name do not change how the file is read."""
    path = make_clip(tmp_path / "cat.mp4", 320, 240, 0.5)
    odd = path.rename(tmp_path / "http:x%d.m3u8")
    assert (await probe(odd)).video_codec == "h264"


# Not videos: 415


async def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("Whiskers on the beach, take 3.\n" * 20)
    assert "text" in await refused(path, 415)


async def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    assert "empty" in await refused(path, 415)


@pytest.mark.parametrize("name", ["still.png", "still.jpg"])
async def test_images(tmp_path: Path, name: str) -> None:
    assert "image" in await refused(make_image(tmp_path / name), 415)


@pytest.mark.parametrize("name", ["song.m4a", "song.mp3", "song.ogg"])
async def test_audio_only(tmp_path: Path, name: str) -> None:
    assert "audio" in await refused(make_audio(tmp_path / name), 415)


async def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(os.urandom(64 * 1024))
    await refused(path, 415)


async def test_unsupported_video_codec(tmp_path: Path) -> None:
    path = tmp_path / "lossless.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:d=0.2", "-c:v", "ffv1", str(path))
    assert "ffv1" in await refused(path, 415)


# Broken or too big: 422


async def test_truncated_mp4_with_index_at_the_end(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "cut.mp4", 320, 240, 4.0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in await refused(path, 422)


@pytest.mark.parametrize("fmt", ["mp4", "mkv"])
async def test_truncated_with_index_up_front(tmp_path: Path, fmt: str) -> None:
    """The header still declares 4 s; decoding the end shows the data stops half way."""
    source = make_clip(tmp_path / f"whole.{fmt}", 320, 240, 4.0)
    path = tmp_path / f"cut.{fmt}"
    if fmt == "mp4":
        ffmpeg("-i", str(source), "-c", "copy", "-movflags", "+faststart", str(path))
    else:
        path.write_bytes(source.read_bytes())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in await refused(path, 422)


async def test_too_long(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "long.mp4", 320, 240, 2.0, audio=False)
    assert "longer than the 1 s" in await refused(path, 422, max_duration_s=1.0)


async def test_too_many_pixels(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "big.mp4", 320, 240, 0.5, audio=False)
    assert "320x240" in await refused(path, 422, max_pixels=320 * 200)


async def test_dimension_bomb(tmp_path: Path) -> None:
    """691 bytes that declare 12000x12000: refused from the header, before any frame is decoded."""
    path = make_h264_bomb(tmp_path / "bomb.mp4", 12000, 12000)
    assert path.stat().st_size < 2000
    assert "12000x12000" in await refused(path, 422)


async def test_large_allocation_is_contained(tmp_path: Path) -> None:
    """With the pixel limit out of the way, the child's memory limit and corrupt-frame check still hold."""
    path = make_h264_bomb(tmp_path / "bomb.mkv", 12000, 12000)
    started = time.perf_counter()
    await refused(path, 422, max_pixels=2**31 - 1, memory_limit_bytes=512 << 20)
    assert time.perf_counter() - started < 10


async def test_probe_that_runs_too_long_is_killed(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "cat.mp4", 320, 240, 0.5)
    assert "longer than" in await refused(path, 422, timeout_s=0.01)


async def test_probe_without_enough_memory_to_start(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "cat.mp4", 320, 240, 0.5)
    await refused(path, 422, memory_limit_bytes=32 << 20)


# Files that point elsewhere: refused without reading what they point at


def hls_playlist(url: str, stored: Path) -> str:
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10.0,\n{url}/segment0.ts\n#EXTINF:10.0,\n{stored}\n#EXTINF:10.0,\nfile:{stored}\n#EXT-X-ENDLIST\n"
    )


def dash_manifest(url: str, stored: Path) -> str:
    """A manifest as `ffmpeg -f dash` writes it, with its segments moved to another user's directory."""
    representations = "".join(
        f"""
      <Representation id="{index}" mimeType="video/mp4" codecs="avc1.64000a" bandwidth="70240" width="64" height="64">
        <BaseURL>{base}</BaseURL>
        <SegmentTemplate timescale="12800" initialization="{init}" startNumber="1"
                         media="chunk-stream0-$Number%05d$.m4s">
          <SegmentTimeline><S t="0" d="12800" /></SegmentTimeline>
        </SegmentTemplate>
      </Representation>"""
        for index, (base, init) in enumerate([(f"{stored.parent}/", stored.name), (f"{url}/", "init-stream0.m4s")])
    )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" profiles="urn:mpeg:dash:profile:isoff-live:2011" type="static"
     mediaPresentationDuration="PT1.0S" minBufferTime="PT2.0S">
  <Period id="0" start="PT0.0S">
    <AdaptationSet id="0" contentType="video">{representations}
    </AdaptationSet>
  </Period>
</MPD>
"""


def ffconcat_list(url: str, stored: Path) -> str:
    return f"ffconcat version 1.0\nfile '{stored}'\nfile 'sibling.mp4'\nfile '{url}/x.mp4'\n"


def sdp_description(url: str, stored: Path) -> str:
    port = url.rsplit(":", 1)[1]
    return (
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=cat\nc=IN IP4 127.0.0.1\nt=0 0\n"
        f"m=video {port} RTP/AVP 96\na=rtpmap:96 H264/90000\n"
    )


REFERENCES = {"hls": hls_playlist, "dash": dash_manifest, "ffconcat": ffconcat_list, "sdp": sdp_description}


@pytest.mark.parametrize("kind", sorted(REFERENCES))
async def test_references_are_refused_unread(tmp_path: Path, listener: Listener, stored: FifoSpy, kind: str) -> None:
    make_clip(tmp_path / "sibling.mp4", 64, 64, 0.2)
    path = tmp_path / "x.mp4"  # the name a client would choose to slip it through
    path.write_text(REFERENCES[kind](listener.url, stored.path))
    reason = await refused(path, 415)
    assert "refers to other files" in reason or "network stream" in reason
    await asyncio.sleep(0.05)
    assert listener.connections == 0
    assert not stored.opened


# The layers overlap: the probe child with its content sniffing off, then with every format allowed too,
# then with every protocol allowed as well (only the fd: base URL and the seccomp filter left) still
# refuses each reference and reads nothing it names.
LAYERS = {
    "whitelists": "c.refuse_by_head = lambda head: None",
    "fd-protocol": "c.refuse_by_head = lambda head: None; c.FORMAT_WHITELIST += ('hls', 'dash', 'concat', 'sdp')",
    "seccomp": (
        "c.refuse_by_head = lambda head: None; c.FORMAT_WHITELIST += ('hls', 'dash', 'concat', 'sdp'); "
        "c.PROTOCOL_WHITELIST = 'fd,file,http,tcp,udp,rtp,crypto,data'"
    ),
}


async def run_weakened_child(path: Path, layer: str) -> dict[str, object]:
    code = f"import sys\nimport services.upload.probe_child as c\n{LAYERS[layer]}\nsys.exit(c.main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, str(path), str(MAX_PIXELS), str(MAX_DURATION_S)]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kind", sorted(REFERENCES))
async def test_refused_with_outer_defences_removed(
    tmp_path: Path, listener: Listener, stored: FifoSpy, kind: str, layer: str
) -> None:
    make_clip(tmp_path / "sibling.mp4", 64, 64, 0.2)
    path = tmp_path / "x.mp4"
    path.write_text(REFERENCES[kind](listener.url, stored.path))
    answer = await run_weakened_child(path, layer)
    assert "rejected" in answer, answer
    assert answer["sandboxed"] is SECCOMP
    await asyncio.sleep(0.05)
    assert listener.connections == 0
    assert not stored.opened


async def test_the_attacks_are_real_and_hardened_ffmpeg_stops_them(tmp_path: Path) -> None:
    """The ffmpeg CLI follows a DASH manifest or a concat list to another user's video unless hardened."""
    other = tmp_path / "videos" / "other-user"
    other.mkdir(parents=True)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:d=1", "-c:v", "libx264", "-f", "dash", str(other / "m.mpd"))
    make_clip(tmp_path / "sibling.mp4", 64, 64, 0.2)
    manifest = tmp_path / "manifest.mp4"
    manifest.write_text(dash_manifest("http://127.0.0.1:9", other / "init-stream0.m4s"))
    concat = tmp_path / "list.mp4"
    concat.write_text("ffconcat version 1.0\nfile 'sibling.mp4'\n")
    output = ["-map", "0:v:0", "-frames:v", "1", "-f", "null", "-"]
    for path, leak in ((manifest, f"Opening '{other}/init-stream0.m4s' for reading"), (concat, "Input #0, concat")):
        plain = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-protocol_whitelist", "file", "-i", str(path)]
        leaked = await run_process([*plain, *output], timeout_s=30)
        assert leak in leaked.stderr_tail
        hardened = [ffmpeg_exe(), "-hide_banner", *hardened_input_args(MAX_PIXELS), "-i", str(path), *output]
        stopped = await run_process(hardened, timeout_s=30)
        assert stopped.returncode != 0 and leak not in stopped.stderr_tail


@pytest.mark.skipif(not SECCOMP, reason="the seccomp filter is built for Linux x86-64 and aarch64")
def test_sandbox_forbids_opening_files_and_sockets() -> None:
    code = (
        "import socket, services.upload.probe_child as c\n"
        "assert c.install_sandbox()\n"
        "for attempt in (lambda: open('/etc/hostname'), lambda: socket.socket()):\n"
        "    try:\n        attempt()\n    except PermissionError:\n        continue\n"
        "    raise SystemExit('not sandboxed')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr


def test_libavutil_refuses_allocations_past_max_alloc() -> None:
    """The child sets PyAV's own `av_max_alloc`, as the CLI's `-max_alloc` does."""
    code = (
        "import ctypes, services.upload.probe_child as c\n"
        "c._limit_allocations()\n"
        "path = next(l.split()[-1] for l in open('/proc/self/maps') if '/libavutil' in l)\n"
        "lib = ctypes.CDLL(path)\n"
        "lib.av_malloc.restype = ctypes.c_void_p\n"
        "print(bool(lib.av_malloc(ctypes.c_size_t(64 << 20))), bool(lib.av_malloc(ctypes.c_size_t(300 << 20))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.stdout.split() == ["True", "False"], done.stderr


def test_decoder_options_reach_the_decoder(tmp_path: Path) -> None:
    """The reason the child sets `codec_context.options` itself: they are what the decoder is opened with."""
    path = make_clip(tmp_path / "cat.mp4", 320, 240, 0.2, audio=False)
    for options in ({"codec_whitelist": "vp9"}, {"max_pixels": "1000"}):
        with av.open(str(path)) as container:
            container.streams.video[0].codec_context.options = options
            with pytest.raises(av.error.ArgumentError):
                next(container.decode(video=0))
