"""The processing service's parts wired together: queues, worker pool, autoscaler, deletions, events.

    service = ProcessingService(settings, metrics)
    await service.open()
    service.start(supervisor)        # declares the subscriptions in the background, then scales
    ...
    service.begin_shutdown()         # on SIGTERM: no new jobs
    await service.close()            # running jobs go back to the queue (after shutdown_grace_s, 0 by default);
                                     # `scaled` to 0 workers is announced ("the instance stopped");
                                     # events the router does not take in 2 s stay in the outbox for the next start

The subscriptions are declared in the background (retrying until the router answers), so the
service starts, and answers `/healthz`, while the router is still down; `/readyz` says so.
Both start at the `earliest` retained event when first created: an upload announced before
this service ever ran is still transcoded. The transcode queue is shared by every instance; the
deletion queue is this instance's own, named after `CATTUBE_INSTANCE` (`deletions_queue_name`), so
every instance hears of every deletion and a restart takes up the same queue again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import secrets
import time
from pathlib import Path
from typing import IO

import httpx

from router.client import RouterClient, RouterError
from services.common import contract
from services.common.blob_check import BlobStoreCheck
from services.common.blobs import BlobStore, open_blob_store
from services.common.db import make_database
from services.common.errors import Unavailable
from services.common.supervisor import Supervisor
from services.processing import events
from services.processing.autoscaler import Autoscaler, Limits, ScalingChange
from services.processing.capacity import FleetCap, fleet_cap
from services.processing.deletions import DeletionConsumer, deletions_queue_name
from services.processing.events import EventSink
from services.processing.job import TranscodeJobs, sweep_work_dir
from services.processing.metrics import ProcessingMetrics
from services.processing.settings import ProcessingSettings, cpu_count
from services.processing.worker import WorkerPool

log = logging.getLogger(__name__)

TRANSCODE_QUEUE = "transcode"
READY_CHECK_TIMEOUT_S = 2.0
QUEUE_CONNECTIONS = 8
# At shutdown the router gets this long to take the outbox; what it does not take waits for the next start.
SINK_FLUSH_S = 2.0
EVENTS_TIMEOUT_S = 5.0
STOPPED = "the instance stopped"
RESTARTED = "the instance restarted; its last run ended without saying it stopped"


class AnnouncedWorkers:
    """The worker count this instance last announced, kept in a file across runs (one process per data dir:
    `lock_data_dir`). Written on every scaling, which is rare: a few bytes, replaced whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        try:
            return max(0, int(self.path.read_text()))
        except (OSError, ValueError):  # none yet, or unreadable: nothing to correct
            return 0

    def write(self, workers: int) -> None:
        try:
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(str(workers))
            partial.replace(self.path)
        except OSError as exc:  # a full disk: the fleet chart may count these workers after a kill -9
            log.warning("could not keep the announced worker count in %s: %s", self.path, exc)


def lock_data_dir(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on `path` for as long as the returned file is open (a killed process drops it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("wb")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise Unavailable(
            f"another processing instance is using {path.parent}; give each instance its own CATTUBE_DATA_DIR"
        ) from None
    return file


class ProcessingService:
    def __init__(
        self,
        settings: ProcessingSettings,
        metrics: ProcessingMetrics,
        *,
        router_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.instance = settings.instance
        self.deletions_queue = deletions_queue_name(settings.instance)
        # The scaled events' ids count from 1 at each start: this tells one start's from the next's.
        self._start = secrets.token_hex(4)
        self.subscribed = asyncio.Event()
        self._router_transport = router_transport
        self._scalings = 0
        self._announced_workers = 0
        self._announced = AnnouncedWorkers(settings.data_dir / "processing" / "announced-workers")
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._store: BlobStore | None = None
        self._blob_check: BlobStoreCheck | None = None
        self._control: RouterClient | None = None
        self._events: RouterClient | None = None
        self._queues: RouterClient | None = None
        self._sink: EventSink | None = None
        self._pool: WorkerPool | None = None
        self._autoscaler: Autoscaler | None = None
        self._deletions: DeletionConsumer | None = None
        self.fleet_cap = FleetCap(None, "not measured yet")
        self._lock: IO[bytes] | None = None

    # -- the parts, once opened -------------------------------------------------------------------

    @property
    def autoscaler(self) -> Autoscaler:
        assert self._autoscaler is not None, "the service is not open"
        return self._autoscaler

    @property
    def pool(self) -> WorkerPool:
        assert self._pool is not None, "the service is not open"
        return self._pool

    @property
    def blob_check(self) -> BlobStoreCheck:
        assert self._blob_check is not None, "the service is not open"
        return self._blob_check

    @property
    def store(self) -> BlobStore:
        assert self._store is not None, "the service is not open"
        return self._store

    async def open(self) -> None:
        settings = self.settings
        # The work directory and the outbox are this instance's alone: say so plainly if another has them.
        self._lock = await asyncio.to_thread(lock_data_dir, settings.data_dir / "processing" / "instance.lock")
        # Before any worker starts: partial outputs a kill -9 left (docs/architecture.md, Workers and jobs).
        swept, size = await asyncio.to_thread(sweep_work_dir, settings.work_dir)
        if swept:
            log.info("swept %d work director(ies) (%d bytes) left by an earlier run", swept, size)
        self._store = await asyncio.to_thread(open_blob_store, settings.blob_base_url)
        self._blob_check = BlobStoreCheck(self._store)
        token = settings.router_token
        self._control = RouterClient(settings.router_urls, token=token, transport=self._router_transport)
        # Bounded: two long polls (the pool's one receive loop, deletions) and the busy workers' acks,
        # nacks and heartbeats, which wait their turn for a connection rather than open one each.
        self._queues = RouterClient(
            settings.router_urls, token=token, transport=self._router_transport, max_connections=QUEUE_CONNECTIONS
        )
        # The relay owns retries and their timing (backing off while the router is away): one try per call.
        self._events = RouterClient(
            settings.router_urls,
            token=token,
            timeout_s=EVENTS_TIMEOUT_S,
            transport=self._router_transport,
            retries=0,
        )
        db = make_database(
            settings.outbox_database_url,
            path=settings.outbox_file,
            schema=events.POSTGRES_SCHEMA,
            migrations=events.MIGRATIONS,
            name="outbox",
        )
        # On a database instances share, each relays only its own events (in the order it recorded them).
        self._sink = EventSink(db, self._events, owner=self.instance if db.shared else "")
        await self._sink.open()
        jobs = TranscodeJobs(self._store, self._sink, settings, is_deleted=self._is_deleted)
        self._pool = WorkerPool(
            self._queues.queue(TRANSCODE_QUEUE),
            jobs,
            visibility_timeout_s=settings.visibility_timeout_s,
            receive_wait_s=settings.receive_wait_s,
            retry_delay_s=settings.retry_delay_s,
            threads=self._threads,
            name_prefix=f"worker-{self.instance}",
            on_idle=self._worker_idle,
            on_outcome=self.metrics.job_settled,
        )
        self.fleet_cap = fleet_cap()
        if self.fleet_cap.workers is not None and settings.max_workers > self.fleet_cap.workers:
            log.warning(
                "max_workers %d is capped at %d: %s",
                settings.max_workers,
                self.fleet_cap.workers,
                self.fleet_cap.reason,
            )
        self._autoscaler = Autoscaler(
            self._pool,
            Limits(settings.min_workers, settings.max_workers, settings.target_backlog_per_worker),
            cooldown_s=settings.scale_in_cooldown_s,
            stats=lambda: self._client().watch_stats(TRANSCODE_QUEUE, wait_s=20),
            on_change=self._scaled,
            history_size=settings.history_size,
            cap=self.fleet_cap.workers,
        )
        self._deletions = DeletionConsumer(
            self._queues.queue(self.deletions_queue),
            self._store,
            self._pool,
            receive_wait_s=settings.receive_wait_s,
            visibility_timeout_s=settings.visibility_timeout_s,
        )

    def start(self, supervisor: Supervisor) -> None:
        assert self._sink is not None
        assert self._blob_check is not None
        self._announce_left_over()
        supervisor.start("blob-check", self._blob_check.run())
        supervisor.start("events", self._sink.run())
        supervisor.start("outbox-relay", self._sink.run_relay())
        supervisor.start("autoscaler", self._main_loop(supervisor))

    def begin_shutdown(self) -> None:
        """Take no new jobs; running ones have the grace period (shutdown_grace_s) from now."""
        self._stopping = True
        self.autoscaler.stop()
        if self._blob_check is not None:
            self._blob_check.stop()
        if self._deletions is not None:
            self._deletions.stop()
        if self._main is not None and self._main is not asyncio.current_task():
            self._main.cancel()  # still declaring subscriptions, perhaps
        self.pool.begin_stop(self.settings.shutdown_grace_s)

    async def close(self) -> None:
        """Hand running jobs back (after the grace period), announce 0 workers, put every event in the outbox, close."""
        if self._pool is not None:
            self.begin_shutdown()
            await self._pool.drain()
            self._announce_stopped()
        if self._sink is not None:
            await self._sink.close(SINK_FLUSH_S)
        for client in (self._queues, self._control, self._events):
            if client is not None:
                await client.aclose()
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    # -- readiness --------------------------------------------------------------------------------

    async def readiness(self) -> str | None:
        checks = (await self._blob_readiness(), await self._router_readiness(), await self._outbox_readiness())
        problems = [p for p in checks if p is not None]
        return "; ".join(problems) or None

    async def _blob_readiness(self) -> str | None:
        return None if self._blob_check is None else await self._blob_check.readiness()

    async def _outbox_readiness(self) -> str | None:
        return None if self._sink is None else await self._sink.db.readiness()

    async def _router_readiness(self) -> str | None:
        if not self.subscribed.is_set():
            return f"the subscriptions are not declared yet (is the router at {self.settings.router_base_url} up?)"
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                await self._client().stats(TRANSCODE_QUEUE)
        except (RouterError, TimeoutError) as exc:
            return f"the router at {self.settings.router_base_url} cannot be reached ({exc})"
        return None

    # -- internals --------------------------------------------------------------------------------

    def _client(self) -> RouterClient:
        assert self._control is not None
        return self._control

    async def _main_loop(self, supervisor: Supervisor) -> None:
        self._main = asyncio.current_task()
        if self._stopping:  # shut down before this task ever ran
            return
        client = self._client()
        await client.ensure_subscription(
            TRANSCODE_QUEUE,
            pattern={"type": [contract.UPLOADED, contract.RETRY_REQUESTED]},
            target={"queue": {}},
            delivery={"max_receive_count": self.settings.max_receive_count},
            start="earliest",
            wait_for_router=True,
        )
        await client.ensure_subscription(
            self.deletions_queue,
            pattern={"type": [contract.VIDEO_DELETED]},
            target={"queue": {}},
            delivery={"max_receive_count": 10},
            start="earliest",
            wait_for_router=True,
        )
        self.subscribed.set()
        log.info(
            "instance %s subscribed to %s and %s at %s",
            self.instance,
            TRANSCODE_QUEUE,
            self.deletions_queue,
            self.settings.router_base_url,
        )
        assert self._deletions is not None
        supervisor.start("deletions", self._deletions.run())
        await self.autoscaler.run()

    def _is_deleted(self, video_id: str) -> bool:
        return self._deletions is not None and self._deletions.is_deleted(video_id)

    def _threads(self, running: int) -> int:
        """ffmpeg threads per job: workers x threads fits the machine (each ffmpeg keeps its threads busy)."""
        return self.settings.ffmpeg_threads or max(1, cpu_count() // max(1, running))

    def _worker_idle(self) -> None:
        # A worker that finished its job may now be retired, if the queue no longer needs it.
        if self._autoscaler is not None:
            self._autoscaler.reconcile()

    def _announce_left_over(self) -> None:
        """After a run that could not say it stopped (kill -9, a power cut): say it now, once, for its workers.

        The store sums the last count each instance announced; without this, a killed instance's workers
        counted in the fleet until the instance next scaled, and an idle one never does."""
        left = self._announced.read()
        if left > 0:
            self._scaled(ScalingChange(time.time(), left, 0, 0, 0, 0, RESTARTED))

    def _announce_stopped(self) -> None:
        # The store sums the last count each instance announced: say this one runs none any more, or
        # its workers would count in the fleet for as long as it stays away.
        if self._announced_workers == 0 or self._autoscaler is None:
            return
        a = self._autoscaler
        self._scaled(ScalingChange(time.time(), self._announced_workers, 0, a.backlog, a.in_flight, 0, STOPPED))

    def _scaled(self, change: ScalingChange) -> None:
        self.metrics.scaled(change)
        self._scalings += 1
        self._announced_workers = change.to
        self._announced.write(change.to)
        if self._sink is not None:
            self._sink.announce(
                events.scaled(
                    self.instance,
                    self._start,
                    self._scalings,
                    from_=change.from_,
                    to=change.to,
                    backlog=change.backlog,
                    in_flight=change.in_flight,
                    busy=change.busy,
                    reason=change.reason,
                )
            )
