"""The store's Prometheus metrics, on a registry of its own (one per app, so tests can make many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common import outbox
from services.common.outbox import OutboxRelay
from services.store.catalog import Catalog, Outcome
from services.store.live import Live
from services.store.records import STATUSES


class StoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "cattube_store_events", "Deliveries from the router, by type and result.", ["type", "result"], registry=r
        )
        self.videos = Gauge("cattube_store_videos", "Videos in the catalog, by status.", ["status"], registry=r)
        self.outbox_pending = Gauge("cattube_store_outbox_pending", "Events waiting for the router.", registry=r)
        self.outbox_refused = Gauge("cattube_store_outbox_refused", "Events the router refused.", registry=r)
        self.published = Gauge("cattube_store_outbox_published", "Events published since start.", registry=r)
        self.listeners = Gauge("cattube_store_live_listeners", "Pages following GET /events.", registry=r)
        self.bytes_served = Counter("cattube_store_bytes_served", "Rendition and poster bytes sent.", registry=r)

    def delivered(self, kind: str, outcome: Outcome) -> None:
        result = "duplicate" if outcome.duplicate else "ignored" if outcome.ignored else "applied"
        self.events.labels(kind, result).inc()

    async def refresh(self, catalog: Catalog, relay: OutboxRelay, live: Live) -> None:
        counts = await catalog.counts()
        for status in STATUSES:
            self.videos.labels(status).set(counts.get(status, 0))
        pending, refused = await catalog.db.transact(outbox.counts)
        self.outbox_pending.set(pending)
        self.outbox_refused.set(refused)
        self.published.set(relay.published_total)
        self.listeners.set(live.listeners)
