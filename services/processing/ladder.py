"""The rendition ladder: which sizes a master becomes, and the bitrate budget of each.

The names and their sizes are the contract's (`services.common.contract.LADDER`); this module adds
what only ffmpeg needs: the output sizes and the rate control of each rung.

A rung's number is the shorter side of the picture *as displayed* (rotation applied), so a
portrait 1080x1920 phone clip is 1080p and stays portrait. A rung larger than that shorter
side is skipped, never upscaled: upscaling costs CPU and bytes and adds no detail.

Output sizes are computed here, from the probe, rather than left to ffmpeg's `scale=-2:H`,
so that the plan is a pure function that property tests can pin down: both sides even
(H.264 with 4:2:0 chroma needs it), the shorter side exactly the rung, the aspect ratio
within 1%, never larger than the source.

Rate control is capped CRF, as the big platforms do for on-demand video: CRF 23 (x264's
default, visually clean) lets easy scenes stay small, while `maxrate`/`bufsize` cap the
peaks so a rendition stays streamable on the connection it is meant for. The caps, for up
to 30 fps, sit near YouTube's and Apple's HLS authoring numbers for H.264:

    2160p 20 Mb/s   1440p 10 Mb/s   1080p 6 Mb/s   720p 3 Mb/s
    480p 1.5 Mb/s   360p 800 kb/s   240p 400 kb/s  144p 200 kb/s

Above 30 fps the caps grow by half (YouTube's 48-60 fps recommendations are ~1.5x).
`bufsize` is twice `maxrate`: about two seconds of VBV buffer, matching the 2 s keyframe
interval, so a cap is enforced per segment without starving short busy scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from services.common.contract import LADDER, RENDITION_NAMES
from services.common.errors import InvalidInput

# Peak video bitrate (bits/s at <= 30 fps) of every rung of the contract's ladder, largest first.
_PEAK_BPS: Final[dict[str, int]] = {
    "2160p": 20_000_000,
    "1440p": 10_000_000,
    "1080p": 6_000_000,
    "720p": 3_000_000,
    "480p": 1_500_000,
    "360p": 800_000,
    "240p": 400_000,
    "144p": 200_000,
}
assert tuple(_PEAK_BPS) == RENDITION_NAMES, "every rung of the contract's ladder needs a bitrate cap"

RUNG_NAMES: Final[tuple[str, ...]] = RENDITION_NAMES
CRF: Final = 23
HIGH_FPS: Final = 30.0
HIGH_FPS_FACTOR: Final = 1.5
BUFSIZE_SECONDS: Final = 2
POSTER_MAX_SHORT_SIDE: Final = 720


@dataclass(frozen=True)
class Rung:
    """One planned output: its displayed size and its rate-control settings."""

    name: str
    width: int
    height: int
    crf: int
    maxrate_bps: int
    bufsize_bits: int


@dataclass(frozen=True)
class LadderPlan:
    """The rungs to encode (in the order requested) and the names skipped as larger than the source."""

    rungs: tuple[Rung, ...]
    skipped: tuple[str, ...]


def displayed_size(width: int, height: int, rotation: float | None) -> tuple[int, int]:
    """The picture's size as shown: a quarter turn (90 or 270 degrees, either sign) swaps the sides.

    ffmpeg's autorotation transposes only within 1 degree of a quarter turn; other angles are
    rotated inside the same frame size, so they do not swap either.
    """
    turn = (rotation or 0.0) % 360.0
    if abs(turn - 90.0) < 1.0 or abs(turn - 270.0) < 1.0:
        return height, width
    return width, height


def _even(value: float) -> int:
    return int(value / 2 + 0.5) * 2


def fit_short_side(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale (width, height) so that the shorter side is `short_side` (even) and the aspect is kept.

    The longer side is rounded to the nearest even number and never exceeds the source's.
    """
    if short_side % 2 or short_side <= 0:
        raise ValueError(f"short_side must be a positive even number, not {short_side}")
    long_side, short_src = max(width, height), min(width, height)
    if short_side > short_src:
        raise ValueError(f"{short_side} is larger than the source's shorter side {short_src}")
    scaled_long = min(_even(long_side * short_side / short_src), long_side // 2 * 2)
    return (scaled_long, short_side) if width >= height else (short_side, scaled_long)


def rate_caps(name: str, fps: float | None = None) -> tuple[int, int]:
    """(maxrate bits/s, bufsize bits) of a rung; higher frame rates get 1.5x the budget."""
    maxrate = _PEAK_BPS[name]
    if fps is not None and fps > HIGH_FPS:
        maxrate = int(maxrate * HIGH_FPS_FACTOR)
    return maxrate, maxrate * BUFSIZE_SECONDS


def plan_ladder(
    width: int,
    height: int,
    rotation: float | None,
    names: Sequence[str],
    *,
    fps: float | None = None,
) -> LadderPlan:
    """Plan the requested rungs for a source of `width`x`height` stored pixels with `rotation`.

    Names keep the order given; a repeated name counts once. An unknown name is refused with
    `InvalidInput`, since a typo silently skipped would look like a finished job.

    >>> plan_ladder(1280, 720, 0, ["1080p", "720p"]).skipped
    ('1080p',)
    """
    unknown = [name for name in names if name not in LADDER]
    if unknown:
        raise InvalidInput("renditions", f"names from {','.join(RUNG_NAMES)}, not {','.join(unknown)}")
    if width <= 0 or height <= 0:
        raise InvalidInput("probe", f"a positive width and height, not {width}x{height}")
    shown_w, shown_h = displayed_size(width, height, rotation)
    short_src = min(shown_w, shown_h)
    rungs: list[Rung] = []
    skipped: list[str] = []
    for name in dict.fromkeys(names):
        short_side = LADDER[name]
        if short_side > short_src:
            skipped.append(name)
            continue
        out_w, out_h = fit_short_side(shown_w, shown_h, short_side)
        maxrate, bufsize = rate_caps(name, fps)
        rungs.append(Rung(name, out_w, out_h, CRF, maxrate, bufsize))
    return LadderPlan(tuple(rungs), tuple(skipped))


def poster_size(width: int, height: int, rotation: float | None) -> tuple[int, int]:
    """The poster's displayed size: the source's, shrunk to at most 720 on the shorter side, even."""
    shown_w, shown_h = displayed_size(width, height, rotation)
    short_side = min(POSTER_MAX_SHORT_SIDE, min(shown_w, shown_h) // 2 * 2)
    if short_side <= 0:
        raise InvalidInput("probe", f"a picture at least 2 pixels on each side, not {width}x{height}")
    return fit_short_side(shown_w, shown_h, short_side)
