"""Progress bars on a terminal, plain lines elsewhere (CI logs, pipes)."""

from __future__ import annotations

import sys

WIDTH = 30

PHASES = {
    "uploaded": "queued for transcoding",
    "processing": "transcoding",
    "ready": "ready",
    "failed": "failed",
    "deleted": "deleted",
}
"""What a video's status means to a person watching its bar."""


def phase(status: str) -> str:
    return PHASES.get(status, status)


class Bar:
    def __init__(self, label: str, total: float = 100.0) -> None:
        self.label = label
        self.total = total
        self.tty = sys.stdout.isatty()
        self._last: tuple[int, str] | None = None
        self._open = False

    def show(self, done: float, note: str = "") -> None:
        fraction = 0.0 if self.total <= 0 else max(0.0, min(1.0, done / self.total))
        percent = int(fraction * 100)
        if self.tty:
            filled = int(fraction * WIDTH)
            sys.stdout.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (WIDTH - filled)}] {percent:3d}% {note:<24}")
            sys.stdout.flush()
            self._open = True
        elif percent < 100 and (percent // 25, note) != self._last:
            # Without a terminal, one line a quarter (or a new phase): a log, not a flood.
            self._last = (percent // 25, note)
            print(f"{self.label}: {percent}% {note}".rstrip(), flush=True)

    def done(self, note: str = "") -> None:
        if self.tty:
            self.show(self.total, note)
            sys.stdout.write("\n")
            self._open = False
        else:
            print(f"{self.label}: 100% {note}".rstrip(), flush=True)

    def abandon(self) -> None:
        """End the bar's line where it stands, so what is printed next starts on a line of its own."""
        if self._open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._open = False


def line(text: str) -> None:
    print(text, flush=True)
