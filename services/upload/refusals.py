"""The upload service's answers to a probe's refusal.

refusal(ProbeRejected(415, "The file is an image…"))  # 415 or 422 with the probe's reason
"""

from __future__ import annotations

from services.common.errors import CatTubeError, UnsupportedMedia
from services.upload.probe import ProbeRejected

EXPECTED_VIDEO = "a self-contained video file (MP4, MOV, MKV, WebM, AVI, MPEG-TS, ...)"
EXPECTED_USABLE = "a complete, undamaged video within the size and duration limits"


class UnusableVideo(CatTubeError):
    """422: a video, but broken, truncated, too large or too long; `detail` is the probe's reason."""

    status = 422
    title = "Unusable video"


def refusal(exc: ProbeRejected) -> CatTubeError:
    """The answer to a probe's refusal: 415 for no video at all, 422 for a video we cannot use."""
    if exc.status == 415:
        return UnsupportedMedia(exc.reason, errors=[{"field": "file", "expected": EXPECTED_VIDEO}])
    return UnusableVideo(exc.reason, errors=[{"field": "file", "expected": EXPECTED_USABLE}])
