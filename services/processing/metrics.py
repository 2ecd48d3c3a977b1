"""The processing service's Prometheus metrics, on a registry of its own (one per app, so tests can make many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.processing.autoscaler import Autoscaler, ScalingChange
from services.processing.worker import WorkerPool


class ProcessingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.workers = Gauge("cattube_processing_workers", "Workers by state.", ["state"], registry=r)
        self.desired = Gauge("cattube_processing_workers_desired", "Workers the queue asks for.", registry=r)
        self.min_workers = Gauge("cattube_processing_workers_min", "The autoscaler's min_workers.", registry=r)
        self.max_workers = Gauge("cattube_processing_workers_max", "The autoscaler's max_workers.", registry=r)
        self.backlog = Gauge("cattube_processing_queue_backlog", "Jobs waiting in the transcode queue.", registry=r)
        self.in_flight = Gauge("cattube_processing_queue_in_flight", "Jobs received and not settled.", registry=r)
        self.scalings = Counter(
            "cattube_processing_scaling_changes", "Changes of the worker count.", ["direction"], registry=r
        )
        self.jobs = Counter("cattube_processing_jobs", "Jobs settled, by outcome.", ["outcome"], registry=r)
        self.job_seconds = Histogram(
            "cattube_processing_job_seconds",
            "Wall time of a job, from receive to settle.",
            ["outcome"],
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )

    def job_settled(self, outcome: str, seconds: float) -> None:
        self.jobs.labels(outcome).inc()
        self.job_seconds.labels(outcome).observe(seconds)

    def scaled(self, change: ScalingChange) -> None:
        self.scalings.labels("out" if change.to > change.from_ else "in").inc()

    def refresh(self, autoscaler: Autoscaler, pool: WorkerPool) -> None:
        running, busy = pool.running, pool.busy
        self.workers.labels("busy").set(busy)
        self.workers.labels("idle").set(running - busy)
        self.workers.labels("retiring").set(pool.retiring)
        self.desired.set(autoscaler.desired)
        self.min_workers.set(autoscaler.limits.min_workers)
        self.max_workers.set(autoscaler.limits.max_workers)
        self.backlog.set(autoscaler.backlog)
        self.in_flight.set(autoscaler.in_flight)
