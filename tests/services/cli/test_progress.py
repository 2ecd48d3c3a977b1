"""Progress lines say the phase a video is in, in words a person reads (no "transcoding … uploaded")."""

from __future__ import annotations

import pytest

from services.cli.progress import Bar, phase


def test_a_video_bar_names_its_phase_not_its_status(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Bar("Whiskers on the beach")
    for progress, status in [(0, "uploaded"), (0, "processing"), (60, "processing")]:
        bar.show(progress, phase(status))
    bar.done(phase("ready"))
    assert capsys.readouterr().out.splitlines() == [
        "Whiskers on the beach: 0% queued for transcoding",
        "Whiskers on the beach: 0% transcoding",
        "Whiskers on the beach: 60% transcoding",
        "Whiskers on the beach: 100% ready",
    ]
