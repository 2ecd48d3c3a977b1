"""A master's extension and media type: decided by the probe, and guessed beforehand from its first bytes.

    media_type(probe)            # ("mp4", "video/mp4"): what the master is stored as, from the demuxer that read it
    likely_extension(first)      # "mp4", or None: the guess, from the magic numbers at the start of the file

Neither ever comes from the client's file name. The guess only saves work: with an `s3://` bucket an
upload streams straight to `master.{guess}`, so that when the probe agrees (a well-formed file always
does) the master has its final name without a second copy of its bytes. When it does not, the probe's
answer wins and the object is copied to the right name; a file the probe refuses is removed either way.
"""

from __future__ import annotations

from services.upload.probe import Probe

__all__ = ["CONTAINERS", "likely_extension", "media_type"]

# The extension and media type of a master, from the demuxer that read it (never from the client).
CONTAINERS: dict[str, tuple[str, str]] = {
    "mov": ("mp4", "video/mp4"),
    "matroska": ("mkv", "video/x-matroska"),
    "avi": ("avi", "video/x-msvideo"),
    "mpegts": ("ts", "video/mp2t"),
    "mpeg": ("mpg", "video/mpeg"),
    "flv": ("flv", "video/x-flv"),
    "ogg": ("ogv", "video/ogg"),
    "asf": ("wmv", "video/x-ms-asf"),
}
WEBM_VIDEO = frozenset({"vp8", "vp9", "av1"})
WEBM_AUDIO = frozenset({None, "opus", "vorbis"})

# The first box of an ISO media file (MP4, MOV): `ftyp` as a rule, older QuickTime files start with others.
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
_TS_PACKET = 188
_ASF_HEADER = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")


def media_type(probe: Probe) -> tuple[str, str]:
    """The extension and media type a master is stored with, from what the probe found."""
    if probe.container == "matroska" and probe.video_codec in WEBM_VIDEO and probe.audio_codec in WEBM_AUDIO:
        return "webm", "video/webm"
    return CONTAINERS.get(probe.container, ("video", "application/octet-stream"))


def likely_extension(first: bytes) -> str | None:
    """The extension the probe will most likely give a file that starts with `first`; None when no guess fits.

    Matroska files are guessed from their DocType (`webm` or `matroska`), which the codecs may overrule.
    """
    if first[4:8] in _ISO_BOXES:
        return "mp4"
    if first.startswith(b"\x1a\x45\xdf\xa3"):  # EBML
        return "webm" if b"webm" in first[:64] else "mkv"
    if first.startswith(b"RIFF") and first[8:12] == b"AVI ":
        return "avi"
    if len(first) > 2 * _TS_PACKET and all(first[i] == 0x47 for i in range(0, 3 * _TS_PACKET, _TS_PACKET)):
        return "ts"
    if first.startswith(b"\x00\x00\x01\xba"):  # an MPEG program stream's pack header
        return "mpg"
    if first.startswith(b"FLV\x01"):
        return "flv"
    if first.startswith(b"OggS"):
        return "ogv"
    if first.startswith(_ASF_HEADER):
        return "wmv"
    return None
