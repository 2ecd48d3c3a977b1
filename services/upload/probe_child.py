"""The probe itself, run as `python -m services.upload.probe_child PATH MAX_PIXELS MAX_DURATION_S`.

It prints one JSON line: `{"probe": {...}}` for a video we accept or `{"rejected": {"status", "reason"}}`.
`services.upload.probe` runs it under a memory limit and a timeout, so a decoder that crashes, hangs
or balloons takes only this process down. It trusts nothing in the file:

1. The file is opened here, once, as a descriptor, and PyAV reads it through ffmpeg's `fd:` protocol
   with `protocol_whitelist=fd`: a demuxer that tries to open anything else (a playlist entry, a
   concat sibling, an external mov track, a URL) has no protocol to do it with.
2. Then a seccomp filter (Linux x86-64/aarch64) makes `open`, `socket`, `connect`, `bind` and `exec`
   fail for the rest of the process's life, whatever ffmpeg or a bug in it tries.
3. `format_whitelist` admits only self-contained video containers, `codec_whitelist` and
   `max_pixels` go to the demuxer and to every decoder we open (options given to `av.open` do not
   reach decoders), and libavutil's `av_max_alloc` is set as the CLI's `-max_alloc` would.
4. Heads that are plainly playlists, manifests, concat lists, SDP or images are refused before any
   demuxer sees them; after opening, the rules no flag covers are checked in order: a video
   stream, whitelisted codecs, dimensions and duration from the headers (before any decoding), one
   decoded frame (which also carries the rotation), and the end of the file: seek to two seconds
   before the declared end, demux to the end, decode the last group of pictures; where it stops must
   agree with the declared duration (truncation), and no frame may come out corrupt (`-xerror`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import av
import av.error

from services.common.media import CODEC_WHITELIST, FORMAT_WHITELIST, MAX_ALLOC_BYTES

# How many packets may pass before the first video frame decodes (a frame-threaded decoder holds a few).
MAX_PACKETS_BEFORE_FIRST_FRAME = 500
# The tail check seeks this far before the declared end, then further back, then from the start (None).
TAIL_WINDOWS_S: tuple[float | None, ...] = (2.0, 20.0, None)
# The most video data from the last keyframe to the end that the tail check holds to decode.
MAX_TAIL_GOP_BYTES = 128 << 20
# `fd:` reads the one descriptor opened here; no file name or URL inside the upload can be opened through it.
PROTOCOL_WHITELIST = "fd"
ACCEPTED = "MP4/MOV, MKV/WebM, AVI, MPEG-TS, MPEG-PS, FLV, Ogg or ASF/WMV"


# PyAV imports these on first use; after the sandbox is in place no file, a module included, can be opened.
_LAZY_MODULES = ("av.subtitles.codeccontext", "av.subtitles.stream", "av.subtitles.subtitle")


@dataclass
class Rejected(Exception):
    status: int
    reason: str


def tolerance_s(declared_s: float) -> float:
    """How far the decoded end may fall short of (or run past) the declared duration."""
    return max(1.0, 0.01 * declared_s)


def main(argv: list[str] | None = None) -> int:
    path, max_pixels, max_duration_s = _parse(sys.argv[1:] if argv is None else argv)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    _limit_allocations()
    for module in _LAZY_MODULES:
        importlib.import_module(module)
    sandboxed = install_sandbox()
    try:
        answer: dict[str, Any] = {"probe": probe_fd(fd, max_pixels=max_pixels, max_duration_s=max_duration_s)}
    except Rejected as exc:
        answer = {"rejected": {"status": exc.status, "reason": exc.reason}}
    except MemoryError:
        answer = {"rejected": {"status": 422, "reason": _MEMORY_REASON}}
    answer["sandboxed"] = sandboxed
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


_MEMORY_REASON = "Reading the video needs more memory than allowed; it may be damaged or built to exhaust memory."


def _parse(args: list[str]) -> tuple[str, int, float]:
    if len(args) != 3:
        raise SystemExit("usage: python -m services.upload.probe_child PATH MAX_PIXELS MAX_DURATION_S")
    return args[0], int(args[1]), float(args[2])


def probe_fd(fd: int, *, max_pixels: int, max_duration_s: float) -> dict[str, Any]:
    head = os.pread(fd, 4096, 0)
    if not head:
        raise Rejected(415, "The file is empty; choose a video file and upload it again.")
    refuse_by_head(head)
    whitelists = {
        "codec_whitelist": ",".join(CODEC_WHITELIST),
        "max_pixels": str(max_pixels),
    }
    container_options = {
        "fd": str(fd),
        "protocol_whitelist": PROTOCOL_WHITELIST,
        "format_whitelist": ",".join(FORMAT_WHITELIST),
        **whitelists,
    }
    try:
        container = av.open("fd:", options=container_options)
    except av.error.FFmpegError as exc:
        raise not_opened(head, exc) from None
    with container:
        return check_container(container, whitelists, max_pixels=max_pixels, max_duration_s=max_duration_s)


def check_container(
    container: Any, whitelists: dict[str, str], *, max_pixels: int, max_duration_s: float
) -> dict[str, Any]:
    short = _short_format(container.format.name)
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    audios = list(container.streams.audio)
    if not videos:
        if audios:
            raise Rejected(415, "The file contains only audio; CatTube needs a video.")
        raise Rejected(415, f"The file is a {short} container without a video stream; upload a video.")
    video = videos[0]
    audio = audios[0] if audios else None
    video_codec = video.codec_context.name
    if video_codec not in CODEC_WHITELIST:
        raise Rejected(415, f"The video codec {video_codec} is not supported; use H.264, HEVC, VP9 or AV1.")
    if audio is not None and audio.codec_context.name not in CODEC_WHITELIST:
        raise Rejected(415, f"The audio codec {audio.codec_context.name} is not supported; use AAC, Opus, MP3 or FLAC.")

    width, height = video.codec_context.width, video.codec_context.height
    if width <= 0 or height <= 0:
        raise Rejected(422, "The video does not declare its picture size; the file looks damaged.")
    if width * height > max_pixels:
        raise Rejected(
            422, f"The video is {width}x{height}, more than the {max_pixels:,} pixels allowed; scale it down."
        )

    start_s = container.start_time / av.time_base if container.start_time is not None else 0.0
    # The video stream's own duration: a subtitle (or data) track may end long after the picture does,
    # and the container's duration covers it too. The container's is the upper bound packets may reach.
    declared_s = _declared_duration(container, video)
    if declared_s is None or declared_s <= 0:
        raise Rejected(422, "The video does not declare its duration; remux it (to MP4, say) and upload it again.")
    if declared_s > max_duration_s:
        raise Rejected(
            422, f"The video lasts {declared_s:.0f} s, longer than the {max_duration_s:.0f} s allowed; shorten it."
        )

    for stream in (video, audio):
        if stream is not None:
            stream.codec_context.options = dict(whitelists)
            # Two threads whatever the host: the memory a probe needs must not grow with the core count.
            stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = 2
    first = first_frame(container, video)
    upper_s = max(declared_s, _container_duration(container) or 0.0)
    end_s = decoded_end(container, video, audio, start_s=start_s, declared_s=declared_s, upper_s=upper_s)
    if end_s < declared_s - tolerance_s(declared_s):
        raise Rejected(
            422,
            f"The video stops after {end_s:.1f} s but declares {declared_s:.1f} s; "
            "the file looks truncated, upload it again.",
        )
    return {
        "container": short,
        "duration_s": round(declared_s, 3),
        "width": width,
        "height": height,
        "fps": _fps(video),
        # The codec's own name (`av1`, `mp3`), not the decoder's (`libdav1d`, `mp3float`).
        "video_codec": video.codec_context.codec.canonical_name,
        "audio_codec": audio.codec_context.codec.canonical_name if audio is not None else None,
        "rotation": _clockwise(first.rotation),
    }


def first_frame(container: Any, video: Any) -> Any:
    """Decode until the first video frame, or refuse: a video we cannot decode is no video."""
    try:
        for count, packet in enumerate(container.demux(video)):
            for frame in packet.decode():
                return _intact(frame)
            if count >= MAX_PACKETS_BEFORE_FIRST_FRAME:
                break
    except av.error.FFmpegError as exc:
        raise Rejected(422, f"The video could not be decoded ({_why(exc)}); the file looks damaged.") from None
    raise Rejected(422, "No video frame could be decoded; the file looks damaged or truncated.")


def decoded_end(
    container: Any, video: Any, audio: Any | None, *, start_s: float, declared_s: float, upper_s: float | None = None
) -> float:
    """Where the content really stops, in seconds from the start: the last group of pictures, decoded.

    Seek to shortly before the declared end and demux to the end of the file (cheap), keeping the video
    packets since the last keyframe; then decode only those. When the seek lands past the last keyframe
    (or the data stops long before the declared end) look again from further back, finally from the start.
    """
    upper_s = declared_s if upper_s is None else upper_s
    limit_s = upper_s + tolerance_s(upper_s)
    # Only the video and the first audio stream are demuxed and decoded: subtitles are never read.
    streams = [video] if audio is None else [video, audio]
    for window_s in TAIL_WINDOWS_S:
        back_s = declared_s if window_s is None else min(window_s, declared_s)
        with contextlib.suppress(av.error.FFmpegError):
            # A failed seek leaves us where we were: scanning on from there is slower, not wrong.
            container.seek(int((start_s + declared_s - back_s) / video.time_base), stream=video, backward=True)
        gop, packets_end_s = _last_gop(container, streams, video, start_s=start_s, limit_s=limit_s)
        if gop:
            break
    else:
        raise Rejected(422, "No complete picture was found near the end; the file looks truncated or damaged.")
    end_s = packets_end_s if audio is not None else 0.0
    frames = 0
    try:
        # One frame at a time: holding a group of 8K frames would take gigabytes.
        for packet in [*gop, None]:
            for frame in packet.decode() if packet is not None else video.codec_context.decode(None):
                _intact(frame)
                frames += 1
                end_s = max(end_s, _end(frame.pts, frame.duration, frame.time_base, start_s))
    except av.error.FFmpegError as exc:
        raise Rejected(
            422, f"The end of the video could not be decoded ({_why(exc)}); the file looks truncated or damaged."
        ) from None
    if not frames:
        raise Rejected(422, "The end of the video could not be decoded; the file looks truncated or damaged.")
    return end_s


def _last_gop(
    container: Any, streams: list[Any], video: Any, *, start_s: float, limit_s: float
) -> tuple[list[Any], float]:
    """Demux to the end: the video packets from the last keyframe on, and where the audio packets end."""
    gop: list[Any] = []
    gop_bytes = 0
    audio_end_s = 0.0
    try:
        for packet in container.demux(streams):
            if packet.size == 0 or packet.pts is None:
                continue  # the flush packets at the end of the file
            end_s = _end(packet.pts, packet.duration, packet.time_base, start_s)
            if end_s > limit_s:
                raise Rejected(
                    422,
                    f"The video runs past the {limit_s:.1f} s it declares; the file looks damaged, "
                    "remux it and upload it again.",
                )
            if packet.stream is not video:
                audio_end_s = max(audio_end_s, end_s)
                continue
            if packet.is_keyframe:
                gop, gop_bytes = [], 0
            if gop or packet.is_keyframe:
                gop.append(packet)
                gop_bytes += packet.size
            if gop_bytes > MAX_TAIL_GOP_BYTES:
                gop, gop_bytes = [], 0  # keyframes too far apart to hold a group: wait for the next one
    except av.error.FFmpegError as exc:
        raise Rejected(
            422, f"The end of the video could not be read ({_why(exc)}); the file looks truncated or damaged."
        ) from None
    return gop, audio_end_s


def _intact(frame: Any) -> Any:
    """Refuse a frame the decoder had to patch up, as `ffmpeg -xerror` does ("corrupt decoded frame")."""
    if frame.is_corrupt:
        raise Rejected(422, "The video has corrupt frames that cannot be decoded cleanly; the file looks damaged.")
    return frame


def _end(pts: int | None, duration: int | None, time_base: Any, start_s: float) -> float:
    if pts is None or time_base is None:
        return 0.0
    return float((pts + (duration or 0)) * time_base) - start_s


def _declared_duration(container: Any, video: Any) -> float | None:
    """The video stream's duration: its own header field, else Matroska's per-track DURATION tag, else the
    container's (which spans every stream, subtitles included)."""
    if video.duration is not None and video.duration > 0 and video.time_base is not None:
        return float(video.duration * video.time_base)
    tagged = _tag_seconds(video.metadata.get("DURATION") or video.metadata.get("duration"))
    if tagged is not None and tagged > 0:
        return tagged
    return _container_duration(container)


def _container_duration(container: Any) -> float | None:
    if container.duration is not None and container.duration > 0:
        return float(container.duration / av.time_base)
    return None


def _tag_seconds(value: str | None) -> float | None:
    """`HH:MM:SS.fffffffff` (what Matroska muxers write per track) in seconds; None if it is not that."""
    if not value:
        return None
    parts = value.strip().split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    total = hours * 3600 + minutes * 60 + seconds
    return total if math.isfinite(total) and total >= 0 else None


def _fps(video: Any) -> float:
    for rate in (video.average_rate, video.guessed_rate, video.base_rate):
        if rate is not None and rate > 0 and math.isfinite(float(rate)):
            return round(float(rate), 3)
    return 0.0


def _clockwise(rotation: float | int | None) -> int:
    """The display matrix's counter-clockwise angle as clockwise degrees (the `rotate` tag's sense)."""
    if not rotation:
        return 0
    return int(round(-float(rotation) / 90.0)) % 4 * 90


def _short_format(name: str) -> str:
    names = name.split(",")
    return next((n for n in FORMAT_WHITELIST if n in names), names[0])


def _why(exc: av.error.FFmpegError) -> str:
    return str(getattr(exc, "strerror", None) or exc).strip().rstrip(".").lower() or "unknown error"


# What a head of bytes says about files that must never reach a demuxer, and about broken ones.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP")
_AUDIO_MAGIC = (b"ID3", b"fLaC", b"#!AMR", b"MThd")
_CONTAINER_MAGIC = {
    b"\x1a\x45\xdf\xa3": "Matroska/WebM",
    b"FLV": "FLV",
    b"OggS": "Ogg",
    b"\x30\x26\xb2\x75\x8e\x66\xcf\x11": "ASF/WMV",
    b"\x00\x00\x01\xba": "MPEG-PS",
}


def refuse_by_head(head: bytes) -> None:
    """Refuse, before any demuxer runs, files that name other files or addresses, and images."""
    if container_kind(head) is not None:
        return
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"#extm3u") or b"#ext-x-" in text:
        raise Rejected(415, "The file is an HLS playlist, which only refers to other files; upload the video itself.")
    if b"<mpd" in text or b"urn:mpeg:dash" in text:
        raise Rejected(415, "The file is a DASH manifest, which only refers to other files; upload the video itself.")
    if text.startswith(b"ffconcat") or text.startswith(b"file ") or b"\nfile " in text:
        raise Rejected(415, "The file is a concat list, which only refers to other files; upload the video itself.")
    if text.startswith(b"v=0") or b"\nm=video" in text or b"\nc=in ip" in text:
        raise Rejected(415, "The file is an SDP description of a network stream; upload the video file itself.")
    if text.startswith((b"<?xml", b"<smil", b"[playlist]", b"<asx")) or b"rtsp://" in text[:512]:
        raise Rejected(415, "The file is a playlist or a reference to other media; upload the video itself.")
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise Rejected(415, "The file is an image, not a video; upload a video file.")


def not_opened(head: bytes, exc: av.error.FFmpegError) -> Rejected:
    """Why a file no accepted demuxer could open: a broken video (422) or no video at all (415)."""
    kind = container_kind(head)
    if kind is not None:
        return Rejected(
            422, f"The file looks like {kind} but cannot be read ({_why(exc)}); it may be truncated, upload it again."
        )
    if head.startswith(_AUDIO_MAGIC) or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1"):
        return Rejected(415, "The file is audio only; CatTube needs a video.")
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return Rejected(415, "The file is audio only; CatTube needs a video.")
    if _looks_like_text(head):
        return Rejected(415, f"The file is text, not a video; upload a video file ({ACCEPTED}).")
    return Rejected(415, f"The file is not a video format CatTube accepts; use {ACCEPTED}.")


def container_kind(head: bytes) -> str | None:
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "an MP4/MOV video"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "an AVI video"
    for magic, kind in _CONTAINER_MAGIC.items():
        if head.startswith(magic):
            return f"a {kind} file"
    if len(head) >= 377 and head[0] == head[188] == head[376] == 0x47:
        return "an MPEG-TS file"
    return None


def _looks_like_text(head: bytes) -> bool:
    try:
        sample = head.decode("utf-8")
    except UnicodeDecodeError:
        sample = head[:-4].decode("utf-8", "ignore") if len(head) > 4 else ""
        if len(sample) < len(head) // 2:
            return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in sample)


def _limit_allocations() -> None:
    """`av_max_alloc` in PyAV's own libavutil: no single allocation above the CLI's `-max_alloc`."""
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libavutil")}
        for path in paths:
            with contextlib.suppress(OSError, AttributeError):
                # dlopen of a loaded library hands back the loaded copy, whose limit is the one that counts.
                ctypes.CDLL(path).av_max_alloc(ctypes.c_size_t(MAX_ALLOC_BYTES))


# seccomp: once installed, these system calls fail with EPERM in every thread of this process.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED = {
    # open, openat, openat2, creat, open_by_handle_at, socket, socketpair, connect, bind, execve, execveat,
    # io_uring_setup (which can open files behind seccomp's back), ptrace, process_vm_readv/writev
    "x86_64": (2, 257, 437, 85, 304, 41, 53, 42, 49, 59, 322, 425, 101, 310, 311),
    "aarch64": (56, 437, 265, 198, 199, 203, 200, 221, 281, 425, 117, 270, 271),
}
_SECCOMP_SYSCALL = {"x86_64": 317, "aarch64": 277}
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | 1
_X32_SYSCALL_BIT = 0x40000000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """A classic-BPF seccomp filter: other architectures and the denied calls get EPERM, the rest pass."""
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    denied = _DENIED[machine]
    # Layout: [arch check][nr load][x32 check][one jeq per denied call] ALLOW DENY
    prog = [(ld_abs, 0, 0, 4)]
    after_arch = 2 + len(denied) + 1  # jumps from the arch check to DENY
    prog.append((jeq, 0, after_arch, _AUDIT_ARCH[machine]))
    prog.append((ld_abs, 0, 0, 0))
    prog.append((jge, len(denied) + 1, 0, _X32_SYSCALL_BIT))
    for index, nr in enumerate(denied):
        prog.append((jeq, len(denied) - index, 0, nr))
    prog.append((ret, 0, 0, _RET_ALLOW))
    prog.append((ret, 0, 0, _RET_EPERM))
    return prog


def install_sandbox() -> bool:
    """Forbid opening files, sockets and exec for the rest of this process; False where unsupported."""
    machine = platform.machine()
    if not sys.platform.startswith("linux") or machine not in _DENIED:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    program = seccomp_program(machine)
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), filters)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    flags = _SECCOMP_FILTER_FLAG_TSYNC
    done = libc.syscall(_SECCOMP_SYSCALL[machine], _SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
    return bool(done == 0)


if __name__ == "__main__":
    sys.exit(main())
