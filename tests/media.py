"""Tiny test clips made with the bundled ffmpeg (lavfi testsrc2 + sine), for any test to reuse."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import av

from services.common.media import ffmpeg_exe

_VIDEO_CODECS = {"mp4": "libx264", "mov": "libx264", "mkv": "libx264", "webm": "libvpx", "ts": "libx264"}
_AUDIO_CODECS = {"mp4": "aac", "mov": "aac", "mkv": "aac", "webm": "libopus", "ts": "aac"}


def ffmpeg(*args: str) -> None:
    """Run the bundled ffmpeg quietly; raise with its stderr on failure."""
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {done.stderr}")


def make_clip(
    path: Path,
    width: int,
    height: int,
    duration_s: float,
    audio: bool = True,
    rotate: int | None = None,
    fmt: str = "mp4",
    fps: int = 25,
) -> Path:
    """Write a `width`x`height` test pattern clip of `duration_s` (with a sine tone unless `audio=False`).

    `fmt` is one of mp4, mov, mkv, webm, ts. `rotate` (degrees) stores display rotation metadata, as a
    phone does for a portrait clip: the coded picture stays `width`x`height`.
    """
    args = ["-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r={fps}:d={duration_s}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:d={duration_s}"]
    args += ["-c:v", _VIDEO_CODECS[fmt], "-pix_fmt", "yuv420p"]
    if fmt == "webm":
        args += ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k"]
    else:
        args += ["-preset", "ultrafast"]
    if audio:
        args += ["-c:a", _AUDIO_CODECS[fmt]]
    if fmt == "ts":
        args += ["-f", "mpegts"]
    args.append(str(path))
    ffmpeg(*args)
    if rotate is not None:
        rotated = path.with_name(f"rotated-{path.name}")
        # -display_rotation is an input option that sets the display matrix on the copied stream.
        ffmpeg("-display_rotation", str(-rotate), "-i", str(path), "-map", "0", "-c", "copy", str(rotated))
        rotated.replace(path)
    return path


def make_audio(path: Path, duration_s: float = 1.0) -> Path:
    """An audio-only file; the codec follows the suffix (.m4a: AAC in MP4, .mp3: MP3, .ogg: Vorbis)."""
    codec = {".m4a": "aac", ".mp3": "libmp3lame", ".ogg": "libvorbis"}[path.suffix]
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:d={duration_s}", "-c:a", codec, str(path))
    return path


def make_image(path: Path, width: int = 64, height: int = 64) -> Path:
    """A single still picture (the format follows the suffix: .png, .jpg)."""
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=s={width}x{height}", "-frames:v", "1", "-update", "1", str(path))
    return path


def make_h264_bomb(path: Path, width: int, height: int, frames: int = 3) -> Path:
    """A tiny Matroska file whose H.264 stream declares `width`x`height` (multiples of 16).

    Hand-written SPS/PPS and IDR slice headers with almost no picture data: a few hundred bytes that
    make an unguarded decoder allocate full frames of the declared size (12000x12000 took 1.1 GB in
    the ffmpeg CLI here).
    """
    sps = _Bits()
    for value in (66, 0, 51):  # baseline profile, no constraints, level 5.1
        sps.u(8, value)
    for value in (0, 0, 2, 1):  # sps id, log2_max_frame_num - 4, poc type 2, one reference frame
        sps.ue(value)
    sps.u(1, 0)
    sps.ue(width // 16 - 1)
    sps.ue(height // 16 - 1)
    for bit in (1, 1, 0, 0):  # frame_mbs_only, direct_8x8_inference, no cropping, no VUI
        sps.u(1, bit)
    pps = _Bits()
    for value in (0, 0):
        pps.ue(value)
    pps.u(2, 0)  # CAVLC, no field pic order
    for value in (0, 0, 0):  # one slice group, one reference each way
        pps.ue(value)
    pps.u(3, 0)
    for value in (0, 0, 0):
        pps.se(value)
    pps.u(3, 0b100)  # deblocking control present, no constrained intra, no redundant pic count
    stream = _nal(7, sps) + _nal(8, pps)
    for index in range(frames):
        slice_ = _Bits()
        for value in (0, 7, 0):  # first_mb, I slice, pps id
            slice_.ue(value)
        slice_.u(4, 0)
        slice_.ue(index)  # idr_pic_id
        slice_.u(2, 0)
        slice_.se(0)
        slice_.ue(1)
        for _ in range(64):
            slice_.ue(0)
        stream += _nal(5, slice_)
    raw = path.with_name(f"{path.stem}.h264")
    raw.write_bytes(stream)
    # -max_pixels keeps ffmpeg's own stream analysis from allocating the frames while it remuxes.
    ffmpeg("-r", "25", "-f", "h264", "-max_pixels", "4096", "-i", str(raw), "-c", "copy", "-f", "matroska", str(path))
    raw.unlink()
    return path


class _Bits:
    """Just enough of an H.264 RBSP bit writer for make_h264_bomb."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, count: int, value: int) -> None:
        self.bits += [(value >> (count - 1 - i)) & 1 for i in range(count)]

    def ue(self, value: int) -> None:
        value += 1
        self.u(value.bit_length() - 1, 0)
        self.u(value.bit_length(), value)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def payload(self) -> bytes:
        bits = [*self.bits, 1]
        bits += [0] * (-len(bits) % 8)
        raw = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
        escaped = bytearray()
        zeros = 0
        for byte in raw:
            if zeros >= 2 and byte <= 3:
                escaped.append(3)
                zeros = 0
            escaped.append(byte)
            zeros = zeros + 1 if byte == 0 else 0
        return bytes(escaped)


def _nal(kind: int, bits: _Bits) -> bytes:
    return b"\x00\x00\x00\x01" + bytes([0x60 | kind]) + bits.payload()


def probe_of(path: Path) -> dict[str, Any]:
    """What the upload service's probe reports about one of our own (trusted) clips, read with PyAV
    directly (rotation comes from a decoded frame, as PyAV requires)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frame = next(container.decode(video=0))
        audio = container.streams.audio
        return {
            "width": video.width,
            "height": video.height,
            "rotation": frame.rotation,
            "duration_s": (container.duration or 0) / 1_000_000,
            "fps": float(video.average_rate or 0),
            "video_codec": video.codec_context.name,
            "audio_codec": audio[0].codec_context.name if audio else None,
        }


ASS_HEADER = """[Script Info]
ScriptType: v4.00+
PlayResX: 320
PlayResY: 180

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, BackColour, Bold, Italic, BorderStyle, Outline, Shadow, Alignment, \
MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,20,&H00FFFFFF,&H00000000,0,0,1,1,0,2,10,10,10,1

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""


def make_clip_with_subtitles(path: Path, duration_s: float, subtitles_end_s: float) -> Path:
    """An H.264 + AAC Matroska clip of `duration_s` with an ASS subtitle track whose last line ends at
    `subtitles_end_s` (after the picture, as credits or a late caption do): the container lasts that long."""
    subtitles = path.with_suffix(".ass")
    subtitles.write_text(
        ASS_HEADER
        + "Dialogue: 0,0:00:00.00,0:00:01.00,Default,,0,0,0,,Meow\n"
        + f"Dialogue: 0,0:00:00.50,{_ass_time(subtitles_end_s)},Default,,0,0,0,,The credits roll on\n"
    )
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=s=160x96:r=25:d={duration_s}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:d={duration_s}",
        "-i", str(subtitles), "-map", "0", "-map", "1", "-map", "2",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-c:s", "ass", str(path),
    )  # fmt: skip
    subtitles.unlink()
    return path


def _ass_time(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}.{int(round((seconds - whole) * 100)):02d}"
