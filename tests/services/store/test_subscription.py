"""The store's subscription is its only input: if someone deletes it on the router, the store notices
(its long poll of the subscription's stats wakes to a 404), says so on /readyz, and declares it again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

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
