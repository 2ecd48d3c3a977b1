"""Run one transcoding job: master in, every requested rendition and a poster out, or nothing at all.

    result = await transcode(
        master, out_dir, probe=event["data"]["probe"], renditions=["1080p", "720p"],
        threads=2, timeout_s=3600, max_pixels=7680 * 4320, on_progress=report,
    )
    result.renditions  # [Rendition(name="1080p", width=1920, height=1080, bitrate=..., path=out_dir/"1080p.mp4", ...)]
    result.hls_master  # out_dir/"hls"/"master.m3u8", beside hls/1080p/index.m3u8, init.mp4, seg-00000.m4s, ...

ffmpeg writes into a fresh hidden directory inside `out_dir` (same filesystem, so the final
`os.replace` is atomic): one run decodes the master once and encodes every rung and the poster,
then a second one cuts the rungs' MP4s into HLS segments without decoding them
(`services.processing.hls`). Only when both exit cleanly and every output has been measured are
the files moved to `out_dir/{rendition}.mp4`, `out_dir/poster.jpg` and `out_dir/hls/`. Whatever happens
otherwise (a decode error, a timeout, the task being cancelled) the hidden directory is
removed, so a failed job leaves no partial outputs, and `run_process` has already killed
ffmpeg's process group.

Verdicts, for the worker to turn into ack/nack:

    TranscodeError            transient: running the job again may work (disk full, ffmpeg killed)
     ├── UndecodableInput     permanent: ffmpeg could not decode the master
     └── UnsuitableInput      permanent: nothing to encode, too large, or outputs past their limits
    ProcessTimeout            (services.common.media) the job ran past `timeout_s`; ffmpeg was killed
    InvalidInput              (services.common.errors) an unknown rendition name or a malformed probe

Each carries `reason`, a sentence a person can act on (it becomes the `failed` event's reason).
Renditions are measured from the files written (PyAV reading our own outputs, which are
trusted), so the sizes, durations and bitrates reported are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

from services.common.errors import InvalidInput
from services.common.media import ProcessResult, ffmpeg_exe, hardened_input_args, run_process
from services.processing import hls
from services.processing.ffmpeg import POSTER_NAME, Job, build_command, output_fps, rendition_name, size_limit_bytes
from services.processing.ladder import RUNG_NAMES, Rung, plan_ladder, poster_size
from services.processing.progress import ProgressParser

log = logging.getLogger(__name__)

# ffmpeg failures that say nothing about the master: worth another attempt.
_TRANSIENT_ERRORS = ("No space left on device", "Input/output error", "Too many open files", "Resource temporarily")
# ffmpeg prefixes lines with the component(s) that logged them: "[vist#0:0/h264 @ 0x55..] [dec:h264 @ 0x55..] ".
_LOG_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*)+")
# Lines that only say that something failed, not what: skipped when choosing the reason to show.
_NOISE = ("Terminating thread", "Task finished", "Error opening input file", "Conversion failed")


class TranscodeError(Exception):
    """The job did not finish; running it again may work (`permanent` is False)."""

    permanent = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UndecodableInput(TranscodeError):
    """ffmpeg could not decode the master: running it again would fail the same way."""

    permanent = True


class UnsuitableInput(TranscodeError):
    """The master decodes but cannot give what was asked (too small, too large, outputs past their limits)."""

    permanent = True


@dataclass(frozen=True)
class Rendition:
    """One finished output, as measured from the file. `bitrate` is its average, in bits/s, audio included."""

    name: str
    width: int
    height: int
    bitrate: int
    path: Path
    size_bytes: int
    duration_s: float


@dataclass(frozen=True)
class TranscodeResult:
    renditions: list[Rendition]
    skipped: list[str]
    """Requested names larger than the source: not encoded, never upscaled."""
    poster: Path
    elapsed_s: float
    hls_dir: Path
    """The HLS package: `master.m3u8` and one folder per rung (`services.processing.hls`)."""

    @property
    def hls_master(self) -> Path:
        return self.hls_dir / hls.MASTER_NAME


@dataclass(frozen=True)
class _Probe:
    width: int
    height: int
    rotation: float
    duration_s: float
    fps: float | None
    has_audio: bool


async def transcode(
    master: Path,
    out_dir: Path,
    *,
    probe: Mapping[str, Any],
    renditions: Sequence[str],
    threads: int,
    preset: str = "veryfast",
    timeout_s: float,
    max_pixels: int,
    on_progress: Callable[[float, float], None] | None = None,
    ffmpeg: str | None = None,
    memory_limit_bytes: int | None = None,
) -> TranscodeResult:
    """Encode `master` into the requested `renditions` (ladder names) and a poster, in `out_dir`.

    `probe` is the upload event's probe (`width`, `height`, `rotation`, `duration_s`, `fps`,
    `audio_codec`). `on_progress(percent, speed)` is called at most once a second and last with
    100.0. `threads` goes to ffmpeg (see `services.processing.ffmpeg`); `timeout_s` bounds the
    encode and the packaging together; `memory_limit_bytes` caps each ffmpeg's address space.
    """
    started = time.monotonic()
    source = _read_probe(probe)
    if source.width * source.height > max_pixels:
        raise UnsuitableInput(
            f"The video is {source.width}x{source.height}, more than the {max_pixels} pixels a frame may have here."
        )
    plan = plan_ladder(source.width, source.height, source.rotation, renditions, fps=_encoded_fps(source.fps))
    if not plan.rungs:
        raise UnsuitableInput(
            f"The video is {source.width}x{source.height}, smaller than every rendition asked for "
            f"({', '.join(plan.skipped)}); ask for a smaller one."
        )
    work_dir = _make_work_dir(master, out_dir)
    try:
        job = Job(
            master=master,
            work_dir=work_dir,
            rungs=plan.rungs,
            poster_size=poster_size(source.width, source.height, source.rotation),
            duration_s=source.duration_s,
            has_audio=source.has_audio,
            fps=source.fps,
            threads=threads,
            preset=preset,
        )
        argv = build_command(ffmpeg_exe(ffmpeg), job, hardened_input_args(max_pixels))
        parser = ProgressParser(source.duration_s, _guarded(on_progress)) if on_progress else None
        log.info("transcoding %s into %s", master, ",".join(rung.name for rung in plan.rungs))
        result = await run_process(
            argv,
            timeout_s=timeout_s,
            memory_limit_bytes=memory_limit_bytes,
            on_stdout_line=parser.feed if parser else None,
        )
        if result.returncode != 0:
            raise _verdict(result.returncode, result.stderr_tail)
        measured = await asyncio.to_thread(_measure_all, job)
        remaining_s = timeout_s - (time.monotonic() - started)
        await _package(
            job, measured, ffmpeg_exe(ffmpeg), timeout_s=max(remaining_s, 1.0), memory_limit_bytes=memory_limit_bytes
        )
        # No await from here on: once packaged, the outputs move to their final names without a
        # cancellation point in between, so a job is either wholly published or not at all.
        _publish(job, out_dir)
    finally:
        # Synchronous on purpose: it must run to the end even if this task is cancelled again.
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed_s = time.monotonic() - started
    log.info("transcoded %s in %.1f s", master, elapsed_s)
    return TranscodeResult(
        renditions=[_finished(m, out_dir) for m in measured],
        skipped=list(plan.skipped),
        poster=out_dir / POSTER_NAME,
        elapsed_s=elapsed_s,
        hls_dir=out_dir / hls.HLS_DIR,
    )


def _make_work_dir(master: Path, out_dir: Path) -> Path:
    if not master.is_file():
        raise FileNotFoundError(f"master {master} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".transcode-", dir=out_dir))


def _publish(job: Job, out_dir: Path) -> None:
    """Move every output from the work directory to its final name (atomic renames, same filesystem)."""
    poster = job.work_dir / POSTER_NAME
    if not poster.is_file() or poster.stat().st_size == 0:
        raise UnsuitableInput(
            "The video ended before its declared duration, so no poster frame could be taken; upload it again."
        )
    moves = [(job.work_dir / rendition_name(rung), out_dir / rendition_name(rung)) for rung in job.rungs]
    # A package left by an earlier run into the same `out_dir`: a directory is only replaced when empty.
    shutil.rmtree(out_dir / hls.HLS_DIR, ignore_errors=True)
    for temporary, final in [
        *moves,
        (poster, out_dir / POSTER_NAME),
        (job.work_dir / hls.HLS_DIR, out_dir / hls.HLS_DIR),
    ]:
        os.replace(temporary, final)


def _read_probe(probe: Mapping[str, Any]) -> _Probe:
    def number(key: str, *, required: bool = True) -> float | None:
        value = probe.get(key)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInput(f"probe.{key}", "a number")
        return float(value)

    width, height = number("width"), number("height")
    duration_s = number("duration_s")
    assert width is not None and height is not None and duration_s is not None
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise InvalidInput("probe.width", "positive whole pixel counts for width and height")
    if duration_s <= 0:
        raise InvalidInput("probe.duration_s", "a positive duration in seconds")
    fps = number("fps", required=False)
    return _Probe(
        width=int(width),
        height=int(height),
        rotation=number("rotation", required=False) or 0.0,
        duration_s=duration_s,
        fps=fps if fps and fps > 0 else None,
        has_audio=bool(probe.get("audio_codec")),
    )


def _encoded_fps(fps: float | None) -> float | None:
    """The frame rate the outputs will have, which sets their bitrate caps."""
    return output_fps(fps) or fps


def _guarded(on_progress: Callable[[float, float], None]) -> Callable[[float, float], None]:
    """A progress listener that fails must not fail the transcode it listens to."""

    def call(percent: float, speed: float) -> None:
        try:
            on_progress(percent, speed)
        except Exception:
            log.exception("progress callback failed")

    return call


def _verdict(returncode: int, stderr_tail: str) -> TranscodeError:
    """Classify a failed ffmpeg run: environment trouble is transient, anything else is the input's."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in stderr_tail.splitlines()]
    lines = [line for line in lines if line]
    telling = [line for line in lines if not line.startswith(_NOISE)]
    detail = (telling or lines or [f"exit status {returncode}"])[-1]
    log.warning("ffmpeg failed (%s): %s", returncode, " | ".join(lines[-5:]))
    if returncode < 0:
        return TranscodeError(f"ffmpeg was stopped by signal {-returncode} (perhaps out of memory); try again.")
    if any(marker in stderr_tail for marker in _TRANSIENT_ERRORS):
        return TranscodeError(f"ffmpeg could not write its outputs ({detail}); try again.")
    return UndecodableInput(
        f"The video could not be decoded ({detail}); the file may be damaged or in an unsupported format: "
        "export it again (H.264 in MP4 plays everywhere) and upload it again."
    )


async def _package(
    job: Job, measured: Sequence[_Measured], exe: str, *, timeout_s: float, memory_limit_bytes: int | None
) -> None:
    """Cut the finished MP4s into HLS segments (packets copied, nothing encoded) and write the master playlist."""
    hls_dir = job.work_dir / hls.HLS_DIR
    for rung in job.rungs:
        (hls_dir / rung.name).mkdir(parents=True)
    argv = hls.package_command(exe, [rung.name for rung in job.rungs])
    result = await run_process(argv, timeout_s=timeout_s, memory_limit_bytes=memory_limit_bytes, cwd=job.work_dir)
    if result.returncode != 0:
        # Our own outputs, just measured: whatever went wrong is not the master's fault.
        raise TranscodeError(f"The renditions could not be cut into HLS segments ({_detail(result)}); try again.")
    try:
        variants = [
            hls.measure_variant(
                hls_dir, m.rung.name, width=m.width, height=m.height, codecs=m.codecs, frame_rate=m.frame_rate
            )
            for m in measured
        ]
    except (OSError, ValueError) as exc:
        raise TranscodeError(f"The HLS packaging left an unreadable playlist ({exc}); try again.") from exc
    (hls_dir / hls.MASTER_NAME).write_text(hls.master_playlist(variants), encoding="utf-8")


def _detail(result: ProcessResult) -> str:
    lines = [_LOG_PREFIX.sub("", line).strip() for line in result.stderr_tail.splitlines()]
    return ([line for line in lines if line] or [f"exit status {result.returncode}"])[-1]


@dataclass(frozen=True)
class _Measured:
    rung: Rung
    width: int
    height: int
    size_bytes: int
    duration_s: float
    codecs: str
    """RFC 6381 codec names, as a master playlist's CODECS lists them (`avc1.64001f,mp4a.40.2`)."""
    frame_rate: float | None


def _measure_all(job: Job) -> list[_Measured]:
    measured = []
    for rung in job.rungs:
        path = job.work_dir / rendition_name(rung)
        if not path.is_file():
            raise UndecodableInput(f"ffmpeg wrote no {rung.name} output; the video may have no picture.")
        size_bytes = path.stat().st_size
        if size_bytes >= size_limit_bytes(rung, job.duration_s):
            raise UnsuitableInput(f"The {rung.name} output grew past its size limit; the video may be damaged.")
        facts = _measure(path)
        if (facts.width, facts.height) != (rung.width, rung.height):
            log.warning("%s came out %sx%s, planned %sx%s", path, facts.width, facts.height, rung.width, rung.height)
        measured.append(
            _Measured(rung, facts.width, facts.height, size_bytes, facts.duration_s, facts.codecs, facts.frame_rate)
        )
    return measured


@dataclass(frozen=True)
class _Facts:
    width: int
    height: int
    duration_s: float
    codecs: str
    frame_rate: float | None


def _measure(path: Path) -> _Facts:
    """What one of our own outputs holds: its size, duration, codecs and frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration_s = (container.duration or 0) / 1_000_000
        if duration_s <= 0 and stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        codecs = hls.avc_codec(stream.codec_context.extradata or b"")
        if container.streams.audio:
            codecs += f",{hls.AAC_LC}"
        rate = stream.average_rate
        return _Facts(stream.width, stream.height, duration_s, codecs, float(rate) if rate else None)


def _finished(measured: _Measured, out_dir: Path) -> Rendition:
    duration_s = measured.duration_s
    bitrate = round(measured.size_bytes * 8 / duration_s) if duration_s > 0 else 0
    return Rendition(
        name=measured.rung.name,
        width=measured.width,
        height=measured.height,
        bitrate=bitrate,
        path=out_dir / rendition_name(measured.rung),
        size_bytes=measured.size_bytes,
        duration_s=round(duration_s, 3),
    )


__all__ = [
    "RUNG_NAMES",
    "Rendition",
    "TranscodeError",
    "TranscodeResult",
    "UndecodableInput",
    "UnsuitableInput",
    "transcode",
]
