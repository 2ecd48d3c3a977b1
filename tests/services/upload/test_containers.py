"""The master's name: the guess from the first bytes matches what the probe decides, for every container we take."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.upload.containers import likely_extension, media_type
from services.upload.probe import probe_file
from services.upload.uploads import HEAD_BYTES
from tests.media import ffmpeg, make_clip

SOURCE = ["-f", "lavfi", "-i", "testsrc2=s=160x96:r=25:d=1", "-f", "lavfi", "-i", "sine=d=1"]
# Containers tests/media.make_clip does not make, with codecs the probe's whitelist takes.
OTHERS = {
    "avi": ["-c:v", "mpeg4", "-c:a", "mp2"],
    "flv": ["-c:v", "libx264", "-c:a", "aac"],
    "mpg": ["-c:v", "mpeg2video", "-c:a", "mp2", "-f", "vob"],
    "ogv": ["-c:v", "libvpx", "-c:a", "libopus", "-f", "ogg"],
    "wmv": ["-c:v", "mpeg4", "-c:a", "mp2", "-f", "asf"],
}


@pytest.mark.parametrize("fmt", ["mp4", "mov", "mkv", "webm", "ts", *OTHERS])
async def test_the_guess_from_the_first_bytes_is_what_the_probe_decides(tmp_path: Path, fmt: str) -> None:
    if fmt in OTHERS:
        path = tmp_path / f"cat.{fmt}"
        ffmpeg(*SOURCE, *OTHERS[fmt], "-shortest", str(path))
    else:
        path = make_clip(tmp_path / f"cat.{fmt}", 160, 96, 1.0, fmt=fmt)
    found = await probe_file(path, max_pixels=7680 * 4320, max_duration_s=3600)
    with path.open("rb") as file:
        first = file.read(HEAD_BYTES)  # what the upload service looks at
    assert likely_extension(first) == media_type(found)[0], found


@pytest.mark.parametrize(
    "first",
    [
        b"",
        b"Whiskers on the beach\n" * 40,
        bytes(4096),
        b"\x89PNG\r\n\x1a\n" + bytes(100),
        b"#EXTM3U\n#EXT-X-VERSION:3\n",
    ],
)
def test_no_guess_for_what_is_not_a_video_container(first: bytes) -> None:
    assert likely_extension(first) is None
