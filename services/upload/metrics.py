"""The upload service's Prometheus metrics, on a registry of its own (one per app, so tests can make many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class UploadMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter("cattube_upload_accepted", "Uploads accepted (answered 202).", registry=r)
        self.accepted_bytes = Counter("cattube_upload_accepted_bytes", "Bytes of accepted masters.", registry=r)
        self.refused = Counter(
            "cattube_upload_refused",
            "Uploads refused, by HTTP status ('aborted': the client went away or the service stopped).",
            ["status"],
            registry=r,
        )
        self.published = Counter("cattube_upload_events_published", "Outbox events the router took.", registry=r)
        self.relay_failures = Counter(
            "cattube_upload_relay_failures", "Attempts to publish the outbox that failed.", registry=r
        )
        self.outbox_pending = Gauge("cattube_upload_outbox_pending", "Events waiting in the outbox.", registry=r)
