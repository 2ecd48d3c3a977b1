"""Queue subscriptions with SQS semantics: receive, long polls, visibility, ack/nack/extend, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.conftest import running
from tests.router.events import BATCH, STRUCTURED, event

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)

JSON_TYPE = {"Content-Type": "application/json"}


async def make_queue(router: httpx.AsyncClient, name: str = "q", pattern: Any = None, **delivery: Any) -> None:
    response = await router.put(
        f"/subscriptions/{name}", json={"pattern": pattern, "target": {"queue": {}}, "delivery": delivery}
    )
    assert response.status_code in (200, 201), response.text


async def publish(router: httpx.AsyncClient, *events: dict[str, Any]) -> None:
    response = await router.post("/events", content=json.dumps(list(events)), headers=BATCH)
    assert response.status_code == 202, response.text


async def receive(router: httpx.AsyncClient, name: str = "q", **body: Any) -> list[dict[str, Any]]:
    response = await router.post(f"/subscriptions/{name}/receive", json=body)
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


async def stats(router: httpx.AsyncClient, name: str = "q") -> dict[str, Any]:
    result: dict[str, Any] = (await router.get(f"/subscriptions/{name}/stats")).json()
    return result


async def test_only_matching_events_are_queued_in_order(router: httpx.AsyncClient) -> None:
    await make_queue(router, pattern={"type": ["cattube.video.uploaded"], "data": {"size": [{"numeric": [">", 10]}]}})
    await publish(
        router,
        event("cattube.video.uploaded", id="big", data={"size": 11}),
        event("cattube.video.uploaded", id="small", data={"size": 3}),
        event("cattube.other", id="other", data={"size": 99}),
        event("cattube.video.uploaded", id="big2", data={"size": 50}),
    )
    messages = await receive(router, max_messages=10)
    assert [m["event"]["id"] for m in messages] == ["big", "big2"]
    assert all(m["attempt"] == 1 for m in messages)


async def test_received_messages_are_hidden_until_acked(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    await publish(router, event(id="one"))
    (message,) = await receive(router)
    assert await receive(router) == []
    assert (await stats(router))["in_flight"] == 1
    acked = (await router.post("/subscriptions/q/ack", json={"receipts": [message["receipt"]]})).json()
    assert acked == {"results": [{"receipt": message["receipt"], "ok": True, "error": None}]}
    numbers = await stats(router)
    assert (numbers["backlog"], numbers["in_flight"], numbers["delivered_total"]) == (0, 0, 1)
    again = (await router.post("/subscriptions/q/ack", json={"receipts": [message["receipt"]]})).json()
    assert again["results"][0]["ok"] is False and "receipt" in again["results"][0]["error"]


async def test_a_message_comes_back_after_its_visibility_timeout(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    await publish(router, event(id="v"))
    await make_queue(router, "idle", pattern={"source": ["nobody"]})
    (first,) = await receive(router, visibility_timeout_s=0.2)
    returned = asyncio.create_task(receive(router, wait_s=20))
    yardstick = asyncio.create_task(receive(router, "idle", wait_s=3))  # can only end at its wait's end
    done, _ = await asyncio.wait({returned, yardstick}, return_when=asyncio.FIRST_COMPLETED)
    assert returned in done  # woken by the visibility timer, not at its long poll's end (nor by a poll)
    (second,) = returned.result()
    assert second["event"]["id"] == "v" and second["attempt"] == 2
    assert await yardstick == []
    stale = (await router.post("/subscriptions/q/ack", json={"receipts": [first["receipt"]]})).json()
    assert stale["results"][0]["ok"] is False
    assert (await router.post("/subscriptions/q/ack", json={"receipts": [second["receipt"]]})).json()["results"][0][
        "ok"
    ]


async def test_a_long_poll_returns_as_soon_as_an_event_is_published(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    waiting = asyncio.create_task(receive(router, wait_s=10))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await publish(router, event(id="late"))
    messages = await asyncio.wait_for(waiting, 5)
    assert [m["event"]["id"] for m in messages] == ["late"]


async def test_a_long_poll_with_nothing_to_receive_ends_at_wait_s(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    started = time.monotonic()
    assert await receive(router, wait_s=0.3) == []
    assert time.monotonic() - started >= 0.3


async def test_nack_with_delay_hides_then_redelivers(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    await publish(router, event(id="n"))
    (message,) = await receive(router)
    nacked = await router.post("/subscriptions/q/nack", json={"receipts": [message["receipt"]], "delay_s": 0.3})
    assert nacked.json()["results"][0]["ok"]
    numbers = await stats(router)
    assert (numbers["backlog"], numbers["in_flight"], numbers["delayed"], numbers["failed_total"]) == (0, 0, 1, 1)
    assert await receive(router) == []
    (again,) = await receive(router, wait_s=5)
    assert again["attempt"] == 2


async def test_extend_keeps_a_message_hidden(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    await publish(router, event(id="x"))
    (message,) = await receive(router, visibility_timeout_s=0.3)
    extended = await router.post(
        "/subscriptions/q/extend", json={"receipts": [message["receipt"]], "visibility_timeout_s": 30}
    )
    assert extended.json()["results"][0]["ok"]
    assert await receive(router, wait_s=0.6) == []
    assert (await router.post("/subscriptions/q/ack", json={"receipts": [message["receipt"]]})).json()["results"][0][
        "ok"
    ]


async def test_max_receive_count_dead_letters_and_announces(router: httpx.AsyncClient) -> None:
    await make_queue(router, pattern={"source": ["tests"]}, max_receive_count=2)
    await make_queue(router, "watch", pattern={"type": ["cattube.router.dead-lettered"]})
    await publish(router, event(id="poison", partitionkey="video-1"))
    for _ in range(2):
        (message,) = await receive(router)
        await router.post("/subscriptions/q/nack", json={"receipts": [message["receipt"]]})
    assert await receive(router) == []  # the third receive dead-letters it instead
    numbers = await stats(router)
    assert (numbers["backlog"], numbers["dead_lettered"]) == (0, 1)
    (dead,) = (await router.get("/subscriptions/q/dead-letters")).json()["items"]
    assert dead["event"]["id"] == "poison" and dead["attempts"] == 2 and "max_receive_count" in dead["last_error"]
    (announcement,) = await receive(router, "watch")
    data = announcement["event"]["data"]
    assert announcement["event"]["partitionkey"] == "video-1"
    assert (data["subscription"], data["event_id"], data["attempts"]) == ("q", "poison", 2)

    redriven = await router.post("/subscriptions/q/dead-letters/redrive")
    assert redriven.json() == {"count": 1}
    (fresh,) = await receive(router)
    assert fresh["event"]["id"] == "poison" and fresh["attempt"] == 1


async def test_dead_letters_can_be_purged(router: httpx.AsyncClient) -> None:
    await make_queue(router, pattern={"source": ["tests"]}, max_receive_count=1)
    await publish(router, event(id="p"))
    (message,) = await receive(router, visibility_timeout_s=0)
    assert await receive(router) == []
    assert (await router.delete("/subscriptions/q/dead-letters")).json() == {"count": 1}
    assert (await stats(router))["dead_lettered"] == 0


async def test_stats_long_poll_answers_when_the_numbers_change(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    first = await stats(router)
    waiting = asyncio.create_task(
        router.get("/subscriptions/q/stats", params={"wait_s": 10, "version": first["version"]})
    )
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await publish(router, event())
    changed = (await asyncio.wait_for(waiting, 5)).json()
    assert changed["backlog"] == 1 and changed["version"] != first["version"]
    # An old version answers at once: before a long poll on the current one, which nothing changes, ends.
    current = changed["version"]
    answered = asyncio.create_task(
        router.get("/subscriptions/q/stats", params={"wait_s": 30, "version": first["version"]})
    )
    yardstick = asyncio.create_task(router.get("/subscriptions/q/stats", params={"wait_s": 3, "version": current}))
    done, _ = await asyncio.wait({answered, yardstick}, return_when=asyncio.FIRST_COMPLETED)
    assert answered in done
    assert (await yardstick).json()["version"] == current


async def test_stats_long_poll_sees_a_visibility_timeout_expire(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    await publish(router, event())
    await receive(router, visibility_timeout_s=0.2)
    hidden = await stats(router)
    assert (hidden["backlog"], hidden["in_flight"]) == (0, 1)
    back = (await router.get("/subscriptions/q/stats", params={"wait_s": 5, "version": hidden["version"]})).json()
    assert (back["backlog"], back["in_flight"]) == (1, 0)


async def test_one_receive_takes_up_to_a_thousand_messages(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    await publish(router, *[event(id=f"e{i}") for i in range(250)])
    messages = await receive(router, max_messages=1000)
    assert [m["event"]["id"] for m in messages] == [f"e{i}" for i in range(250)]


async def test_queue_operations_validate_their_bodies(router: httpx.AsyncClient) -> None:
    await make_queue(router)
    too_many = await router.post("/subscriptions/q/receive", json={"max_messages": 1001})
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "body.max_messages"
    too_long = await router.post("/subscriptions/q/receive", json={"wait_s": 21})
    assert too_long.status_code == 422
    assert (await router.post("/subscriptions/q/ack", json={"receipts": []})).status_code == 422
    assert (await router.post("/subscriptions/nope/receive", json={})).status_code == 404


async def test_receiving_from_a_push_subscription_is_refused(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/p", json={"pattern": None, "target": {"url": "http://127.0.0.1:9/hook"}})
    response = await router.post("/subscriptions/p/receive", json={})
    assert response.status_code == 404 and "push" in response.json()["detail"]


async def test_structured_publish_fans_out_to_every_matching_queue(router: httpx.AsyncClient) -> None:
    await make_queue(router, "a", pattern={"source": ["tests"]})
    await make_queue(router, "b", pattern={"source": [{"prefix": "te"}]})
    await make_queue(router, "c", pattern={"source": ["nope"]})
    await router.post("/events", json=event(id="f"), headers=STRUCTURED)
    assert [len(await receive(router, n)) for n in ("a", "b", "c")] == [1, 1, 0]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/subscriptions/q"),
        ("POST", "/subscriptions/q/receive"),
        ("POST", "/subscriptions/q/ack"),
        ("POST", "/subscriptions/q/nack"),
        ("POST", "/subscriptions/q/extend"),
        ("POST", "/subscriptions/q/replay"),
        ("POST", "/patterns/test"),
    ],
)
async def test_malformed_json_bodies_get_400(router: httpx.AsyncClient, method: str, path: str) -> None:
    await router.put("/subscriptions/q", json={"pattern": None, "target": {"queue": {}}})
    response = await router.request(method, path, content=b'{"max_messages": 1,', headers=JSON_TYPE)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"].startswith("body")


async def test_stats_versions_come_from_the_database_not_the_process(
    router_settings: Callable[..., RouterSettings],
) -> None:
    """Two routers over one database (one after the other here; replicas at once later) answer the same
    version for the same state, so a client's long poll never turns into a loop of instant answers, and
    one holding a version from before a restart is answered at once only if something changed."""
    settings = router_settings()
    async with running(create_app(settings, exit_on_failure=False)) as first:
        await make_queue(first)
        await publish(first, event())
        before = await stats(first)
    async with running(create_app(settings, exit_on_failure=False)) as second:
        assert (await stats(second))["version"] == before["version"]
        await publish(second, event())
        after = (await second.get("/subscriptions/q/stats", params={"wait_s": 10, "version": before["version"]})).json()
        assert after["backlog"] == 2 and after["version"] != before["version"]
