"""HLS packaging: real transcodes of tiny clips, their playlists parsed strictly by an independent parser (`m3u8`),
every variant decoded with PyAV from its playlist, every segment decoded on its own from its first frame."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import av
import m3u8
import pytest
from av.video.frame import PictureType

from services.common.blobs import BlobInfo, FileBlobStore
from services.common.errors import Unavailable
from services.common.media import ffmpeg_exe
from services.processing import hls
from services.processing.events import EventSink
from services.processing.hls import Segment, Variant, avc_codec, master_playlist, package_command
from services.processing.job import TranscodeJobs
from services.processing.settings import ProcessingSettings
from services.processing.transcode import TranscodeError, TranscodeResult, transcode
from services.processing.worker import RetryLater
from tests.media import make_clip, probe_of

MAX_PIXELS = 7680 * 4320
CLIP_S = 9  # three segments of 4, 4 and 1 s


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TranscodeResult]:
    """Two clips transcoded once for the whole module (a loop of its own: fixtures' loops are per test)."""
    folder = tmp_path_factory.mktemp("hls")
    clips = {
        "landscape": (make_clip(folder / "landscape.mp4", 426, 240, CLIP_S), ["240p", "144p"]),
        "portrait": (make_clip(folder / "portrait.mp4", 426, 240, 3, audio=False, rotate=90), ["240p"]),
    }
    results = {}
    for name, (clip, renditions) in clips.items():
        results[name] = asyncio.run(
            transcode(
                clip, folder / name, probe=probe_of(clip), renditions=renditions, threads=2, timeout_s=60,
                max_pixels=MAX_PIXELS,
            )
        )  # fmt: skip
    return results


def strict(path: Path) -> m3u8.M3U8:
    """The playlist parsed in strict mode: an unknown line, a malformed tag or a version mismatch raises."""
    return m3u8.M3U8(path.read_text(encoding="utf-8"), strict=True)


def segment_packets(init: Path, segment: Path) -> list[Any]:
    """The video packets of one segment, read from the init segment and that segment alone."""
    with av.open(io.BytesIO(init.read_bytes() + segment.read_bytes()), format="mp4") as container:
        stream = container.streams.video[0]
        return [(p.pts * stream.time_base, p.is_keyframe) for p in container.demux(stream) if p.size]


def decoded_alone(init: Path, segment: Path) -> list[Any]:
    """Every video frame of one segment, decoded by a fresh decoder from the segment's first byte."""
    with av.open(io.BytesIO(init.read_bytes() + segment.read_bytes()), format="mp4") as container:
        return [(frame.key_frame, PictureType(frame.pict_type).name) for frame in container.decode(video=0)]


# --- real packages -----------------------------------------------------------------------------------------------


async def test_the_master_playlist_lists_every_rung_with_its_rates_codecs_size_and_frame_rate(
    packaged: dict[str, TranscodeResult],
) -> None:
    result = packaged["landscape"]
    master = strict(result.hls_master)
    assert master.is_variant and master.is_independent_segments
    listed = {p.uri: p.stream_info for p in master.playlists}
    assert list(listed) == ["240p/index.m3u8", "144p/index.m3u8"]
    for rendition in result.renditions:
        info = listed[f"{rendition.name}/index.m3u8"]
        assert info.resolution == (rendition.width, rendition.height)
        assert info.frame_rate == 25.0
        video, audio = info.codecs.split(",")
        assert video.startswith("avc1.64") and audio == "mp4a.40.2"  # High profile, AAC-LC
        segments, _ = hls.read_segments(result.hls_dir / rendition.name / hls.MEDIA_NAME)
        bits = sum(s.size_bytes for s in segments) * 8
        assert info.average_bandwidth == round(bits / sum(s.duration_s for s in segments))
        # The peak covers every full segment (the 1 s tail is too short to count on its own).
        assert info.bandwidth >= max(s.size_bytes * 8 / s.duration_s for s in segments if s.duration_s >= 2)
        assert info.bandwidth >= info.average_bandwidth


async def test_media_playlists_are_complete_vod_lists_of_aligned_segments_within_the_target(
    packaged: dict[str, TranscodeResult],
) -> None:
    result = packaged["landscape"]
    durations = {}
    for rendition in result.renditions:
        playlist = strict(result.hls_dir / rendition.name / hls.MEDIA_NAME)
        assert playlist.playlist_type == "vod" and playlist.is_endlist and playlist.version == 7
        assert playlist.target_duration == hls.SEGMENT_S
        assert [m.uri for m in playlist.segment_map] == [hls.INIT_NAME]
        assert (result.hls_dir / rendition.name / hls.INIT_NAME).stat().st_size > 0
        lengths = [s.duration for s in playlist.segments]
        assert all(2 <= d <= playlist.target_duration for d in lengths[:-1]) and 0 < lengths[-1] <= 6
        assert sum(lengths) == pytest.approx(CLIP_S, abs=0.05)
        for segment in playlist.segments:
            assert (result.hls_dir / rendition.name / segment.uri).is_file()
        durations[rendition.name] = lengths
    assert durations["240p"] == durations["144p"] == [4.0, 4.0, 1.0]


async def test_every_segment_of_every_rung_starts_with_a_keyframe_and_decodes_on_its_own(
    packaged: dict[str, TranscodeResult],
) -> None:
    result = packaged["landscape"]
    starts = {}
    for rendition in result.renditions:
        folder = result.hls_dir / rendition.name
        playlist = strict(folder / hls.MEDIA_NAME)
        starts[rendition.name] = []
        for segment in playlist.segments:
            packets = segment_packets(folder / hls.INIT_NAME, folder / segment.uri)
            assert packets[0][1], f"{rendition.name}/{segment.uri} does not start with a keyframe"
            frames = decoded_alone(folder / hls.INIT_NAME, folder / segment.uri)
            # A fresh decoder gives every frame of the segment, the first an I frame: no reference reaches back.
            assert len(frames) == len(packets) and frames[0] == (True, "I")
            starts[rendition.name].append(min(pts for pts, _ in packets))
    assert starts["240p"] == starts["144p"]  # the same instants in every rung: a player can switch at any one


async def test_each_variant_decodes_whole_with_pyav_from_its_playlist(packaged: dict[str, TranscodeResult]) -> None:
    result = packaged["landscape"]
    for rendition in result.renditions:
        with av.open(str(result.hls_dir / rendition.name / hls.MEDIA_NAME)) as container:
            assert container.format.name == "hls"
            frames = [(f.width, f.height) for f in container.decode(video=0)]
        assert frames == [(rendition.width, rendition.height)] * (CLIP_S * 25)
        with av.open(str(result.hls_dir / rendition.name / hls.MEDIA_NAME)) as container:
            audio_s = sum(f.samples / f.sample_rate for f in container.decode(audio=0))
        assert audio_s == pytest.approx(CLIP_S, abs=0.1)


async def test_a_silent_portrait_clip_is_packaged_upright_without_an_audio_codec(
    packaged: dict[str, TranscodeResult],
) -> None:
    result = packaged["portrait"]
    (variant,) = strict(result.hls_master).playlists
    assert variant.stream_info.resolution == (240, 426)
    assert variant.stream_info.codecs.startswith("avc1.64") and "," not in variant.stream_info.codecs
    with av.open(str(result.hls_dir / "240p" / hls.MEDIA_NAME)) as container:
        assert not container.streams.audio
        assert sum(1 for _ in container.decode(video=0)) == 3 * 25


async def test_a_packaging_failure_is_transient_and_leaves_nothing(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 256, 144, 1)
    # The real ffmpeg for the encode; a failing one for the packaging run (the one that writes `-f hls`).
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(
        f'#!/bin/sh\ncase "$*" in *"-f hls"*) echo "hls: disk on fire" >&2; exit 1;; esac\nexec {ffmpeg_exe()} "$@"\n'
    )
    wrapper.chmod(0o755)
    out_dir = tmp_path / "out"
    with pytest.raises(TranscodeError) as caught:
        await transcode(
            clip, out_dir, probe=probe_of(clip), renditions=["144p"], threads=1, timeout_s=60,
            max_pixels=MAX_PIXELS, ffmpeg=str(wrapper),
        )  # fmt: skip
    assert not caught.value.permanent
    assert caught.value.reason == "The renditions could not be cut into HLS segments (hls: disk on fire); try again."
    assert os.listdir(out_dir) == []


# --- the pure parts ----------------------------------------------------------------------------------------------


def variant(*segments: tuple[float, int]) -> Variant:
    return Variant(
        "720p", 1280, 720, "avc1.64001f", 25.0, tuple(Segment(f"s{i}", d, b) for i, (d, b) in enumerate(segments)), 4
    )


def test_the_peak_is_the_busiest_run_of_half_to_one_and_a_half_target_durations() -> None:
    # 4 s at 1 Mb/s, 4 s at 2 Mb/s, then a 0.2 s tail holding one big keyframe (5 Mb/s on its own): the tail
    # counts with the segment before it (4.2 s), not alone.
    busy = variant((4.0, 500_000), (4.0, 1_000_000), (0.2, 125_000))
    assert busy.peak_bps == round(1_125_000 * 8 / 4.2)
    assert busy.average_bps == round((500_000 + 1_000_000 + 125_000) * 8 / 8.2)
    # A 1.5 s video: no run reaches half the target duration, so the peak is the average.
    assert variant((1.5, 150_000)).peak_bps == variant((1.5, 150_000)).average_bps == 800_000
    # A 2 s segment and a 1 s tail: the tail counts with the segment before it (3 s, within 2 to 6 s).
    assert variant((2.0, 250_000), (1.0, 250_000)).peak_bps == round(500_000 * 8 / 3)


def test_codec_names_come_from_the_avcc_box() -> None:
    assert avc_codec(bytes([1, 0x64, 0x00, 0x1F, 0xFF])) == "avc1.64001f"
    with pytest.raises(ValueError, match="avcC"):
        avc_codec(b"\x00\x00\x00\x01\x67")  # Annex B start code, not an avcC record


def test_the_master_playlist_text() -> None:
    assert master_playlist([variant((4.0, 500_000))]).splitlines() == [
        "#EXTM3U",
        "#EXT-X-VERSION:7",
        "#EXT-X-INDEPENDENT-SEGMENTS",
        '#EXT-X-STREAM-INF:BANDWIDTH=1000000,AVERAGE-BANDWIDTH=1000000,CODECS="avc1.64001f",'
        "RESOLUTION=1280x720,FRAME-RATE=25.000",
        "720p/index.m3u8",
    ]


def test_packaging_copies_packets_and_names_only_relative_paths_of_local_mp4_inputs() -> None:
    argv = package_command("ffmpeg", ["720p", "360p"])
    assert argv.count("-c") == 2 and argv[argv.index("-c") + 1] == "copy"  # nothing is encoded
    assert argv.count("-protocol_whitelist") == argv.count("-i") == 2
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "-i"] == ["720p.mp4", "360p.mp4"]
    assert "hls/360p/seg-%05d.m4s" in argv and argv[-1] == "hls/360p/index.m3u8"
    assert not any(arg.startswith("/") for arg in argv[1:])


class FailingBucket(FileBlobStore):
    """A file bucket that fails with `error` on the first media segment."""

    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error
        self.keys: list[str] = []

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        self.keys.append(key)
        if key.endswith("seg-00000.m4s"):
            await asyncio.sleep(0)  # let the batch's other stores start
            raise self.error
        return await super().put_file(key, path)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(28, "No space left on device"), "No space left on device"),
        (Unavailable("S3 at http://s3 could not write it: connection refused"), "connection refused"),
    ],
)
async def test_a_package_the_bucket_cannot_take_is_retried_later_and_no_playlist_is_stored(
    packaged: dict[str, TranscodeResult], tmp_path: Path, error: Exception, said: str
) -> None:
    bucket = FailingBucket(tmp_path / "bucket", error)
    jobs = TranscodeJobs(bucket, EventSink.__new__(EventSink), ProcessingSettings(data_dir=tmp_path / "data"))
    with pytest.raises(RetryLater, match=rf"HLS segments could not be stored in the bucket \(.*{said}"):
        await jobs._store_hls("v1", packaged["landscape"].hls_dir, "0123456789ab")
    assert not any(key.endswith(".m3u8") for key in bucket.keys)  # playlists wait for their segments
