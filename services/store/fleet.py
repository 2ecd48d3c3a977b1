"""The processing fleet over time: the sum of every instance's workers, from each instance's own changes.

Each processing instance scales its own workers and announces each change (`cattube.processing.scaled`
with its `instance`, `from` and `to`); the fleet is the sum over instances. Walking a window of
changes in time order, an instance counts the `to` of its latest change; before its first change in
the window it counts that change's `from` (what it had then); an instance with no change in the
window counts what it last reported (a machine held at `min_workers` says nothing for hours and its
workers still run).

    history = fleet_history(points, last_heard)   # points oldest first; last_heard: each instance's latest
    history.points[i].fleet                       # workers over every instance once that change was made
    history.instances                             # each instance's workers at the end of the window

An instance that scaled to 0 counts nothing from then on, and once its changes have left the window
it is not listed at all: a machine taken out of the cluster leaves the chart by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.store.records import ScalingPoint, iso


@dataclass(frozen=True)
class InstanceWorkers:
    """One processing instance's workers as last reported; `instance` "" is the unnamed one (from before names)."""

    instance: str
    workers: int
    at: float

    def record(self) -> dict[str, Any]:
        return {"instance": self.instance or None, "workers": self.workers, "at": iso(self.at)}


@dataclass(frozen=True)
class ScalingHistory:
    points: list[ScalingPoint]
    """Oldest first, each with `fleet` set."""
    instances: list[InstanceWorkers]
    """By name: every instance with a change in the window, and any other still running workers."""

    @property
    def fleet(self) -> int:
        """Workers over every instance now."""
        return sum(i.workers for i in self.instances)

    def record(self) -> dict[str, Any]:
        return {
            "items": [p.record() for p in self.points],
            "instances": [i.record() for i in self.instances],
            "fleet": self.fleet,
        }


def fleet_history(points: Sequence[ScalingPoint], last_heard: Iterable[InstanceWorkers]) -> ScalingHistory:
    """The fleet after each of `points` (oldest first); `last_heard` counts instances with no change among them."""
    in_window = {p.instance for p in points}
    counts = {i.instance: i for i in last_heard if i.instance not in in_window and i.workers > 0}
    for p in points:
        counts.setdefault(p.instance, InstanceWorkers(p.instance, p.from_, p.at))
    fleet = sum(i.workers for i in counts.values())
    walked = []
    for p in points:
        fleet += p.to - counts[p.instance].workers
        counts[p.instance] = InstanceWorkers(p.instance, p.to, p.at)
        walked.append(replace(p, fleet=fleet))
    return ScalingHistory(walked, sorted(counts.values(), key=lambda i: i.instance))
