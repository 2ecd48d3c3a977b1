"""Publishing: the three CloudEvents modes, validation, size limits, idempotency, auth."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import cloudevents
from router.app import create_app
from router.settings import RouterSettings
from tests.conftest import running
from tests.router.events import BATCH, STRUCTURED, event


async def test_structured_publish_is_answered_with_its_sequence(router: httpx.AsyncClient) -> None:
    response = await router.post("/events", json=event(id="a"), headers=STRUCTURED)
    assert response.status_code == 202
    assert response.json() == {"results": [{"id": "a", "sequence": 1, "duplicate": False}]}


async def test_batch_publish_keeps_order_and_numbers_each_event(router: httpx.AsyncClient) -> None:
    batch = [event(id=f"b{i}") for i in range(5)]
    response = await router.post("/events", content=json.dumps(batch), headers=BATCH)
    assert response.status_code == 202
    results = response.json()["results"]
    assert [r["id"] for r in results] == [f"b{i}" for i in range(5)]
    assert [r["sequence"] for r in results] == [1, 2, 3, 4, 5]


async def test_binary_mode_takes_attributes_from_headers_and_data_from_the_body(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/all", json={"pattern": {"type": ["bin"]}, "target": {"queue": {}}})
    headers = {"ce-specversion": "1.0", "ce-id": "x1", "ce-source": "tests", "ce-type": "bin", "ce-partitionkey": "k"}
    response = await router.post(
        "/events", content=b'{"n": 1}', headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 202
    raw = await router.post(
        "/events", content=b"\x00\x01", headers={**headers, "ce-id": "x2", "Content-Type": "image/png"}
    )
    assert raw.status_code == 202
    messages = (await router.post("/subscriptions/all/receive", json={"max_messages": 10})).json()["messages"]
    first, second = (m["event"] for m in messages)
    assert first["data"] == {"n": 1} and first["partitionkey"] == "k" and first["datacontenttype"] == "application/json"
    assert base64.b64decode(second["data_base64"]) == b"\x00\x01"


async def test_a_repeat_of_source_and_id_is_a_duplicate_with_the_first_sequence(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/q", json={"pattern": None, "target": {"queue": {}}})
    first = (await router.post("/events", json=event(id="same"), headers=STRUCTURED)).json()["results"][0]
    again = (await router.post("/events", json=event(id="same"), headers=STRUCTURED)).json()["results"][0]
    other_source = (await router.post("/events", json=event(id="same", source="elsewhere"), headers=STRUCTURED)).json()
    assert again == {"id": "same", "sequence": first["sequence"], "duplicate": True}
    assert other_source["results"][0]["duplicate"] is False
    stats = (await router.get("/subscriptions/q/stats")).json()
    assert stats["backlog"] == 2  # the duplicate was not delivered again


async def test_duplicates_inside_one_batch_are_recognized(router: httpx.AsyncClient) -> None:
    response = await router.post("/events", content=json.dumps([event(id="d"), event(id="d")]), headers=BATCH)
    first, second = response.json()["results"]
    assert second == {"id": "d", "sequence": first["sequence"], "duplicate": True}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: e.pop("id"), "id"),
        (lambda e: e.update(id=""), "id"),
        (lambda e: e.update(source=5), "source"),
        (lambda e: e.pop("type"), "type"),
        (lambda e: e.update(specversion="0.3"), "specversion"),
        (lambda e: e.update(time="yesterday"), "time"),
        (lambda e: e.update(time="2026-13-40T00:00:00Z"), "time"),
        (lambda e: e.update(Bad_Name="x"), "Bad_Name"),
        (lambda e: e.update(toolongextensionname12="x"), "toolongextensionname12"),
        (lambda e: e.update(ext={"nested": True}), "ext"),
        (lambda e: e.update(data=1, data_base64="AA=="), "data_base64"),
    ],
)
async def test_invalid_events_are_refused_naming_the_field(
    router: httpx.AsyncClient, mutate: Callable[[dict[str, object]], object], field: str
) -> None:
    bad = event()
    mutate(bad)
    response = await router.post("/events", json=bad, headers=STRUCTURED)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"] == field


async def test_a_batch_with_bad_entries_is_refused_whole_naming_each(router: httpx.AsyncClient) -> None:
    batch = [event(id="ok"), {"specversion": "1.0"}, event(id="ok2"), event(time="nope")]
    response = await router.post("/events", content=json.dumps(batch), headers=BATCH)
    assert response.status_code == 400
    fields = [e["field"] for e in response.json()["errors"]]
    assert fields == ["[1].id", "[3].time"]
    # Atomic: not even the good entries were stored.
    again = await router.post("/events", json=event(id="ok"), headers=STRUCTURED)
    assert again.json()["results"][0]["duplicate"] is False


async def test_an_event_over_256_kib_gets_413(router: httpx.AsyncClient) -> None:
    big = event(data="x" * (256 * 1024))
    response = await router.post("/events", json=big, headers=STRUCTURED)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    just_fits = event(data="x" * (255 * 1024))
    assert (await router.post("/events", json=just_fits, headers=STRUCTURED)).status_code == 202


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", STRUCTURED, 400),
        (b'[{"specversion": "1.0",', BATCH, 400),
        (b"\xff\xfe", STRUCTURED, 400),
        (b"[]", BATCH, 400),
        (b'{"a": 1}', BATCH, 400),
        (b"{}", {"Content-Type": "application/json"}, 422),
    ],
)
async def test_malformed_bodies_get_a_problem(
    router: httpx.AsyncClient, body: bytes, headers: dict[str, str], status: int
) -> None:
    # RFC 9110: 400 for a body that cannot be read (bad JSON, not a CloudEvent); 422 is left for
    # a readable request we cannot act on (here: no way to tell which mode it is in).
    response = await router.post("/events", content=body, headers=headers)
    assert response.status_code == status
    problem = response.json()
    assert problem["status"] == status and problem["errors"][0]["field"] in {"body", "header.content-type"}


async def test_with_a_token_everything_but_health_and_docs_needs_it(
    router_settings: Callable[..., RouterSettings],
) -> None:
    app = create_app(router_settings(token="s3cret"), exit_on_failure=False)
    async with running(app) as client:
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        refused = await client.post("/events", json=event(), headers=STRUCTURED)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert (await client.get("/subscriptions", headers={"Authorization": "Bearer wrong"})).status_code == 401
        ok = await client.post("/events", json=event(), headers={**STRUCTURED, "Authorization": "Bearer s3cret"})
        assert ok.status_code == 202


async def test_unknown_routes_and_methods_answer_problem_json(router: httpx.AsyncClient) -> None:
    missing = await router.get("/nowhere")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    wrong = await router.delete("/events")
    assert wrong.status_code == 405 and wrong.headers["content-type"] == "application/problem+json"


async def test_metrics_count_published_events(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/m", json={"pattern": None, "target": {"queue": {}}})
    await router.post("/events", content=json.dumps([event(), event()]), headers=BATCH)
    text = (await router.get("/metrics")).text
    assert "cattube_router_events_published_total 2.0" in text
    assert 'cattube_router_backlog{subscription="m"} 2.0' in text


@pytest.mark.parametrize(
    ("extension", "value", "accepted"),
    [
        ("partitionkey", 111111111111111111111111111111, False),
        ("partitionkey", 5, False),
        ("partitionkey", "k", True),
        ("count", 2**31 - 1, True),
        ("count", -(2**31), True),
        ("count", 2**31, False),
        ("count", 111111111111111111111111111111, False),
        ("ratio", 1.5, False),
        ("flag", True, True),
        ("label", "tab\there", False),
        ("label", "\ud800", False),
        ("label", "\ufffe", False),
    ],
)
async def test_extension_attributes_follow_the_cloudevents_type_system(
    router: httpx.AsyncClient, extension: str, value: object, accepted: bool
) -> None:
    body = json.dumps(event(**{extension: value}))  # ASCII with \u escapes: a lone surrogate gets through
    response = await router.post("/events", content=body, headers=STRUCTURED)
    assert response.status_code == (202 if accepted else 400), response.text
    if not accepted:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] == extension


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("subject", "line\nbreak"), ("source", "\udfff"), ("dataschema", "no-scheme"), ("id", "\x00")],
)
async def test_core_attributes_follow_the_cloudevents_type_system(
    router: httpx.AsyncClient, attribute: str, value: str
) -> None:
    response = await router.post("/events", content=json.dumps(event(**{attribute: value})), headers=STRUCTURED)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == attribute


def nested_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (nested_json(65), "data"),
        (nested_json(500), "data"),
        (b"[" * 5000 + b"]" * 5000, "body"),  # deeper than the JSON parser goes
        (b'{"ok": "fine", "bad": ["\\ud800"]}', "data.bad[0]"),
        (b'{"\\udc00": 1}', "data"),
    ],
)
async def test_data_too_deep_or_with_a_lone_surrogate_is_refused_naming_it(
    router: httpx.AsyncClient, data: bytes, field: str
) -> None:
    body = b'{"specversion":"1.0","id":"deep","source":"tests","type":"t","data":' + data + b"}"
    response = await router.post("/events", content=body, headers=STRUCTURED)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"] == field
    fits = b'{"specversion":"1.0","id":"fits","source":"tests","type":"t","data":' + nested_json(64) + b"}"
    assert (await router.post("/events", content=fits, headers=STRUCTURED)).status_code == 202


async def test_binary_mode_without_a_content_type_reads_json_data_as_json(router: httpx.AsyncClient) -> None:
    # What the CloudEvents Python SDK sends for dict data: binary mode, no Content-Type.
    await router.put("/subscriptions/all", json={"pattern": None, "target": {"queue": {}}})
    headers = {"ce-specversion": "1.0", "ce-source": "sdk", "ce-type": "t"}
    sent = [(b'{"n": 1}', {"n": 1}), (b'"text"', "text"), (b"\x00\x01 not json", None)]
    for i, (body, _) in enumerate(sent):
        response = await router.post("/events", content=body, headers={**headers, "ce-id": f"n{i}"})
        assert response.status_code == 202, response.text
    messages = (await router.post("/subscriptions/all/receive", json={"max_messages": 10})).json()["messages"]
    got = [m["event"] for m in messages]
    assert got[0]["data"] == {"n": 1} and got[1]["data"] == "text"
    assert base64.b64decode(got[2]["data_base64"]) == b"\x00\x01 not json"
    assert all("datacontenttype" not in e for e in got)


def json_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


tricky_text = st.sampled_from(["a[", '\\"{', "\n]", "\\", "\x00[", '}"', '"', 'x\\\\"[', "[]", "{}", "plain"])
json_values = st.recursive(
    tricky_text | st.integers(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=30,
)


@settings(database=None, deadline=None, max_examples=500)
@given(value=json_values)
def test_nesting_measured_on_the_text_is_the_nesting_of_the_value(value: object) -> None:
    assert cloudevents._nesting(cloudevents.encode({"data": value})) == 1 + json_depth(value)


@pytest.mark.parametrize(
    ("data", "stored"),
    [
        # Beyond 64 bits: kept to the last digit (orjson alone reads such a number as a float).
        (b'{"big": 111111111111111111111111111111, "neg": -9223372036854775809}', None),
        # NaN and Infinity are read as the standard library reads them, and written back as it writes them.
        (b'{"x": NaN, "y": -Infinity}', b'"data":{"x":NaN,"y":-Infinity}'),
        (b'{"u": "caf\\u00e9 \\ud83d\\ude00"}', '"data":{"u":"café 😀"}'.encode()),
    ],
)
async def test_event_data_is_kept_exactly_as_the_json_text_says(
    router: httpx.AsyncClient, data: bytes, stored: bytes | None
) -> None:
    await router.put("/subscriptions/exact", json={"pattern": None, "target": {"queue": {}}})
    body = b'{"specversion":"1.0","id":"exact","source":"tests","type":"t","data":' + data + b"}"
    assert (await router.post("/events", content=body, headers=STRUCTURED)).status_code == 202
    response = await router.post("/subscriptions/exact/receive", json={"max_messages": 1})
    (message,) = json.loads(response.content)["messages"]
    assert repr(message["event"]["data"]) == repr(json.loads(data))
    if stored is not None:
        assert stored in response.content
