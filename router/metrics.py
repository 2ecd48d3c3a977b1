"""The router's Prometheus metrics, on a registry of its own (one per app, so tests can make many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.bus import Bus


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.published = Counter(
            "cattube_router_events_published",
            "Events appended to the bus (duplicates not counted).",
            registry=self.registry,
        )
        self.publish_latency = Histogram(
            "cattube_router_publish_seconds",
            "Time from receiving a publish request to its durable commit.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        labels = ["subscription"]
        self.backlog = Gauge("cattube_router_backlog", "Messages ready to deliver.", labels, registry=self.registry)
        self.in_flight = Gauge("cattube_router_in_flight", "Messages being delivered.", labels, registry=self.registry)
        self.dead_lettered = Gauge("cattube_router_dead_lettered", "Dead letters held.", labels, registry=self.registry)

    async def refresh(self, bus: Bus) -> None:
        """Read every subscription's numbers just before a scrape (gauges are not kept up to date otherwise)."""
        for gauge in (self.backlog, self.in_flight, self.dead_lettered):
            gauge.clear()
        for sub in await bus.list_subscriptions():
            name = sub.spec.name
            stats, _ = await bus.stats(name)
            self.backlog.labels(name).set(stats.backlog)
            self.in_flight.labels(name).set(stats.in_flight)
            self.dead_lettered.labels(name).set(stats.dead_lettered)
