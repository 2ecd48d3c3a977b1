"""The processing app in-process, against an in-process router: its API, and jobs that never reach ffmpeg."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import m3u8
import pytest
from fastapi import FastAPI

from router.api import SUBSCRIPTION_NAME
from router.client import RouterClient, new_event
from services.common.blobs import FileBlobStore, video_key
from services.common.errors import Unavailable
from services.common.s3_blobs import S3BlobStore
from services.processing.app import create_app
from services.processing.deletions import deletions_queue_name
from services.processing.settings import ProcessingSettings
from tests.conftest import running
from tests.media import make_clip, probe_of
from tests.replicas import DOWN, Replicas
from tests.s3 import CLIENT, S3Server, fresh_bucket
from tests.services.processing.test_transcode import children_of_this_process

PROBE = {"duration_s": 1.0, "width": 320, "height": 180, "fps": 10.0, "video_codec": "h264", "rotation": 0}


@dataclass
class Stack:
    api: httpx.AsyncClient
    router: RouterClient
    store: FileBlobStore
    app: FastAPI


class ReceiveWatch(httpx.AsyncBaseTransport):
    """The router's transport, counting the processing service's transcode receives in flight."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.in_flight = 0
        self.most_in_flight = 0
        self.changed = asyncio.Condition()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/subscriptions/transcode/receive":
            return await self.inner.handle_async_request(request)
        await self._count(+1)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            await self._count(-1)

    async def _count(self, step: int) -> None:
        async with self.changed:
            self.in_flight += step
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.changed.notify_all()

    async def until(self, holds: Callable[[], bool]) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(holds)


@pytest.fixture
def make_stack(tmp_path: Path, router_app: FastAPI) -> Callable[..., Any]:
    transport = httpx.ASGITransport(app=router_app)

    def make(*, watch: ReceiveWatch | None = None, **overrides: Any) -> Any:
        defaults: dict[str, Any] = {"max_workers": 2, "scale_in_cooldown_s": 0.1, "retry_delay_s": 0}
        settings = ProcessingSettings(data_dir=tmp_path / "data", router_url="http://router", **(defaults | overrides))
        app = create_app(settings, exit_on_failure=False, router_transport=watch or transport)

        async def stack() -> AsyncIterator[Stack]:
            async with running(app) as api, RouterClient("http://router", transport=transport) as router:
                await wait_ready(app)
                assert (await api.get("/readyz")).status_code == 200
                yield Stack(api, router, FileBlobStore(tmp_path / "data" / "bucket"), app)

        return stack()

    return make


async def wait_ready(app: FastAPI) -> None:
    """The subscriptions are declared by a background task: wait for it."""
    await asyncio.wait_for(app.state.processing.subscribed.wait(), 5)


async def observe(router: RouterClient, name: str = "observer") -> None:
    await router.ensure_subscription(
        name,
        pattern={"type": [{"prefix": "cattube.transcode."}, "cattube.processing.scaled"]},
        target={"queue": {}},
        start="earliest",
    )


async def events_until(
    router: RouterClient, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 10
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    queue = router.queue("observer")
    async with asyncio.timeout(timeout_s):
        while not done(seen):
            for message in await queue.receive(max_messages=10, wait_s=5):
                seen.append(message.event)
                await queue.ack([message.receipt])
    return seen


def uploaded(video_id: str, master_uri: str | None, **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"video_id": video_id, "renditions": ["144p"], "probe": PROBE, **data}
    if master_uri is not None:
        body["master"] = {"uri": master_uri, "size_bytes": 1, "sha256": "0" * 64, "content_type": "video/mp4"}
    return new_event("cattube.video.uploaded", "cattube/upload", body, id=video_id, partitionkey=video_id)


async def test_autoscaler_api_reports_and_validates(make_stack: Callable[..., Any]) -> None:
    async for stack in make_stack():
        state = (await stack.api.get("/autoscaler")).json()
        assert state | {"history": []} == {
            "instance": socket.gethostname(),  # CATTUBE_INSTANCE's default
            "min_workers": 0,
            "max_workers": 2,
            "max_workers_effective": 2,
            "max_workers_reason": state["max_workers_reason"],
            "target_backlog_per_worker": 1,
            "scale_in_cooldown_s": 0.1,
            "desired": 0,
            "running": 0,
            "busy": 0,
            "retiring": 0,
            "backlog": 0,
            "in_flight": 0,
            "history": [],
        }

        for body, field in [
            ({"min_workers": 3}, "body.min_workers"),
            ({"max_workers": -1}, "body.max_workers"),
            ({"target_backlog_per_worker": 0}, "body.target_backlog_per_worker"),
            ({"min_workers": -1}, "body.min_workers"),
            ({"max_workers": "many"}, "body.max_workers"),
            # Strict types: a boolean or a numeric string is not a number of workers (false would pause).
            ({"max_workers": False}, "body.max_workers"),
            ({"min_workers": True}, "body.min_workers"),
            ({"max_workers": "3"}, "body.max_workers"),
            ({"target_backlog_per_worker": 2.0}, "body.target_backlog_per_worker"),
            ({"workers": 3}, "body.workers"),
        ]:
            refused = await stack.api.put("/autoscaler", json=body)
            assert refused.status_code == 422, body
            assert refused.headers["content-type"] == "application/problem+json"
            assert [e["field"] for e in refused.json()["errors"]] == [field], refused.json()

        changed = await stack.api.put("/autoscaler", json={"min_workers": 1, "max_workers": 1337})
        assert changed.status_code == 200
        state = changed.json()
        assert (state["min_workers"], state["max_workers"], state["running"]) == (1, 1337, 1)
        (change,) = state["history"]
        assert (change["from"], change["to"]) == (0, 1) and "min_workers set to 1" in change["reason"]
        assert change["at"].endswith("Z") or "+00:00" in change["at"]

        metrics = (await stack.api.get("/metrics")).text
        assert 'cattube_processing_workers{state="idle"} 1.0' in metrics
        assert "cattube_processing_workers_max 1337.0" in metrics
        assert "/autoscaler" in (await stack.api.get("/openapi.json")).text


async def test_jobs_that_cannot_run_fail_permanently_and_are_acked(make_stack: Callable[..., Any]) -> None:
    async for stack in make_stack():
        await observe(stack.router)
        outside = (stack.store.root.parent / "elsewhere.mp4").as_uri()
        missing = stack.store.uri(video_key("gone", "master.mp4"))
        other = stack.store.uri(video_key("someone-else", "master.mp4"))
        await stack.router.publish_batch(
            [
                new_event(
                    "cattube.video.retry-requested",
                    "cattube/store",
                    {"video_id": "retry", "renditions": ["144p"]},
                    id="retry",
                    partitionkey="retry",
                ),
                uploaded("outside", outside),
                uploaded("gone", missing),
                uploaded("stolen", other),
                uploaded("nameless", missing, renditions=[]),
            ]
        )
        seen = await events_until(
            stack.router, lambda seen: sum(e["type"] == "cattube.transcode.failed" for e in seen) == 5
        )
        failed = {e["data"]["video_id"]: e["data"] for e in seen if e["type"] == "cattube.transcode.failed"}
        assert all(f["permanent"] is True and f["attempt"] == 1 for f in failed.values())
        # None of them blames the master itself: a person may put things right and retry.
        assert all(f["input_rejected"] is False for f in failed.values())
        assert "retry request carries no master and probe" in failed["retry"]["reason"]
        assert "not in this service's bucket" in failed["outside"]["reason"]
        assert "no longer in the bucket" in failed["gone"]["reason"]
        assert "does not belong to video stolen" in failed["stolen"]["reason"]
        assert "asks for no renditions" in failed["nameless"]["reason"]
        for event in seen:
            if event["type"].startswith("cattube.transcode."):
                assert event["source"] == "cattube/processing"
                assert event["partitionkey"] == event["data"]["video_id"]

        async for stats in stack.router.watch_stats("transcode", wait_s=5):
            if (stats.backlog, stats.in_flight, stats.delayed) == (0, 0, 0):
                break
        assert stats.dead_lettered == 0


async def test_deleted_video_loses_every_blob(make_stack: Callable[..., Any]) -> None:
    async def parts(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async for stack in make_stack():
        for name in ("master.mp4", "720p.mp4", "poster.jpg"):
            await stack.store.write(video_key("doomed", name), parts(b"x"))
        await stack.store.write(video_key("kept", "master.mp4"), parts(b"x"))
        await stack.router.publish(
            new_event("cattube.video.deleted", "cattube/store", {"video_id": "doomed"}, id="doomed/deleted")
        )
        async for stats in stack.router.watch_stats(deletions_queue_name(socket.gethostname()), wait_s=5):
            if stats.delivered_total == 1 and (stats.backlog, stats.in_flight) == (0, 0):
                break
        assert await stack.store.stat(video_key("doomed", "master.mp4")) is None
        assert not (stack.store.root / "videos" / "doomed").exists()
        assert await stack.store.stat(video_key("kept", "master.mp4")) is not None


async def test_token_guards_everything_but_health(make_stack: Callable[..., Any]) -> None:
    async for stack in make_stack(token="secret"):
        assert (await stack.api.get("/healthz")).status_code == 200
        refused = await stack.api.get("/autoscaler")
        assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
        allowed = await stack.api.get("/autoscaler", headers={"Authorization": "Bearer secret"})
        assert allowed.status_code == 200


async def test_only_the_admin_token_changes_the_autoscaler(make_stack: Callable[..., Any]) -> None:
    async for stack in make_stack(token="admin-t", service_token="service-t", user_token="user-t"):
        for token in ("user-t", "service-t"):
            refused = await stack.api.put(
                "/autoscaler", json={"max_workers": 0}, headers={"Authorization": f"Bearer {token}"}
            )
            assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["scope"] == "admin"
        user_read = await stack.api.get("/autoscaler", headers={"Authorization": "Bearer user-t"})
        assert user_read.status_code == 403
        read = await stack.api.get("/autoscaler", headers={"Authorization": "bearer service-t"})
        assert read.status_code == 200 and read.json()["max_workers"] == 2
        changed = await stack.api.put(
            "/autoscaler", json={"max_workers": 1}, headers={"Authorization": "Bearer admin-t"}
        )
        assert changed.status_code == 200 and changed.json()["max_workers"] == 1


async def test_a_job_past_its_time_limit_is_retried_then_dead_lettered(
    make_stack: Callable[..., Any], tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 160, 90, 1, fps=10)
    # A limit no ffmpeg run can meet: every attempt is killed, reported as transient, and nacked.
    async for stack in make_stack(job_timeout_factor=1e-6, job_timeout_base_s=0, max_receive_count=3):
        await observe(stack.router)
        info = await stack.store.put_file(video_key("late", "master.mp4"), clip)
        await stack.router.publish(uploaded("late", info.uri))
        seen = await events_until(
            stack.router, lambda seen: sum(e["type"] == "cattube.transcode.failed" for e in seen) == 3
        )
        failed = [e["data"] for e in seen if e["type"] == "cattube.transcode.failed"]
        assert [(f["attempt"], f["permanent"]) for f in failed] == [(1, False), (2, False), (3, False)]
        assert "time limit" in failed[0]["reason"]
        assert len({e["id"] for e in seen}) == len(seen)  # every attempt's events have ids of their own
        async for stats in stack.router.watch_stats("transcode", wait_s=5):
            if stats.dead_lettered == 1:
                break
        assert (stats.backlog, stats.in_flight) == (0, 0)
        assert await stack.store.stat(video_key("late", "144p.mp4")) is None
        assert children_of_this_process() == []  # each killed ffmpeg was reaped


async def test_starts_without_a_router_and_says_it_is_not_ready(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = ProcessingSettings(data_dir=tmp_path / "data", router_url=url, min_workers=0)
        app = create_app(settings, exit_on_failure=False)
        async with running(app) as api:
            assert (await api.get("/healthz")).status_code == 200
            ready = await api.get("/readyz")
            assert ready.status_code == 503 and "not declared yet" in ready.json()["detail"]
            assert (await api.get("/autoscaler")).json()["running"] == 0


async def test_partial_outputs_left_by_a_killed_run_are_swept_at_start(
    make_stack: Callable[..., Any], tmp_path: Path
) -> None:
    # What kill -9 mid-transcode leaves: a job's work directory with ffmpeg's hidden partial outputs,
    # for a video that still exists and for one deleted since.
    work = tmp_path / "data" / "processing" / "work"
    planted = [work / "kept.k2j4x1" / "out" / ".transcode-a8f3", work / "deleted.p0q9z7" / "out" / ".transcode-77b1"]
    for folder in planted:
        folder.mkdir(parents=True)
        (folder / "720p.mp4").write_bytes(b"\x00" * 1000)
    (work / "kept.k2j4x1" / "master.mp4").write_bytes(b"x")
    async for _stack in make_stack():
        assert list(work.iterdir()) == []


async def test_after_max_workers_0_returns_no_new_job_starts(
    make_stack: Callable[..., Any], router_app: FastAPI
) -> None:
    watch = ReceiveWatch(httpx.ASGITransport(app=router_app))
    async for stack in make_stack(min_workers=1, receive_wait_s=2, watch=watch):
        service = stack.app.state.processing
        await watch.until(lambda: watch.in_flight == 1)  # an idle worker's receive is waiting for a job
        paused = await stack.api.put("/autoscaler", json={"min_workers": 0, "max_workers": 0})
        assert paused.status_code == 200 and paused.json()["running"] == 0
        await stack.router.publish(uploaded("late", None))
        # Every receive of the paused service has ended, and the job still waits in the queue: none started.
        await watch.until(lambda: watch.in_flight == 0)
        stats = await stack.router.stats("transcode")
        assert (stats.backlog, stats.in_flight, stats.delivered_total) == (1, 0, 0)
        assert service.pool.busy == 0 and service.pool.running == 0


async def test_a_large_fleet_shares_one_receive(make_stack: Callable[..., Any], router_app: FastAPI) -> None:
    watch = ReceiveWatch(httpx.ASGITransport(app=router_app))
    async for stack in make_stack(min_workers=50, max_workers=50, watch=watch):
        await observe(stack.router)
        await watch.until(lambda: watch.in_flight >= 1)
        assert (await stack.api.get("/autoscaler")).json()["running"] == 50
        missing = stack.store.uri(video_key("gone", "master.mp4"))
        await stack.router.publish_batch([uploaded(f"v{n}", missing) for n in range(12)])
        seen = await events_until(
            stack.router, lambda seen: sum(e["type"] == "cattube.transcode.failed" for e in seen) == 12
        )
        assert len({e["data"]["video_id"] for e in seen if e["type"] == "cattube.transcode.failed"}) == 12
        # 50 idle workers, one long poll between them (each worker its own poll would be 50 open connections).
        assert watch.most_in_flight == 1


async def test_the_fleet_is_capped_by_the_open_file_limit_and_says_so(
    make_stack: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.processing.capacity.open_files_limit", lambda: 1024)
    async for stack in make_stack(min_workers=200, max_workers=1337):
        state = (await stack.api.get("/autoscaler")).json()
        # (1024 - 256 kept for the service) // 8 files per running job
        assert (state["max_workers"], state["max_workers_effective"], state["running"]) == (1337, 96, 96)
        assert "RLIMIT_NOFILE" in state["max_workers_reason"] and "1024" in state["max_workers_reason"]
        changed = (await stack.api.put("/autoscaler", json={"max_workers": 50, "min_workers": 0})).json()
        assert (changed["max_workers"], changed["max_workers_effective"]) == (50, 50)
        assert changed["max_workers_reason"].startswith("max_workers, as set")


async def test_a_second_instance_on_the_same_data_dir_is_refused(
    make_stack: Callable[..., Any], tmp_path: Path
) -> None:
    # Its start-up sweep would remove the first one's running jobs' outputs, and they would share one outbox.
    async for _stack in make_stack():
        settings = ProcessingSettings(data_dir=tmp_path / "data", router_url="http://router")
        second = create_app(settings, exit_on_failure=False)
        with pytest.raises(Unavailable, match="another processing instance is using"):
            async with running(second):
                pass


async def test_with_two_routers_listed_it_works_through_the_one_that_answers(
    tmp_path: Path, router_app: FastAPI
) -> None:
    replicas = Replicas({"http://down": DOWN, "http://router": httpx.ASGITransport(app=router_app)})
    settings = ProcessingSettings(data_dir=tmp_path / "data", router_url="http://down,http://router", max_workers=1)
    app = create_app(settings, exit_on_failure=False, router_transport=replicas)
    async with running(app) as api:
        await wait_ready(app)  # both subscriptions declared
        assert (await api.get("/readyz")).status_code == 200
    assert "http://down" in replicas.seen
    async with RouterClient("http://router", transport=httpx.ASGITransport(app=router_app)) as router:
        assert (await router.get_subscription("transcode"))["target"] == {"queue": {}}


class StatsWatch(httpx.AsyncBaseTransport):
    """The router's transport, telling when the autoscaler has read the transcode queue's numbers of a version.

    `watch_stats` asks for the numbers after version V only once its reader (the autoscaler) has acted on V.
    Versions are digests of the numbers (router.bus.stats_version), not a count: remember each one asked.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.acted_on: set[int] = set()
        self.changed = asyncio.Condition()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        version = request.url.params.get("version")
        if request.url.path == "/subscriptions/transcode/stats" and version is not None:
            async with self.changed:
                self.acted_on.add(int(version))
                self.changed.notify_all()
        return await self.inner.handle_async_request(request)

    async def until_acted_on(self, version: int) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: version in self.acted_on)


async def test_jobs_another_instance_holds_ask_for_no_workers_here(
    make_stack: Callable[..., Any], router_app: FastAPI
) -> None:
    watch = StatsWatch(httpx.ASGITransport(app=router_app))
    async for stack in make_stack(max_workers=0, watch=watch):
        await stack.router.publish_batch([uploaded(f"v{n}", None) for n in range(3)])
        # Another instance (this test) takes all three: nothing waits, three run elsewhere.
        held = await stack.router.queue("transcode").receive(max_messages=3, visibility_timeout_s=60)
        assert len(held) == 3
        stats = await stack.router.stats("transcode")
        assert (stats.backlog, stats.in_flight) == (0, 3)
        await watch.until_acted_on(stats.version)
        state = (await stack.api.put("/autoscaler", json={"min_workers": 1, "max_workers": 3})).json()
        assert (state["backlog"], state["in_flight"], state["busy"]) == (0, 3, 0)
        assert (state["desired"], state["running"]) == (1, 1)  # min_workers: no idle workers for others' jobs


async def test_the_instance_is_named_in_its_events_and_its_api(make_stack: Callable[..., Any]) -> None:
    async for stack in make_stack(instance="edge-1"):
        await observe(stack.router)
        await stack.router.publish(uploaded("v1", stack.store.uri(video_key("v1", "master.mp4"))))
        seen = await events_until(stack.router, lambda seen: any(e["type"] == "cattube.transcode.failed" for e in seen))
        (started,) = [e for e in seen if e["type"] == "cattube.transcode.started"]
        assert started["data"]["instance"] == "edge-1"
        assert started["data"]["worker"].startswith("worker-edge-1-")
        scaled = [e for e in seen if e["type"] == "cattube.processing.scaled"]
        assert scaled and {e["data"]["instance"] for e in scaled} == {"edge-1"}
        assert (await stack.api.get("/autoscaler")).json()["instance"] == "edge-1"


def test_the_instance_defaults_to_the_hostname(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CATTUBE_INSTANCE", raising=False)
    assert ProcessingSettings(data_dir=tmp_path).instance == socket.gethostname()
    monkeypatch.setenv("CATTUBE_INSTANCE", "edge-2")
    assert ProcessingSettings(data_dir=tmp_path).instance == "edge-2"


@pytest.mark.parametrize(
    "instance", ["edge-1", "host.example.org", "my host/1", "_x", "é" * 10, "a" * 253, "a" * 60, "a" * 59]
)
def test_the_deletion_queue_name_is_a_valid_subscription_name(instance: str) -> None:
    name = deletions_queue_name(instance)
    assert SUBSCRIPTION_NAME.fullmatch(name), name
    assert name == deletions_queue_name(instance)  # stable: a restart finds it again


def test_instance_names_that_sanitise_alike_get_distinct_queues() -> None:
    assert deletions_queue_name("edge-1") == "processing-deletions-edge-1"
    assert len({deletions_queue_name(name) for name in ("a/b", "a-b", "a b", "a" * 70, "a" * 71)}) == 5


async def subscription_names(router_app: FastAPI) -> set[str]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router_app), base_url="http://router") as http:
        return {sub["name"] for sub in (await http.get("/subscriptions")).json()["items"]}


async def test_each_instance_has_one_deletion_queue_that_a_restart_takes_up_again(
    tmp_path: Path, router_app: FastAPI
) -> None:
    transport = httpx.ASGITransport(app=router_app)

    def app_for(instance: str) -> FastAPI:
        settings = ProcessingSettings(
            data_dir=tmp_path / instance, router_url="http://router", max_workers=1, instance=instance
        )
        return create_app(settings, exit_on_failure=False, router_transport=transport)

    before = await subscription_names(router_app)
    for _restart in range(2):
        first, second = app_for("edge-1"), app_for("edge-2")
        async with running(first), running(second):
            await wait_ready(first)
            await wait_ready(second)
    added = await subscription_names(router_app) - before
    assert added == {"transcode", "processing-deletions-edge-1", "processing-deletions-edge-2"}

    # A deletion published while both are down reaches each of them once they are back.
    async with RouterClient("http://router", transport=transport) as router:
        await router.publish(new_event("cattube.video.deleted", "cattube/store", {"video_id": "gone"}, id="gone/del"))
        first, second = app_for("edge-1"), app_for("edge-2")
        async with running(first), running(second):
            for instance in ("edge-1", "edge-2"):
                async for stats in router.watch_stats(deletions_queue_name(instance), wait_s=5):
                    if stats.delivered_total == 1 and (stats.backlog, stats.in_flight) == (0, 0):
                        break
    assert await subscription_names(router_app) - before == added


async def test_a_missing_bucket_is_named_by_readyz_and_the_service_stays_up(tmp_path: Path, s3_env: None) -> None:
    missing = "cattube-test-no-such-bucket"
    blob_url = f"s3://{missing}/media"
    settings = ProcessingSettings(
        data_dir=tmp_path / "data", router_url="http://127.0.0.1:9", blob_url=blob_url, min_workers=0
    )
    app = create_app(settings, exit_on_failure=False)
    async with running(app) as api:
        await asyncio.wait_for(app.state.processing.blob_check.answered.wait(), 30)
        assert (await api.get("/healthz")).status_code == 200
        ready = await api.get("/readyz")
        assert ready.status_code == 503 and f"the bucket '{missing}' does not exist" in ready.json()["detail"]


async def test_a_stopping_instance_announces_it_runs_no_workers_any_more(
    make_stack: Callable[..., Any], router_app: FastAPI
) -> None:
    # Otherwise the store would count its last workers in the fleet for as long as it stays away.
    async for stack in make_stack(instance="edge-3", min_workers=1):
        await observe(stack.router)
        await events_until(stack.router, lambda seen: any(e["data"]["to"] == 1 for e in seen))
    async with RouterClient("http://router", transport=httpx.ASGITransport(app=router_app)) as router:
        (last,) = await events_until(router, lambda seen: bool(seen))
    assert last["type"] == "cattube.processing.scaled"
    assert (last["data"]["instance"], last["data"]["from"], last["data"]["to"]) == ("edge-3", 1, 0)
    assert last["data"]["reason"] == "the instance stopped"


async def test_a_job_on_an_s3_bucket_stores_its_hls_package_and_a_deletion_takes_it(
    make_stack: Callable[..., Any], s3: S3Server, s3_env: None, tmp_path: Path
) -> None:
    async with fresh_bucket(s3) as bucket:
        url = f"s3://{bucket}/media"
        store = S3BlobStore(url, config=s3.config(), client_options=CLIENT)  # type: ignore[arg-type]
        clip = make_clip(tmp_path / "clip.mp4", 320, 180, 1)
        async for stack in make_stack(blob_url=url):
            await observe(stack.router)
            master = await store.put_file(video_key("cloudy", "master.mp4"), clip)
            await stack.router.publish(uploaded("cloudy", master.uri, probe=probe_of(clip)))
            seen = await events_until(
                stack.router, lambda seen: any(e["type"] == "cattube.transcode.completed" for e in seen), 30
            )
            (completed,) = [e["data"] for e in seen if e["type"] == "cattube.transcode.completed"]
            hls_key = store.key_of(completed["hls"]["uri"])
            folder = hls_key.rsplit("/", 1)[0]
            assert sorted(await store.list(f"{folder}/")) == [
                f"{folder}/144p/index.m3u8", f"{folder}/144p/init.mp4", f"{folder}/144p/seg-00000.m4s", hls_key,
            ]  # fmt: skip
            text = b"".join([chunk async for chunk in store.read(hls_key)]).decode()
            assert [v.uri for v in m3u8.M3U8(text, strict=True).playlists] == ["144p/index.m3u8"]

            await stack.router.publish(
                new_event("cattube.video.deleted", "cattube/store", {"video_id": "cloudy"}, id="cloudy/deleted")
            )
            async for stats in stack.router.watch_stats(deletions_queue_name(socket.gethostname()), wait_s=5):
                if stats.delivered_total == 1 and (stats.backlog, stats.in_flight) == (0, 0):
                    break
            assert await store.list("videos/cloudy/") == []
