"""The transcoding core: the ffmpeg command, progress parsing, and real transcodes of tiny generated clips."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import pytest

from services.common.errors import InvalidInput
from services.common.media import ProcessTimeout, ffmpeg_exe, hardened_input_args
from services.processing.ffmpeg import Job, build_command, filter_graph, output_fps, scale_sources
from services.processing.ladder import plan_ladder, poster_size
from services.processing.progress import ProgressParser
from services.processing.transcode import (
    TranscodeError,
    UndecodableInput,
    UnsuitableInput,
    _verdict,
    transcode,
)
from tests.media import make_clip, probe_of

MAX_PIXELS = 7680 * 4320


# --- helpers -----------------------------------------------------------------------------------------------------


def inspect(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frame = next(container.decode(video=0))
        audio = container.streams.audio
        return {
            "size": (frame.width, frame.height),
            "rotation": frame.rotation,
            "sar": video.sample_aspect_ratio,
            "duration_s": (container.duration or 0) / 1_000_000,
            "audio": [(a.codec_context.name, a.codec_context.channels) for a in audio],
            "codec": video.codec_context.name,
        }


# The session's own servers (tests/s3.py starts SeaweedFS as a child of pytest): not a job's leftovers.
SESSION_SERVERS = {"weed"}


def children_of_this_process() -> list[int]:
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                name, rest = stat.read().split(" (", 1)[1].rsplit(")", 1)
                fields = rest.split()
        except (OSError, IndexError, ValueError):
            continue
        if fields[1] == me and fields[0] != "Z" and name not in SESSION_SERVERS:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "landscape": make_clip(folder / "landscape.mp4", 640, 360, 2),
        "portrait": make_clip(folder / "portrait.mp4", 640, 360, 2, audio=False, rotate=90),
        "uhd": make_clip(folder / "uhd.mp4", 3840, 2160, 1, audio=False, fps=10),
        "long": make_clip(folder / "long.mp4", 256, 144, 5),
    }


async def run(master: Path, out_dir: Path, renditions: list[str], **options: Any) -> Any:
    options.setdefault("threads", 2)
    options.setdefault("timeout_s", 60)
    return await transcode(
        master, out_dir, probe=probe_of(master), renditions=renditions, max_pixels=MAX_PIXELS, **options
    )


# --- real transcodes ---------------------------------------------------------------------------------------------


async def test_landscape_clip_gets_each_rung_with_audio_and_no_upscale(clips: dict[str, Path], tmp_path: Path) -> None:
    master = clips["landscape"]
    result = await run(master, tmp_path, ["720p", "360p", "144p"])

    assert result.skipped == ["720p"]
    assert [(r.name, r.width, r.height) for r in result.renditions] == [("360p", 640, 360), ("144p", 256, 144)]
    assert sorted(os.listdir(tmp_path)) == ["144p.mp4", "360p.mp4", "hls", "poster.jpg"]
    assert sorted(os.listdir(result.hls_dir)) == ["144p", "360p", "master.m3u8"]
    master_duration = inspect(master)["duration_s"]
    for rendition in result.renditions:
        facts = inspect(rendition.path)
        assert facts["size"] == (rendition.width, rendition.height)
        assert facts["codec"] == "h264" and facts["sar"] in (None, 1)
        assert facts["audio"] == [("aac", 2)]
        assert abs(facts["duration_s"] - master_duration) <= 0.1
        assert rendition.duration_s == pytest.approx(facts["duration_s"], abs=0.001)
        assert rendition.size_bytes == rendition.path.stat().st_size
        assert rendition.bitrate == pytest.approx(rendition.size_bytes * 8 / rendition.duration_s, rel=0.01)
    assert result.poster == tmp_path / "poster.jpg"
    assert result.poster.read_bytes()[:2] == b"\xff\xd8"
    assert inspect(result.poster)["size"] == (640, 360)
    assert result.elapsed_s > 0


async def test_rotated_phone_clip_comes_out_upright_portrait_without_audio(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    master = clips["portrait"]
    assert probe_of(master)["rotation"] in (90, -90, 270)
    result = await run(master, tmp_path, ["360p", "240p"])

    assert [(r.name, r.width, r.height) for r in result.renditions] == [("360p", 360, 640), ("240p", 240, 426)]
    for rendition in result.renditions:
        facts = inspect(rendition.path)
        assert facts["size"] == (rendition.width, rendition.height)
        assert facts["rotation"] == 0
        assert facts["audio"] == []
    poster = inspect(result.poster)
    assert poster["size"] == (360, 640) and poster["rotation"] == 0


async def test_4k_master_becomes_1080p_and_720p(clips: dict[str, Path], tmp_path: Path) -> None:
    started = time.monotonic()
    result = await run(clips["uhd"], tmp_path, ["1080p", "720p"])
    elapsed = time.monotonic() - started

    assert [(r.width, r.height) for r in result.renditions] == [(1920, 1080), (1280, 720)]
    assert inspect(result.poster)["size"] == (1280, 720)
    assert all(inspect(r.path)["audio"] == [] for r in result.renditions)
    print(f"4K 10 frames -> 1080p+720p+poster: {elapsed:.2f} s ({10 / elapsed:.1f} fps)")


async def test_progress_rises_to_100(clips: dict[str, Path], tmp_path: Path) -> None:
    reports: list[tuple[float, float]] = []
    await run(clips["long"], tmp_path, ["144p"], on_progress=lambda percent, speed: reports.append((percent, speed)))

    percents = [percent for percent, _ in reports]
    assert percents and percents[-1] == 100.0
    assert percents == sorted(percents)
    assert all(speed >= 0 for _, speed in reports)


async def test_a_failing_progress_listener_does_not_fail_the_job(clips: dict[str, Path], tmp_path: Path) -> None:
    def broken(percent: float, speed: float) -> None:
        raise RuntimeError("the bus is down")

    result = await run(clips["long"], tmp_path, ["144p"], on_progress=broken)
    assert [r.name for r in result.renditions] == ["144p"]


async def test_keyframes_every_two_seconds(clips: dict[str, Path], tmp_path: Path) -> None:
    result = await run(clips["long"], tmp_path, ["144p"])
    with av.open(str(result.renditions[0].path)) as container:
        stream = container.streams.video[0]
        assert stream.time_base is not None
        keyframes = {
            round(float(packet.pts * stream.time_base), 2)
            for packet in container.demux(stream)
            if packet.is_keyframe and packet.pts is not None
        }
    assert {0.0, 2.0, 4.0} <= keyframes


def junk(master: Path, target: Path) -> None:
    target.write_bytes(random.Random(1).randbytes(8000))


def damaged_middle(master: Path, target: Path) -> None:
    data = bytearray(master.read_bytes())
    start = len(data) // 3
    data[start : start + 2000] = random.Random(2).randbytes(2000)
    target.write_bytes(data)


@pytest.mark.parametrize("spoil", [junk, damaged_middle])
async def test_corrupt_input_fails_permanently_and_leaves_nothing(
    clips: dict[str, Path], tmp_path: Path, spoil: Callable[[Path, Path], None]
) -> None:
    master = tmp_path / "master.mp4"
    spoil(clips["landscape"], master)
    out_dir = tmp_path / "out"
    with pytest.raises(UndecodableInput) as caught:
        await transcode(
            master,
            out_dir,
            probe=probe_of(clips["landscape"]),
            renditions=["360p", "240p"],
            threads=2,
            timeout_s=30,
            max_pixels=MAX_PIXELS,
        )
    assert caught.value.permanent
    assert caught.value.reason.startswith("The video could not be decoded (")
    assert "Invalid data" in caught.value.reason
    assert os.listdir(out_dir) == []


async def wait_for_a_child(timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not children_of_this_process():
        assert time.monotonic() < deadline, "ffmpeg never started"
        await asyncio.sleep(0.02)


async def test_cancelling_kills_ffmpeg_and_leaves_nothing(clips: dict[str, Path], tmp_path: Path) -> None:
    job = asyncio.create_task(run(clips["uhd"], tmp_path, ["2160p", "1080p"], preset="veryslow"))
    await wait_for_a_child()
    await asyncio.sleep(0.3)
    assert not job.done()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert children_of_this_process() == []
    assert os.listdir(tmp_path) == []


async def test_a_job_past_its_time_limit_is_killed_and_leaves_nothing(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ProcessTimeout):
        await run(clips["uhd"], tmp_path, ["2160p", "1080p"], preset="veryslow", timeout_s=0.5)
    assert children_of_this_process() == []
    assert os.listdir(tmp_path) == []


async def test_a_source_smaller_than_every_rung_is_refused_before_ffmpeg(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(UnsuitableInput) as caught:
        await run(clips["long"], tmp_path / "out", ["720p", "240p"])
    assert caught.value.permanent and "smaller than every rendition" in caught.value.reason
    assert not (tmp_path / "out").exists()


async def test_a_malformed_probe_is_refused(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        await transcode(
            clips["long"],
            tmp_path,
            probe={"width": 256, "height": 144, "duration_s": "5"},
            renditions=["144p"],
            threads=1,
            timeout_s=10,
            max_pixels=MAX_PIXELS,
        )
    assert caught.value.field == "probe.duration_s"


# --- the command -------------------------------------------------------------------------------------------------


def make_job(*, width: int = 3840, height: int = 2160, rotation: int = 0, audio: bool = True, fps: float = 30) -> Job:
    plan = plan_ladder(width, height, rotation, ["1080p", "720p", "360p", "144p"])
    return Job(
        master=Path("/data/videos/v1/master.mp4"),
        work_dir=Path("/tmp/work"),
        rungs=plan.rungs,
        poster_size=poster_size(width, height, rotation),
        duration_s=10.0,
        has_audio=audio,
        fps=fps,
        threads=3,
    )


def test_command_hardens_the_input_and_maps_only_the_first_streams() -> None:
    hardening = hardened_input_args(MAX_PIXELS)
    argv = build_command(ffmpeg_exe(), make_job(), hardening)
    at_input = argv.index("-i")
    assert argv[at_input + 1] == "/data/videos/v1/master.mp4"
    assert argv.count("-i") == 1
    assert " ".join(hardening) in " ".join(argv[:at_input])
    maps = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-map"]
    assert set(maps) == {"[v0]", "[v1]", "[v2]", "[v3]", "[poster]", "0:a:0?"}
    assert maps.count("0:a:0?") == 4
    assert "[0:v:0]" in filter_graph(make_job())
    assert argv.count("-t") == 4 and argv.count("-fs") == 5
    assert argv.count("+faststart") == 4 and argv.count("expr:gte(t,n_forced*2)") == 4
    assert argv[-1] == "/tmp/work/poster.jpg"
    assert [arg for arg in argv if arg.endswith(".mp4")][1:] == [
        f"/tmp/work/{n}.mp4" for n in ("1080p", "720p", "360p", "144p")
    ]
    assert argv[argv.index("-progress") + 1] == "pipe:1"


def test_command_drops_audio_when_the_source_has_none() -> None:
    argv = build_command("ffmpeg", make_job(audio=False), [])
    assert "0:a:0?" not in argv and argv.count("-an") == 4 and "aac" not in argv


def test_filter_graph_scales_to_the_planned_sizes_with_square_pixels() -> None:
    graph = filter_graph(make_job(rotation=90))
    for size in ("1080:1920", "720:1280", "360:640", "144:256"):
        assert f"scale={size},setsar=1,format=yuv420p" in graph
    assert "scale=720:1280,setsar=1[poster]" in graph


def test_small_rungs_are_scaled_from_larger_outputs() -> None:
    rungs = make_job().rungs  # 1080p, 720p, 360p, 144p from 4K
    assert scale_sources(rungs) == [None, None, 1, 2]


def test_frame_rates_above_60_are_divided_down() -> None:
    assert output_fps(30) is None and output_fps(60) is None and output_fps(None) is None
    assert output_fps(120) == 60 and output_fps(240) == 60 and output_fps(100) == 50
    assert "fps=fps=60," in filter_graph(make_job(fps=120))
    assert "fps=fps=59.94," in filter_graph(make_job(fps=119.88 * 2))
    assert "fps=" not in filter_graph(make_job(fps=59.94))


# --- progress ----------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed_block(parser: ProgressParser, out_time_us: str, speed: str, progress: str = "continue") -> None:
    for line in ("frame=1\n", f"out_time_us={out_time_us}", "out_time_ms=0", f"speed={speed}", f"progress={progress}"):
        parser.feed(line)


def test_progress_is_reported_at_most_once_a_second_and_ends_at_100() -> None:
    clock = FakeClock()
    reports: list[tuple[float, float]] = []
    parser = ProgressParser(10.0, lambda p, s: reports.append((p, s)), clock=clock)

    feed_block(parser, "N/A", "N/A")
    clock.now = 0.5
    feed_block(parser, "2000000", "1.5x")
    clock.now = 1.0
    feed_block(parser, "5000000", " 2x")
    clock.now = 1.2
    feed_block(parser, "4000000", "2.5x")  # out of order: percent must not go back
    feed_block(parser, "9900000", "3x", progress="end")
    feed_block(parser, "9900000", "3x", progress="end")

    assert reports == [(50.0, 2.0), (100.0, 3.0)]


def test_progress_waits_a_second_after_the_start() -> None:
    """The `started` event already says 0 %: a report in the job's first second would say nothing new."""
    clock = FakeClock()
    reports: list[float] = []
    parser = ProgressParser(4.0, lambda p, s: reports.append(p), clock=clock)

    clock.now = 0.5
    feed_block(parser, "500000", "1x")
    assert reports == []
    clock.now = 1.0
    feed_block(parser, "1000000", "1x")
    assert reports == [25.0]


def test_progress_without_a_duration_still_ends_at_100() -> None:
    reports: list[float] = []
    parser = ProgressParser(0.0, lambda p, s: reports.append(p))
    feed_block(parser, "1000000", "1x")
    feed_block(parser, "2000000", "1x", progress="end")
    assert reports == [100.0]


def test_progress_ignores_garbage_lines() -> None:
    reports: list[float] = []
    parser = ProgressParser(4.0, lambda p, s: reports.append(p), min_interval_s=0)
    for line in ("", "nonsense", "out_time_us=-5", "speed=inf", "progress=continue"):
        parser.feed(line)
    assert reports == [0.0]


# --- verdicts ----------------------------------------------------------------------------------------------------


def test_ffmpeg_failures_are_sorted_into_transient_and_permanent() -> None:
    killed = _verdict(-9, "")
    full = _verdict(1, "[out#0/mp4 @ 0x1] Error writing trailer: No space left on device\n")
    broken = _verdict(183, "[vist#0:0/h264 @ 0x55] [dec:h264 @ 0x55] Invalid NAL unit size\nConversion failed!\n")
    assert type(killed) is TranscodeError and not killed.permanent
    assert type(full) is TranscodeError and not full.permanent and "No space left" in full.reason
    assert isinstance(broken, UndecodableInput) and broken.permanent
    assert "(Invalid NAL unit size)" in broken.reason and "0x55" not in broken.reason
