"""Text a person typed: titles become one clean line, descriptions keep their paragraphs and lose the rest."""

from __future__ import annotations

import pytest

from services.common.text import one_line, paragraphs


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Whiskers\non the beach\x07", "Whiskers on the beach"),
        ("  \t spaced\r\n out  ", "spaced out"),
        ("evil\u202etxt.mp4", "eviltxt.mp4"),  # a right-to-left override would show "4pm.txt"
        ("\x00\x1b[31m", "[31m"),
        ("Mittens 🐈 und Käthe", "Mittens 🐈 und Käthe"),
    ],
)
def test_one_line(raw: str, clean: str) -> None:
    assert one_line(raw) == clean


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Line one\r\n\r\n\r\n\tLine two  ", "Line one\n\nLine two"),
        ("a\rb\nc", "a\nb\nc"),
        ("  tabs\tand   spaces  \n", "tabs and spaces"),
        ("bell\x07 and \u2066isolate\u2069", "bell and isolate"),
        ("\n\n", ""),
    ],
)
def test_paragraphs(raw: str, clean: str) -> None:
    assert paragraphs(raw) == clean
