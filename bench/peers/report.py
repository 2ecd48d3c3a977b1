"""The results as Markdown: the issue's table, CatTube ÷ each peer, the details, and the host's load."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MODE_TITLES = {
    "one": "one at a time, await the confirm",
    "batch": "batches of 100",
    "c16": "16 concurrent single publishers",
}


@dataclass
class Column:
    """One column of the table: a system, at one router setting for CatTube."""

    title: str
    system: str
    server: str  # key of the server it runs against
    cattube: bool
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # mode -> one result per run

    def median(self, mode: str, key: str) -> float | None:
        values = [r[key] for r in self.runs.get(mode, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    def failures(self, mode: str) -> int:
        return sum(1 for r in self.runs.get(mode, []) if "error" in r or not r.get("complete"))


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if value < 1 else f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "—"
    r = a / b
    return f"{r:.3f}×" if r < 0.1 else f"{r:.2f}×" if r < 10 else f"{r:,.0f}×"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(column: Column, mode: str) -> str:
    text = f"{_rate(column.median(mode, 'e2e_per_s'))} ev/s, p50 {_ms(column.median(mode, 'p50_ms'))}"
    failed = column.failures(mode)
    return text + (f" ({failed} of {len(column.runs[mode])} runs failed or incomplete)" if failed else "")


def render(columns: list[Column], modes: list[str], host: dict[str, Any]) -> str:
    lines = [_row(["mode", *(c.title for c in columns)]), _row(["---", *("---:" for _ in columns)])]
    for mode in modes:
        lines.append(_row([MODE_TITLES[mode], *(_cell(c, mode) for c in columns)]))
    for mode in modes:
        cpu = [f"{_rate(c.median(mode, 'server_cpu_us'))} µs" for c in columns]
        lines.append(_row([f"server CPU per event, {MODE_TITLES[mode].split(',')[0]}", *cpu]))

    ours = [c for c in columns if c.cattube]
    peers = [c for c in columns if not c.cattube]
    if ours and peers:
        lines += ["", _row(["CatTube ÷ peer", *(p.title for p in peers)]), _row(["---", *("---:" for _ in peers)])]
        for c in ours:
            for mode in modes:
                cells = [_ratio(c.median(mode, "e2e_per_s"), p.median(mode, "e2e_per_s")) for p in peers]
                lines.append(_row([f"{c.title}, rate, {mode}", *cells]))
            for mode in modes:
                cells = [_ratio(c.median(mode, "server_cpu_us"), p.median(mode, "server_cpu_us")) for p in peers]
                lines.append(_row([f"{c.title}, server CPU per event, {mode}", *cells]))

    lines += [
        "",
        _row(
            ["system, mode", "publish side ev/s", "p99", "producer CPU / event", "consumer CPU / event", "load (1 min)"]
        ),
        _row(["---", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for c in columns:
        for mode in modes:
            loads = [r["load_1m"] for r in c.runs.get(mode, [])]
            lines.append(
                _row(
                    [
                        f"{c.title}, {mode}",
                        _rate(c.median(mode, "publish_per_s")),
                        _ms(c.median(mode, "p99_ms")),
                        f"{_rate(c.median(mode, 'producer_cpu_us'))} µs",
                        f"{_rate(c.median(mode, 'consumer_cpu_us'))} µs",
                        f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—",
                    ]
                )
            )
    all_loads = [r["load_1m"] for c in columns for runs in c.runs.values() for r in runs]
    lines += [
        "",
        f"{host['events']:,} events of 1 KiB per run, median of {host['runs']} runs, consumer window {host['window']}; "
        f"{host['machine']}, {host['cpus']} CPUs; load average {host['load_start']} at the start, "
        f"{host['load_end']} at the end, 1-minute load {min(all_loads, default=0):.1f}–{max(all_loads, default=0):.1f} "
        f"at the runs' starts; {host['started']} to {host['ended']}.",
    ]
    return "\n".join(lines)
