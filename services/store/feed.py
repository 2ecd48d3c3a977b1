"""The store's only input: a push subscription on the router, declared at start-up, its deliveries verified.

    feed = Feed(router, name="store", url="http://127.0.0.1:8703/inbox")
    feed.start()                      # declares in the background, retrying until the router answers
    event = await feed.receiver(request)   # in the route: the verified CloudEvent, or 401

Deliveries are ordered per `partitionkey` (one video's events one at a time, videos in parallel);
the subscription starts at the earliest event the router keeps, so a store that starts after
the rest of the stack (or with an empty catalog) catches up. Re-declaring keeps the position and
the signing secret, so a restart resumes where it left off. The subscription is then followed with
long polls of its stats: if someone deletes it on the router, `/readyz` says so and it is declared
again at once (a deleted subscription would otherwise stop the catalog without a word).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from router.client import PushReceiver, RouterClient, RouterError, full_jitter
from services.common import contract

log = logging.getLogger(__name__)

PATTERN: dict[str, Any] = {
    "type": [
        {"prefix": "cattube.video."},
        {"prefix": "cattube.transcode."},
        contract.PROCESSING_SCALED,
        contract.DEAD_LETTERED,
    ]
}
DELIVERY: dict[str, Any] = {
    "ordered": True,
    "max_in_flight": 32,
    "mode": "structured",
    "timeout_s": 10,
    # A store that was down catches up within seconds of coming back, not minutes.
    "backoff_initial_s": 0.5,
    "backoff_max_s": 30,
}


class Feed:
    def __init__(self, client: RouterClient, *, name: str, url: str, watch_wait_s: float = 20) -> None:
        self.client = client
        self.name = name
        self.url = url
        self.receiver = PushReceiver()
        self.subscribed = asyncio.Event()
        self.error: str | None = None
        self.lost = 0
        """How many times the subscription was found deleted on the router (and declared again)."""
        self.declared = asyncio.Event()
        """Set at every declaration, the first and each after a deletion: clear it, then wait for the next."""
        self._watch_wait_s = watch_wait_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="store-subscription")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        # Declared, then watched; whenever someone deletes it on the router, declared again (from the
        # earliest event kept: the catalog skips what it already applied and catches up on the rest).
        while await self._declare():
            await self._until_gone()
            self.subscribed.clear()
            self.lost += 1
            log.warning("the store's subscription %r was deleted on the router; declaring it again", self.name)

    async def _declare(self) -> bool:
        try:
            subscription = await self.client.ensure_subscription(
                self.name,
                pattern=PATTERN,
                target={"url": self.url},
                delivery=DELIVERY,
                start="earliest",
                wait_for_router=True,
            )
        except RouterError as exc:  # refused for good (a wrong token, say): say so on /readyz
            self.error = f"the router refused the store's subscription: {exc}"
            log.error("%s", self.error)
            return False
        self.receiver.secret = subscription["secret"]
        self.subscribed.set()
        self.declared.set()
        log.info("subscribed as %r, deliveries to %s", self.name, self.url)
        return True

    async def _until_gone(self) -> None:
        """Follow the subscription's numbers with long polls (the router wakes them when it is deleted);
        return once the router says it no longer exists."""
        version: int | None = None
        failures = 0
        while True:
            try:
                stats = await self.client.stats(self.name, wait_s=self._watch_wait_s, version=version)
            except RouterError as exc:
                if exc.status == 404:
                    return
                failures += 1  # the router is down or busy: it is asked again, with backoff
                await asyncio.sleep(full_jitter(failures, self.client.backoff_initial_s, self.client.backoff_max_s))
                continue
            failures = 0
            version = stats.version

    async def readiness(self) -> str | None:
        if self.error:
            return self.error
        if not self.subscribed.is_set():
            if self.lost:
                return f"the store's subscription {self.name!r} was deleted on the router; declaring it again"
            return "the store's subscription is not declared yet (is the router up?)"
        return None
