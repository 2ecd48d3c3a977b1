"""Build the one ffmpeg command that turns a master into every planned rung plus a poster.

One process per job decodes the master once and fans the frames out through `split`
filters to one scaler and one libx264 encoder per rung, and to a single-frame JPEG poster.
Decoding (about a quarter of the CPU of a 4K → 1080p job here) is paid once however many rungs
there are, and there is a single process to time out, kill and report progress from.

Choices baked in here, and why:

- The hardened input options (`services.common.media.hardened_input_args`) come before
  `-i`; only `0:v:0` and `0:a:0?` are mapped, and each output is bounded by `-t` (probed
  duration plus a margin) and `-fs`, so a lying or hostile master cannot make us write
  forever (docs/architecture.md, "Untrusted media").
- Rotation: ffmpeg autorotates on decode, so the filter graph already sees the picture
  upright and the display matrix is consumed; outputs are plain upright frames with no
  rotation left for a player to get wrong. Sizes come from the ladder (displayed sizes).
- Smaller rungs are scaled from larger outputs rather than all from the source (see
  `scale_sources`): a quarter less CPU for a full ladder from a 4K master.
- `setsar=1` after every scale (square pixels), `format=yuv420p` so 10-bit or 4:2:2 masters
  still give High-profile H.264 that every browser plays.
- Keyframes every 2 s by timestamp (`-force_key_frames expr:gte(t,n_forced*2)`), which holds
  for variable frame rate phone clips where a frame-count `-g` would drift. Forced keyframes are
  IDR frames (`-forced-idr 1`; x264's GOPs are closed), at the same instants in every rung, so the
  HLS packaging (`services.processing.hls`) cuts aligned segments that each start with one.
- Frame rates above 60 fps (slow-motion phone clips) are halved, or more, to at most 60.
- Audio: AAC 128 kb/s stereo when the source has audio, `-an` otherwise (no silent track).
- `-map_metadata -1 -map_chapters -1`: a phone clip's tags carry its GPS position; the
  outputs are published, so nothing of the upload's metadata is copied.
- `-threads` is the caller's: it goes to the decoder, the filter graph and each encoder.
  A worker that runs alone on a machine passes its CPU count; N concurrent workers pass
  about cpu_count / N, since each ffmpeg already keeps its cores busy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.processing.ladder import Rung

AUDIO_BITRATE_BPS: Final = 128_000
MAX_FPS: Final = 60.0
KEYFRAME_INTERVAL_S: Final = 2
POSTER_AT: Final = 0.10  # of the duration: past fades from black and title cards
POSTER_NAME: Final = "poster.jpg"
POSTER_MAX_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class Job:
    """Everything the command depends on, already validated and planned."""

    master: Path
    work_dir: Path
    rungs: Sequence[Rung]
    poster_size: tuple[int, int]
    duration_s: float
    has_audio: bool
    fps: float | None
    threads: int
    preset: str = "veryfast"


def rendition_name(rung: Rung) -> str:
    """The output's file name: the ladder name (from a fixed list, never the client's words)."""
    return f"{rung.name}.mp4"


def output_fps(fps: float | None) -> float | None:
    """The frame rate to encode at when it must change (an integer fraction of the source), else None."""
    if fps is None or not math.isfinite(fps) or fps <= MAX_FPS:
        return None
    return fps / math.ceil(fps / MAX_FPS)


def duration_limit_s(duration_s: float) -> float:
    """`-t` for every output: the probed duration plus 1 s and 2%, room for rounding, not for abuse."""
    return duration_s * 1.02 + 1.0


def size_limit_bytes(rung: Rung, duration_s: float) -> int:
    """`-fs` for a rendition: twice what its bitrate caps allow over the `-t` limit, plus 1 MiB.

    x264's VBV keeps the video under maxrate per bufsize window, so a real output stays well
    under this; reaching it means something is wrong with the input, and the job fails.
    """
    seconds = duration_limit_s(duration_s)
    bits = (rung.maxrate_bps + AUDIO_BITRATE_BPS) * seconds + rung.bufsize_bits
    return int(bits / 8 * 2) + 1024 * 1024


def scale_sources(rungs: Sequence[Rung]) -> list[int | None]:
    """For each rung, the index of the rung it is scaled from, or None for the decoded source itself.

    Scaling costs in proportion to the input's size: from a 4K master, six rungs each scaled
    from the source took 3.2 s of CPU per 150 frames here, against 1.3 s when smaller rungs are
    scaled from larger outputs (25% of a whole 4K ladder job). A rung is scaled from the
    smallest other rung at least twice its size, so every step still shrinks by 2x or more and
    keeps its sharpness; without such a rung it is scaled from the source.
    """
    sources: list[int | None] = []
    for rung in rungs:
        short_side = min(rung.width, rung.height)
        larger = [j for j, other in enumerate(rungs) if min(other.width, other.height) >= 2 * short_side]
        sources.append(min(larger, key=lambda j: min(rungs[j].width, rungs[j].height)) if larger else None)
    return sources


def filter_graph(job: Job) -> str:
    """The `-filter_complex` graph: decoded frames → fps cap → scalers (`[v0]`, `[v1]`, ...) and `[poster]`."""
    sources = scale_sources(job.rungs)
    children: dict[int | None, list[int]] = {}
    for i, source in enumerate(sources):
        children.setdefault(source, []).append(i)
    input_label: dict[int, str] = {}
    from_source = children.get(None, [])
    for k, i in enumerate(from_source):
        input_label[i] = f"src{k}"
    for j, kids in children.items():
        if j is not None:
            for m, i in enumerate(kids):
                input_label[i] = f"r{j}_{m}"
    head = "[0:v:0]"
    capped = output_fps(job.fps)
    if capped is not None:
        head += f"fps=fps={capped:.6g},"
    head += f"split={len(from_source) + 1}" + "".join(f"[src{k}]" for k in range(len(from_source))) + "[srcp]"
    chains = [head]
    for i, rung in enumerate(job.rungs):
        chain = f"[{input_label[i]}]scale={rung.width}:{rung.height},setsar=1,format=yuv420p"
        kids = children.get(i, [])
        if kids:
            chain += f",split={len(kids) + 1}[v{i}]" + "".join(f"[r{i}_{m}]" for m in range(len(kids)))
        else:
            chain += f"[v{i}]"
        chains.append(chain)
    poster_w, poster_h = job.poster_size
    poster_at = job.duration_s * POSTER_AT
    chains.append(f"[srcp]select='gte(t,{poster_at:.3f})',scale={poster_w}:{poster_h},setsar=1[poster]")
    return ";".join(chains)


def build_command(exe: str, job: Job, input_args: Sequence[str]) -> list[str]:
    """The full argv: `exe`, global options, `input_args` (hardening) before `-i`, then every output."""
    threads = str(max(1, job.threads))
    limit_t = f"{duration_limit_s(job.duration_s):.3f}"
    argv = [exe, "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1", "-y"]
    argv += ["-filter_complex_threads", threads, *input_args, "-threads", threads, "-i", str(job.master)]
    argv += ["-filter_complex", filter_graph(job)]
    for i, rung in enumerate(job.rungs):
        argv += ["-map", f"[v{i}]"]
        if job.has_audio:
            argv += ["-map", "0:a:0?", "-c:a", "aac", "-b:a", str(AUDIO_BITRATE_BPS), "-ac", "2"]
        else:
            argv += ["-an"]
        argv += [
            "-c:v", "libx264", "-preset", job.preset, "-profile:v", "high",
            "-crf", str(rung.crf), "-maxrate", str(rung.maxrate_bps), "-bufsize", str(rung.bufsize_bits),
            "-force_key_frames", f"expr:gte(t,n_forced*{KEYFRAME_INTERVAL_S})", "-forced-idr", "1",
            "-threads", threads,
            "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
            "-movflags", "+faststart",
            "-t", limit_t, "-fs", str(size_limit_bytes(rung, job.duration_s)),
            "-f", "mp4", str(job.work_dir / rendition_name(rung)),
        ]  # fmt: skip
    argv += [
        "-map", "[poster]", "-frames:v", "1", "-update", "1", "-c:v", "mjpeg", "-q:v", "3",
        "-map_metadata", "-1", "-fs", str(POSTER_MAX_BYTES),
        "-f", "image2", str(job.work_dir / POSTER_NAME),
    ]  # fmt: skip
    return argv
