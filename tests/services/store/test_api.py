"""The store's HTTP API in-process: signed deliveries, reads, playback with ranges, retry, delete, the page."""

from __future__ import annotations

import json
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httpx

from services.common.blobs import video_key
from tests.services.store.conftest import FakeRouter, Store, completed, event, signed, uploaded

MP4 = bytes(range(256)) * 40  # 10240 bytes standing in for a rendition
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 100


async def ready_video(store: Store, video_id: str = "v1") -> None:
    for name in ("720p", "360p"):
        await store.bucket.write(video_key(video_id, f"{name}.mp4"), _chunks(MP4))
    await store.bucket.write(video_key(video_id, "poster.jpg"), _chunks(JPEG))
    assert (await store.deliver(uploaded(video_id, store.bucket))).status_code == 204
    assert (await store.deliver(completed(video_id, store.bucket))).status_code == 204


async def _chunks(data: bytes) -> Any:
    yield data


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


async def test_the_store_subscribes_to_the_video_events_with_ordered_push(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        subscription = store.router.subscriptions["store"]
        assert subscription["target"] == {"url": "http://store/inbox"}
        assert subscription["delivery"]["ordered"] is True and subscription["start"] == "earliest"
        assert {"prefix": "cattube.video."} in subscription["pattern"]["type"]
        assert (await store.api.get("/readyz")).status_code == 200


async def test_unsigned_and_forged_deliveries_are_refused(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        body = json.dumps(uploaded("v1", store.bucket))
        unsigned = await store.api.post(
            "/inbox", content=body, headers={"content-type": "application/cloudevents+json"}
        )
        assert "webhook-signature" in problem(unsigned, 401)["detail"]
        forged = signed(body, secret="whsec_" + "Zm9yZ2VkIHNlY3JldCBmb3JnZWQgc2VjcmV0IQ==")
        problem(await store.api.post("/inbox", content=body, headers=forged), 401)
        tampered = signed(body)
        problem(await store.api.post("/inbox", content=body.replace("Whiskers", "Mittens"), headers=tampered), 401)
        problem(await store.api.get("/videos/v1"), 404)
        assert (await store.deliver(uploaded("v1", store.bucket))).status_code == 204
        assert (await store.api.get("/videos/v1")).json()["title"] == "Whiskers on the beach"


async def test_an_unusable_delivery_gets_a_problem_the_router_will_not_retry(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        response = await store.deliver(event("cattube.transcode.progress", {"video_id": "a/b", "percent": 1}))
        assert problem(response, 422)["errors"] == [
            {"field": "data.video_id", "expected": "a video id: 1 to 64 characters of A-Z a-z 0-9 _ -"}
        ]


async def test_the_video_record_has_the_documented_shape(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        video = (await store.api.get("/videos/v1")).json()
        assert {"video_id", "title", "status", "renditions", "poster_url", "error", "progress"} <= video.keys()
        assert video["status"] == "ready" and video["poster_url"] == "http://store/videos/v1/poster"
        assert video["renditions"][0] == {
            "name": "720p",
            "url": "http://store/videos/v1/renditions/720p",
            "width": 1280,
            "height": 720,
            "size_bytes": 1000,
            "bitrate": 1_000_000,
            "duration_s": 2.0,
        }
        listed = (await store.api.get("/videos", params={"status": "ready"})).json()
        assert [v["video_id"] for v in listed["items"]] == ["v1"] and listed["next_cursor"] is None


async def test_bad_queries_get_problems_naming_the_field(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        assert problem(await store.api.get("/videos", params={"status": "lost"}), 422)["errors"][0]["field"] == (
            "query.status"
        )
        assert problem(await store.api.get("/videos", params={"limit": 0}), 422)["errors"][0]["field"] == "query.limit"
        assert problem(await store.api.get("/videos", params={"cursor": "x"}), 422)["errors"][0]["field"] == (
            "query.cursor"
        )
        assert problem(await store.api.get("/videos/bad%20id"), 422)["errors"][0]["field"] == "path.video_id"
        problem(await store.api.get("/videos/v1/renditions/huge"), 422)
        problem(await store.api.get("/videos/nobody"), 404)


async def test_renditions_stream_whole_and_by_range(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        url = "/videos/v1/renditions/720p"
        whole = await store.api.get(url)
        assert whole.status_code == 200 and whole.content == MP4
        assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-length"] == str(len(MP4))
        etag, modified = whole.headers["etag"], whole.headers["last-modified"]

        cases = {
            "bytes=0-99": (0, 100),
            "bytes=100-": (100, len(MP4)),
            "bytes=-500": (len(MP4) - 500, len(MP4)),
            "bytes=0-": (0, len(MP4)),
            "bytes=10000-999999": (10000, len(MP4)),
            "bytes=-999999": (0, len(MP4)),
        }
        for header, (start, end) in cases.items():
            part = await store.api.get(url, headers={"Range": header})
            assert part.status_code == 206, header
            assert part.content == MP4[start:end], header
            assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{len(MP4)}"
            assert part.headers["content-length"] == str(end - start) and part.headers["etag"] == etag

        for header in ("bytes=10240-", "bytes=99999-", "bytes=-0", "bytes=5-2", "bytes=abc", "bytes=-"):
            refused = await store.api.get(url, headers={"Range": header})
            problem(refused, 416)
            assert refused.headers["content-range"] == f"bytes */{len(MP4)}", header
        for header in ("items=0-5", "bytes=0-1,5-6"):  # another unit, several ranges: the whole object
            assert (await store.api.get(url, headers={"Range": header})).status_code == 200

        assert (await store.api.get(url, headers={"If-None-Match": etag})).status_code == 304
        assert (await store.api.get(url, headers={"If-None-Match": f'"other", W/{etag}'})).status_code == 304
        assert (await store.api.get(url, headers={"If-None-Match": '"other"'})).status_code == 200
        unchanged = await store.api.get(url, headers={"If-Modified-Since": modified})
        assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag and not unchanged.content
        past = formatdate(0, usegmt=True)
        assert (await store.api.get(url, headers={"If-Modified-Since": past})).status_code == 200

        fresh = await store.api.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
        stale = await store.api.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        assert (fresh.status_code, stale.status_code) == (206, 200)

        head = await store.api.head(url, headers={"Range": "bytes=0-99"})
        assert head.status_code == 206 and head.content == b"" and head.headers["content-length"] == "100"


async def test_the_poster_is_a_jpeg_and_missing_things_are_404(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        poster = await store.api.get("/videos/v1/poster")
        assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg" and poster.content == JPEG
        assert "no rendition 1080p" in problem(await store.api.get("/videos/v1/renditions/1080p"), 404)["detail"]
        await store.bucket.delete_prefix("videos/v1/")
        assert "missing" in problem(await store.api.get("/videos/v1/renditions/720p"), 404)["detail"]


async def test_retry_is_for_failed_videos_and_carries_master_and_probe(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await store.deliver(uploaded("v1", store.bucket))
        problem(await store.api.post("/videos/v1/retry"), 409)
        reason = "No video frame could be decoded."
        data = {"video_id": "v1", "attempt": 1, "permanent": True, "reason": reason}
        await store.deliver(event("cattube.transcode.failed", data))
        failed = (await store.api.get("/videos/v1")).json()
        assert (failed["status"], failed["error"]) == ("failed", reason)
        (announcement,) = await store.published("cattube.video.failed")
        assert announcement["data"]["video_id"] == "v1" and announcement["data"]["status"] == "failed"

        retried = await store.api.post("/videos/v1/retry")
        assert retried.status_code == 202 and retried.json()["status"] == "processing"
        (request,) = await store.published("cattube.video.retry-requested")
        assert request["partitionkey"] == "v1" and request["data"]["renditions"] == ["720p", "360p"]
        assert request["data"]["master"]["uri"].endswith("master.mp4") and request["data"]["probe"]["fps"] == 25.0
        problem(await store.api.post("/videos/v1/retry"), 409)
        problem(await store.api.post("/videos/nobody/retry"), 404)


async def test_delete_publishes_the_blobs_and_leaves_404s(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        response = await store.api.delete("/videos/v1")
        assert response.status_code == 202 and response.json()["status"] == "deleted"
        (deletion,) = await store.published("cattube.video.deleted")
        assert len(deletion["data"]["blob_uris"]) == 4 and deletion["data"]["video_id"] == "v1"
        assert "deleted" in problem(await store.api.get("/videos/v1"), 404)["detail"]
        problem(await store.api.get("/videos/v1/renditions/720p"), 404)
        assert (await store.api.get("/videos")).json()["items"] == []
        tombstones = (await store.api.get("/videos", params={"status": "deleted"})).json()["items"]
        assert [v["video_id"] for v in tombstones] == ["v1"]
        assert (await store.api.delete("/videos/v1")).status_code == 202  # idempotent
        problem(await store.api.delete("/videos/nobody"), 404)


async def test_with_a_token_mutations_need_it_and_reads_do_not(make_store: Callable[..., Any]) -> None:
    async with make_store(token="s3cret") as store:
        await ready_video(store)
        assert (await store.api.get("/videos/v1")).status_code == 200
        assert (await store.api.get("/videos/v1/renditions/720p")).status_code == 200
        assert (await store.api.get("/")).status_code == 200
        refused = await store.api.delete("/videos/v1")
        problem(refused, 401)
        assert refused.headers["www-authenticate"] == "Bearer"
        problem(await store.api.post("/videos/v1/retry", headers={"Authorization": "Bearer wrong"}), 401)
        accepted = await store.api.delete("/videos/v1", headers={"Authorization": "Bearer s3cret"})
        assert accepted.status_code == 202


async def test_the_user_token_retries_and_deletes(make_store: Callable[..., Any]) -> None:
    router = FakeRouter()
    async with make_store(router, token="admin-t", service_token="service-t", user_token="user-t") as store:
        await ready_video(store)
        assert (await store.api.get("/videos/v1")).status_code == 200
        assert (await store.api.get("/autoscaler/history")).status_code == 200
        problem(await store.api.get("/metrics", headers={"Authorization": "Bearer user-t"}), 403)
        accepted = await store.api.delete("/videos/v1", headers={"Authorization": "Bearer user-t"})
        assert accepted.status_code == 202
        await store.published("cattube.video.deleted")
    assert router.authorizations == {"Bearer service-t"}  # the router is called with the service token


async def test_events_wait_in_the_outbox_while_the_router_is_down(make_store: Callable[..., Any]) -> None:
    router = FakeRouter(status=503)
    async with make_store(router) as store:
        relay = store.app.state.relay
        relay.backoff_initial_s = relay.backoff_max_s = 0.05
        await ready_video(store)
        await store.api.delete("/videos/v1")
        await router.wait_for(lambda: router.attempts >= 3)  # it keeps trying, on its backoff
        assert router.published == [] and "503" in relay.last_error
        router.status = 202
        await store.published("cattube.video.deleted")
        assert [e["type"] for e in router.published] == ["cattube.video.ready", "cattube.video.deleted"]


async def test_the_page_carries_its_config_and_a_strict_policy(make_store: Callable[..., Any]) -> None:
    async with make_store(upload_public_url="http://uploads.example:8701", token="t") as store:
        page = await store.api.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        start = page.text.index('<script id="cattube-config" type="application/json">') + 52
        config = json.loads(page.text[start : page.text.index("</script>", start)])
        assert config["upload_url"] == "http://uploads.example:8701" and config["token_required"] is True
        assert 'action="http://uploads.example:8701/videos"' in page.text
        assert "connect-src 'self' http://uploads.example:8701" in page.headers["content-security-policy"]
        for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            response = await store.api.get(f"/static/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"]


async def test_ops_endpoints_and_history(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        data = {"from": 0, "to": 2, "backlog": 2, "in_flight": 0, "reason": "2 jobs waiting"}
        await store.deliver(event("cattube.processing.scaled", data))
        history = (await store.api.get("/autoscaler/history")).json()["items"]
        assert [(p["from"], p["to"], p["backlog"]) for p in history] == [(0, 2, 2)]
        await ready_video(store)
        metrics = (await store.api.get("/metrics")).text
        assert 'cattube_store_videos{status="ready"} 1.0' in metrics
        assert 'cattube_store_events_total{result="applied",type="cattube.video.uploaded"} 1.0' in metrics
        assert (await store.api.get("/healthz")).json() == {"status": "ok"}
