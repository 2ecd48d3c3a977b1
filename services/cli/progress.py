"""Progress bars on a terminal, plain lines elsewhere (CI logs, pipes)."""

from __future__ import annotations

import sys

WIDTH = 30


class Bar:
    def __init__(self, label: str, total: float = 100.0) -> None:
        self.label = label
        self.total = total
        self.tty = sys.stdout.isatty()
        self._last_quarter = -1

    def show(self, done: float, note: str = "") -> None:
        fraction = 0.0 if self.total <= 0 else max(0.0, min(1.0, done / self.total))
        percent = int(fraction * 100)
        if self.tty:
            filled = int(fraction * WIDTH)
            sys.stdout.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (WIDTH - filled)}] {percent:3d}% {note:<24}")
            sys.stdout.flush()
        elif percent < 100 and percent // 25 != self._last_quarter:
            # Without a terminal, one line a quarter: a log, not a flood.
            self._last_quarter = percent // 25
            print(f"{self.label}: {percent}% {note}".rstrip(), flush=True)

    def done(self, note: str = "") -> None:
        if self.tty:
            self.show(self.total, note)
            sys.stdout.write("\n")
        else:
            print(f"{self.label}: 100% {note}".rstrip(), flush=True)


def line(text: str) -> None:
    print(text, flush=True)
