"""The store's subscription is its only input: if someone deletes it on the router, the store notices
(its long poll of the subscription's stats wakes to a 404), says so on /readyz, and declares it again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from router.client import RouterClient
from services.store.app import create_app
from services.store.settings import StoreSettings
from tests.conftest import running
from tests.replicas import DOWN, Replicas
from tests.services.store.conftest import FakeRouter, uploaded


async def test_a_deleted_subscription_is_noticed_reported_and_declared_again(
    make_store: Callable[..., Any],
) -> None:
    router = FakeRouter()
    async with make_store(router) as store:
        feed = store.app.state.feed
        assert (await store.api.get("/readyz")).status_code == 200
        router.declared.clear()
        router.declare_status = 503  # the router refuses the first attempts to declare it again
        router.delete("store")
        async with asyncio.timeout(10):  # before the fix, nothing ever declared it again
            await router.declared.wait()
        not_ready = await store.api.get("/readyz")
        assert not_ready.status_code == 503
        assert "subscription 'store' was deleted on the router" in not_ready.json()["detail"]

        router.declare_status = 200
        async with asyncio.timeout(30):
            await feed.subscribed.wait()
        assert "store" in router.subscriptions and router.subscriptions["store"]["start"] == "earliest"
        assert (await store.api.get("/readyz")).status_code == 200
        assert (await store.deliver(uploaded("v1", store.bucket))).status_code == 204


async def test_against_the_real_router_a_deletion_is_followed_by_a_new_declaration(
    router_app: FastAPI, tmp_path: Path
) -> None:
    transport = httpx.ASGITransport(app=router_app)
    settings = StoreSettings(data_dir=tmp_path / "store", router_url="http://router", store_public_url="http://store")
    app = create_app(settings, exit_on_failure=False, router_transport=transport)
    async with (
        running(app, base_url="http://store") as store,
        RouterClient("http://router", transport=transport) as router,
    ):
        feed = app.state.feed
        async with asyncio.timeout(10):
            await feed.subscribed.wait()
        first_secret = feed.receiver.secret
        feed.declared.clear()
        await router.delete_subscription("store")
        async with asyncio.timeout(10):  # the router wakes the store's long poll with a 404 at once
            await feed.declared.wait()
        assert feed.lost == 1 and (await router.get_subscription("store"))["target"] == {"url": "http://store/inbox"}
        assert feed.receiver.secret != first_secret  # a new subscription, a new signing secret, taken up
        assert (await store.get("/readyz")).status_code == 200


async def test_with_two_routers_listed_the_store_declares_and_watches_through_the_one_that_answers(
    router_app: FastAPI, tmp_path: Path
) -> None:
    replicas = Replicas({"http://down": DOWN, "http://router": httpx.ASGITransport(app=router_app)})
    settings = StoreSettings(
        data_dir=tmp_path / "store", router_url="http://down,http://router", store_public_url="http://store"
    )
    app = create_app(settings, exit_on_failure=False, router_transport=replicas)
    async with running(app, base_url="http://store") as store:
        async with asyncio.timeout(10):
            await app.state.feed.subscribed.wait()
        assert (await store.get("/readyz")).status_code == 200
    assert "http://down" in replicas.seen
    async with RouterClient("http://router", transport=httpx.ASGITransport(app=router_app)) as router:
        assert (await router.get_subscription("store"))["target"] == {"url": "http://store/inbox"}
