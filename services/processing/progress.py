"""Turn ffmpeg's `-progress pipe:1` output into (percent, speed) callbacks, at most one a second.

ffmpeg prints blocks of `key=value` lines, each block ending in `progress=continue` (or
`progress=end` once). Of the keys, `out_time_us` (how far the output has got, in
microseconds; `out_time_ms` holds the same number despite its name) measured against the
probed duration gives the percentage, and `speed` (`1.5x`, or `N/A` at the start) the
encoding speed relative to real time. ffmpeg writes a block about twice a second; progress
events go onto the bus, so they are thinned to one a second, counted from the parser's creation
(the job's `started` event already says 0 %: a report in its first second would add nothing but
an event), and the final 100% always goes through so that a listener sees the job reach its end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

ProgressCallback = Callable[[float, float], None]
"""Called with (percent 0-100, speed as a multiple of real time)."""


class ProgressParser:
    """Feed it ffmpeg's progress lines one at a time; it calls `on_progress` with (percent, speed).

    Percent never goes down and reaches exactly 100.0 on `progress=end`.

        parser = ProgressParser(duration_s=12.5, on_progress=report)
        await run_process(argv, timeout_s=600, on_stdout_line=parser.feed)
    """

    def __init__(
        self,
        duration_s: float,
        on_progress: ProgressCallback,
        *,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._duration_us = max(duration_s, 0.0) * 1_000_000
        self._on_progress = on_progress
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_report = clock()
        self._out_time_us = 0
        self._speed = 0.0
        self._percent = 0.0
        self._ended = False

    @property
    def percent(self) -> float:
        """The furthest progress seen so far."""
        return self._percent

    def feed(self, line: str) -> None:
        key, sep, value = line.strip().partition("=")
        if not sep:
            return
        value = value.strip()
        if key == "out_time_us":
            self._out_time_us = _parse_int(value, self._out_time_us)
        elif key == "speed":
            self._speed = _parse_speed(value, self._speed)
        elif key == "progress":
            self._end_of_block(final=value == "end")

    def _end_of_block(self, *, final: bool) -> None:
        if self._ended:
            return
        if final:
            self._ended = True
            self._percent = 100.0
        elif self._duration_us > 0:
            self._percent = max(self._percent, min(100.0, 100.0 * self._out_time_us / self._duration_us))
        now = self._clock()
        if final or now - self._last_report >= self._min_interval_s:
            self._last_report = now
            self._on_progress(self._percent, self._speed)


def _parse_int(value: str, default: int) -> int:
    try:
        return max(int(value), 0)
    except ValueError:  # "N/A" before the first frame is out
        return default


def _parse_speed(value: str, default: float) -> float:
    try:
        speed = float(value.removesuffix("x"))
    except ValueError:
        return default
    return speed if math.isfinite(speed) and speed >= 0 else default
