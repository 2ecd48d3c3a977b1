"""The safe probe of an uploaded file: is it a self-contained video we accept, and what is in it?

    probe = await probe_file(path, max_pixels=7680 * 4320, max_duration_s=21600)
    event_data["probe"] = probe.as_event_data().dump()

`ProbeRejected` carries a status (415: not a video at all; 422: a video, but broken or too big) and a
reason a person can act on.

Why a child process, and why PyAV in it rather than the ffmpeg binary: the imageio-ffmpeg wheel has
no ffprobe, and `ffmpeg -i` prints its findings as prose on stderr, which would have to be parsed.
PyAV hands over the same libavformat facts as values, reports the rotation on the decoded frame
(`VideoFrame.rotation`), and can seek to the last second and decode only there, which is how a
truncated upload is caught without decoding the whole file. PyAV runs in-process, though, so every
probe runs in `python -m services.upload.probe_child` under `RLIMIT_AS` and a timeout: a decoder that
crashes, hangs or balloons takes only the child down, and the child's own defences (an `fd:`-only
protocol whitelist, a seccomp filter forbidding open/socket/exec, the container and codec whitelists,
`max_pixels`, `av_max_alloc`) are described in that module. Measured on the 2-core dev machine: a
1280x720 5 s H.264+AAC MP4 probes in ~0.2 s end to end (child peak RSS ~60 MB, runs in 165 MiB of
address space); a 7680x4320 2 s one in ~2.4 s (~390 MB RSS, needs ~500 MiB), hence the 1 GiB default.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import services
from services.common import contract
from services.common.media import ProcessTimeout, run_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """What the probe found in an accepted video.

    `container` is the short ffmpeg demuxer name that matched the whitelist (`mov` for MP4/MOV,
    `matroska` for MKV/WebM, `avi`, `mpegts`, `mpeg`, `flv`, `ogg`, `asf`), usable as `ffmpeg -f`.
    `width`/`height` are the coded size of the first video stream; `rotation` is how far, clockwise,
    the picture is turned for display (0, 90, 180 or 270; 90 for a phone held upright), so the
    displayed size swaps width and height when it is 90 or 270.
    """

    container: str
    duration_s: float
    width: int
    height: int
    fps: float
    video_codec: str
    audio_codec: str | None
    rotation: int

    def as_event_data(self) -> contract.Probe:
        """The `probe` object of `cattube.video.uploaded` (docs/architecture.md, Events)."""
        return contract.Probe(
            duration_s=self.duration_s,
            width=self.width,
            height=self.height,
            fps=self.fps,
            video_codec=self.video_codec,
            audio_codec=self.audio_codec,
            rotation=self.rotation,
        )


class ProbeRejected(Exception):
    """The file is not a self-contained video we accept.

    `status` is 415 when it is no video at all (another container, a playlist or manifest, an image,
    audio only) and 422 when it is a video that is broken (truncated, undecodable) or too large or too
    long; `reason` is a sentence a person can act on.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def probe_file(
    path: Path,
    *,
    max_pixels: int,
    max_duration_s: float,
    timeout_s: float = 30.0,
    memory_limit_bytes: int = 1 << 30,
    ffmpeg: str | None = None,
) -> Probe:
    """Probe `path` in a sandboxed child process; return what it holds or raise `ProbeRejected`.

    `max_pixels` and `max_duration_s` are checked from the headers before anything is decoded. The
    child gets `timeout_s` and `memory_limit_bytes` of address space; past either the file is
    refused (422). `ffmpeg` is accepted for symmetry with the transcoder's settings and unused: the
    probe decodes with PyAV's libraries, not a binary.

        try:
            probe = await probe_file(path, max_pixels=settings.max_pixels, max_duration_s=settings.max_duration_s)
        except ProbeRejected as exc:
            raise UnsupportedMedia(exc.reason) if exc.status == 415 else InvalidInput("file", exc.reason)
    """
    del ffmpeg
    argv = _child_argv(path, max_pixels, max_duration_s)
    lines: list[str] = []
    try:
        result = await run_process(
            argv,
            timeout_s=timeout_s,
            memory_limit_bytes=memory_limit_bytes,
            on_stdout_line=lambda line: _keep_last(lines, line),
            env=_child_env(),
        )
    except ProcessTimeout:
        log.warning("probe of %s timed out after %s s", path, timeout_s)
        raise ProbeRejected(
            422, f"Reading the video took longer than {timeout_s:g} s; it may be damaged, upload it again."
        ) from None
    answer = _answer(lines)
    if answer is None:
        log.warning("probe child for %s exited %s without an answer: %s", path, result.returncode, result.stderr_tail)
        if "MemoryError" in result.stderr_tail or "Cannot allocate memory" in result.stderr_tail:
            raise ProbeRejected(422, "Reading the video needs more memory than allowed; it may be damaged.")
        raise ProbeRejected(422, "The video could not be read (the decoder failed); the file may be damaged.")
    if not answer.get("sandboxed"):
        log.info("probe of %s ran without the seccomp sandbox (unsupported platform)", path)
    if "rejected" in answer:
        rejected = answer["rejected"]
        raise ProbeRejected(int(rejected["status"]), str(rejected["reason"]))
    found = answer["probe"]
    return Probe(
        container=str(found["container"]),
        duration_s=float(found["duration_s"]),
        width=int(found["width"]),
        height=int(found["height"]),
        fps=float(found["fps"]),
        video_codec=str(found["video_codec"]),
        audio_codec=None if found["audio_codec"] is None else str(found["audio_codec"]),
        rotation=int(found["rotation"]),
    )


def _child_argv(path: Path, max_pixels: int, max_duration_s: float) -> list[str]:
    # An absolute path: the child's working directory is no business of the caller's.
    absolute = os.path.abspath(path)
    return [sys.executable, "-m", "services.upload.probe_child", absolute, str(max_pixels), repr(float(max_duration_s))]


def _keep_last(lines: list[str], line: str) -> None:
    # Only the answer matters; whatever else reaches stdout must not pile up.
    lines.append(line)
    del lines[:-4]


def _answer(lines: list[str]) -> dict[str, Any] | None:
    for line in reversed(lines):
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and ("probe" in answer or "rejected" in answer):
            return answer
    return None


def _child_env() -> dict[str, str]:
    # The child imports this package by name; this makes that work whatever the working directory.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(services.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # Fewer malloc arenas: each decoder thread would otherwise reserve 64 MiB of address space.
    env["MALLOC_ARENA_MAX"] = "2"
    return env
