"""HLS (CMAF: fragmented MP4 segments) packaged from the renditions the encode just wrote, with no second encode.

    argv = package_command(exe, ["720p", "360p"])        # run in the job's work directory, after the encode
    variants = [measure_variant(work_dir / "hls", "720p", width=..., height=..., codecs=..., frame_rate=...), ...]
    (work_dir / "hls" / MASTER_NAME).write_text(master_playlist(variants))

What a job leaves, beside the MP4 renditions (which stay, for download):

    hls/master.m3u8                    the multivariant playlist: one EXT-X-STREAM-INF per rung
    hls/{rung}/index.m3u8              a VOD media playlist (EXT-X-PLAYLIST-TYPE:VOD ... EXT-X-ENDLIST)
    hls/{rung}/init.mp4                the initialization segment (EXT-X-MAP)
    hls/{rung}/seg-00000.m4s, ...      media segments of SEGMENT_S seconds (the last one shorter)

Why packaging rather than a `tee` output on the encode: the tee muxer has no file of its own, so
ffmpeg's `-fs` size limit never fires on it (tried here with 9.0.2), and `-fs` is part of what
bounds a hostile master (docs/architecture.md, "Untrusted media"). The encode keeps its plain MP4
outputs and their limits; a second ffmpeg then copies each MP4's packets into segments (`-c copy`:
nothing is decoded or encoded; ~0.03 CPU s for three 4 s rungs here, against ~2.8 s for the encode),
reading only our own outputs, with inputs limited to local MP4 files all the same.

Alignment: the encode forces an IDR frame at every multiple of the keyframe interval (2 s, by
timestamp, so the same instants in every rung), and x264's GOPs are closed. ffmpeg's HLS muxer cuts
a segment at the first keyframe at or after each multiple of `hls_time`; with `SEGMENT_S` a
multiple of the keyframe interval that keyframe is the forced one, so every segment of every rung
starts with an IDR frame at the same time, and a player can switch rungs at any boundary.

The master playlist is written here, not by ffmpeg (`-master_pl_name`), because the HLS spec
(RFC 8216 §4.3.4.2) wants BANDWIDTH to be the peak segment bit rate and AVERAGE-BANDWIDTH the
average, which only the written segments can tell (ffmpeg uses the encoder's declared rate, and a
capped-CRF encode declares none).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.common import contract
from services.processing.ffmpeg import KEYFRAME_INTERVAL_S

SEGMENT_S: Final = 4
assert SEGMENT_S % KEYFRAME_INTERVAL_S == 0, "segments must start on the encode's forced keyframes"
HLS_DIR: Final = "hls"
MASTER_NAME: Final = contract.HLS_MASTER
MEDIA_NAME: Final = contract.HLS_MEDIA_PLAYLIST
INIT_NAME: Final = contract.HLS_INIT
SEGMENT_TEMPLATE: Final = contract.HLS_SEGMENT_TEMPLATE
HLS_VERSION: Final = 7  # what ffmpeg writes in the media playlists (fMP4 segments need at least 6)
AAC_LC: Final = "mp4a.40.2"  # ffmpeg's native AAC encoder writes Low Complexity AAC

_EXTINF = re.compile(r"#EXTINF:([0-9]+(?:\.[0-9]+)?),")


@dataclass(frozen=True)
class Segment:
    name: str
    duration_s: float
    size_bytes: int


@dataclass(frozen=True)
class Variant:
    """One rung as the master playlist lists it."""

    name: str
    width: int
    height: int
    codecs: str
    frame_rate: float | None
    segments: tuple[Segment, ...]
    target_duration_s: int

    @property
    def average_bps(self) -> int:
        """Every segment's bits over the whole duration (AVERAGE-BANDWIDTH)."""
        seconds = sum(s.duration_s for s in self.segments)
        return round(sum(s.size_bytes for s in self.segments) * 8 / seconds) if seconds > 0 else 0

    @property
    def peak_bps(self) -> int:
        """The peak segment bit rate (BANDWIDTH), as Apple's HLS authoring spec measures it: the highest bit
        rate of any run of consecutive segments lasting 0.5 to 1.5 times the target duration, so that a
        short last segment holding a keyframe does not count as a peak of its own."""
        low, high = 0.5 * self.target_duration_s, 1.5 * self.target_duration_s
        peak = 0.0
        for start in range(len(self.segments)):
            seconds = bits = 0.0
            for segment in self.segments[start:]:
                seconds += segment.duration_s
                bits += segment.size_bytes * 8
                if seconds > high:
                    break
                if seconds >= low:
                    peak = max(peak, bits / seconds)
        if peak == 0.0:  # shorter than half a target duration altogether
            return self.average_bps
        return round(peak)


def package_command(exe: str, names: Sequence[str]) -> list[str]:
    """The argv that cuts `{name}.mp4` of each rung into `hls/{name}/`; paths are relative to the work directory.

    Relative paths on purpose: the segment name is a template (`%05d`), and a `%` in the data
    directory's path would otherwise be read as part of it.
    """
    argv = [exe, "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    for name in names:
        # Our own outputs, but inputs all the same: local MP4 files only. Their headers say everything a copy
        # needs, so no frames are decoded to guess at stream facts (a third of this run's CPU; same bytes out).
        argv += ["-protocol_whitelist", "file", "-format_whitelist", "mov", "-nofind_stream_info", "-i", f"{name}.mp4"]
    for i, name in enumerate(names):
        folder = f"{HLS_DIR}/{name}"
        argv += [
            "-map", f"{i}:v:0", "-map", f"{i}:a:0?", "-c", "copy",
            "-f", "hls", "-hls_time", str(SEGMENT_S), "-hls_playlist_type", "vod",
            "-hls_segment_type", "fmp4", "-hls_fmp4_init_filename", INIT_NAME,
            "-hls_flags", "independent_segments",
            "-hls_segment_filename", f"{folder}/{SEGMENT_TEMPLATE}",
            f"{folder}/{MEDIA_NAME}",
        ]  # fmt: skip
    return argv


def read_segments(playlist: Path) -> tuple[tuple[Segment, ...], int]:
    """The segments a media playlist we wrote lists, with their sizes, and its EXT-X-TARGETDURATION."""
    segments: list[Segment] = []
    target = 0
    duration: float | None = None
    for line in playlist.read_text(encoding="utf-8").splitlines():
        if line.startswith("#EXT-X-TARGETDURATION:"):
            target = int(line.partition(":")[2])
        elif match := _EXTINF.match(line):
            duration = float(match.group(1))
        elif line and not line.startswith("#"):
            if duration is None or "/" in line:
                raise ValueError(f"{playlist}: unexpected line {line!r}")
            segments.append(Segment(line, duration, (playlist.parent / line).stat().st_size))
            duration = None
    if not segments or target <= 0:
        raise ValueError(f"{playlist} lists no segments or no target duration")
    return tuple(segments), target


def measure_variant(
    hls_dir: Path, name: str, *, width: int, height: int, codecs: str, frame_rate: float | None
) -> Variant:
    segments, target = read_segments(hls_dir / name / MEDIA_NAME)
    return Variant(name, width, height, codecs, frame_rate, segments, target)


def avc_codec(avcc: bytes) -> str:
    """The RFC 6381 name of an H.264 stream (`avc1.64001f`: profile, constraint flags, level) from its avcC box."""
    if len(avcc) < 4 or avcc[0] != 1:
        raise ValueError("not an avcC (AVCDecoderConfigurationRecord) box")
    return f"avc1.{avcc[1]:02x}{avcc[2]:02x}{avcc[3]:02x}"


def master_playlist(variants: Sequence[Variant]) -> str:
    """The multivariant playlist, one variant per rung in the order given (a player starts with the first)."""
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{HLS_VERSION}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for v in variants:
        attributes = [
            f"BANDWIDTH={v.peak_bps}",
            f"AVERAGE-BANDWIDTH={v.average_bps}",
            f'CODECS="{v.codecs}"',
            f"RESOLUTION={v.width}x{v.height}",
        ]
        if v.frame_rate:
            attributes.append(f"FRAME-RATE={v.frame_rate:.3f}")
        lines += ["#EXT-X-STREAM-INF:" + ",".join(attributes), f"{v.name}/{MEDIA_NAME}"]
    return "\n".join(lines) + "\n"


def upload_order(hls_dir: Path) -> list[list[Path]]:
    """Every file of the package, in batches to store one after the other (each batch in any order): segments
    and init segments, then media playlists, then the master, so that no playlist names a file not stored yet."""
    found = sorted(p for p in hls_dir.rglob("*") if p.is_file() and p.name != MASTER_NAME)
    media = [p for p in found if p.suffix != ".m3u8"]
    playlists = [p for p in found if p.suffix == ".m3u8"]
    return [media, playlists, [hls_dir / MASTER_NAME]]
