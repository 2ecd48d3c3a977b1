"""PATCH /videos/{id} in-process: a person edits a title and description, every consumer hears it
(`cattube.video.updated`), and bad input is refused naming the field with nothing changed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.services.store.conftest import FakeRouter
from tests.services.store.test_api import problem, ready_video

USER = {"Authorization": "Bearer user-t"}


async def test_an_edit_shows_everywhere_and_is_published(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        before = (await store.api.get("/videos/v1")).json()
        assert before["description"] is None and before["watch_url"] == "http://store/watch/v1"

        edit = {"title": "Mittens, asleep", "description": "She found the sun.\r\n\r\n\r\nThen the sofa."}
        response = await store.api.patch("/videos/v1", json=edit)
        assert response.status_code == 200, response.text
        video = response.json()
        assert (video["title"], video["description"]) == ("Mittens, asleep", "She found the sun.\n\nThen the sofa.")
        assert video["version"] > before["version"] and video["status"] == "ready"
        assert (await store.api.get("/videos/v1")).json() == video
        (listed,) = (await store.api.get("/videos")).json()["items"]
        assert listed["title"] == "Mittens, asleep"

        (update,) = await store.published("cattube.video.updated")
        assert (update["source"], update["id"], update["partitionkey"]) == ("cattube/store", "v1/updated/1", "v1")
        assert update["data"] == {
            "video_id": "v1", "title": "Mittens, asleep", "description": "She found the sun.\n\nThen the sofa.",
            "revision": 1,
        }  # fmt: skip

        # Only the description, as JSON Merge Patch (RFC 7396) says it: null removes it, the title stays.
        cleared = await store.api.patch(
            "/videos/v1",
            content=json.dumps({"description": None}),
            headers={"content-type": "application/merge-patch+json"},
        )
        assert cleared.status_code == 200, cleared.text
        assert (cleared.json()["title"], cleared.json()["description"]) == ("Mittens, asleep", None)
        assert [e["data"]["revision"] for e in await store.published("cattube.video.updated", 2)] == [1, 2]


BAD = [
    ({"title": ""}, "body.title"),
    ({"title": "x" * 201}, "body.title"),
    ({"title": None}, "body.title"),  # a video always has a title
    ({"title": 5}, "body.title"),
    ({"title": " \t\x07\u202e"}, "body.title"),  # nothing left once cleaned
    ({"description": "x" * 5001}, "body.description"),
    ({"description": ["not", "text"]}, "body.description"),
    ({"title": "ok", "tags": ["cat"]}, "body.tags"),  # unknown fields are refused, not ignored
    ({}, "body"),  # nothing to change
    ([], "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
async def test_bad_edits_are_refused_naming_the_field_and_change_nothing(
    make_store: Callable[..., Any], body: Any, field: str
) -> None:
    async with make_store() as store:
        await ready_video(store)
        before = (await store.api.get("/videos/v1")).json()
        refused = problem(await store.api.patch("/videos/v1", json=body), 422)
        assert refused["errors"][0]["field"] == field, refused
        assert (await store.api.get("/videos/v1")).json() == before
        assert store.router.of_type("cattube.video.updated") == []


async def test_an_edit_that_is_not_json_is_a_bad_request(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        refused = await store.api.patch("/videos/v1", content=b"{title", headers={"content-type": "application/json"})
        problem(refused, 400)


async def test_unknown_and_deleted_videos_are_404(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        problem(await store.api.patch("/videos/nobody", json={"title": "Mittens"}), 404)
        await ready_video(store)
        assert (await store.api.delete("/videos/v1")).status_code == 202
        assert "deleted" in problem(await store.api.patch("/videos/v1", json={"title": "Mittens"}), 404)["detail"]
        assert problem(await store.api.patch("/videos/a%20b", json={"title": "x"}), 422)["errors"][0]["field"] == (
            "path.video_id"
        )


async def test_editing_takes_the_user_token(make_store: Callable[..., Any]) -> None:
    router = FakeRouter()
    async with make_store(router, token="admin-t", service_token="service-t", user_token="user-t") as store:
        await ready_video(store)
        missing = await store.api.patch("/videos/v1", json={"title": "Mittens"})
        assert problem(missing, 401) and missing.headers["www-authenticate"] == "Bearer"
        problem(
            await store.api.patch("/videos/v1", json={"title": "Mittens"}, headers={"Authorization": "Bearer x"}), 401
        )
        assert (await store.api.get("/videos/v1")).json()["title"] == "Whiskers on the beach"
        accepted = await store.api.patch("/videos/v1", json={"title": "Mittens"}, headers=USER)
        assert accepted.status_code == 200 and accepted.json()["title"] == "Mittens"
        await store.published("cattube.video.updated")
