"""The push target policy: allowed networks checked per connection, redirects never followed."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from router.app import create_app
from router.push_policy import PushPolicy, parse_networks
from router.settings import RouterSettings
from tests.conftest import running
from tests.process import free_port
from tests.router.events import STRUCTURED, event
from tests.router.receiver import Delivery, Receiver

FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.1, "timeout_s": 2}
REFUSED = "refused by policy: the target's address is not in CATTUBE_PUSH_ALLOWED_NETWORKS (a permanent failure)"


class FixedResolver(AbstractResolver):
    """Answers every name with `addresses`: the DNS of an attacker who rebinds a name at will."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Any]]:
    started: list[Receiver] = []

    async def start(**kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


@pytest.fixture
def router_with(router_settings: Callable[..., RouterSettings]) -> Callable[..., Any]:
    def make(networks: str = "127.0.0.0/8,::1/128", resolver: AbstractResolver | None = None) -> Any:
        settings = router_settings(push_allowed_networks=networks)
        policy = PushPolicy(settings.push_networks, resolver=resolver)
        return running(create_app(settings, exit_on_failure=False, push_policy=policy))

    return make


async def dead_letter_of(client: httpx.AsyncClient, url: str, **delivery: Any) -> dict[str, Any]:
    """Subscribe `url`, publish one event, and return the dead letter it ends up as."""
    dlq = {"pattern": {"type": ["cattube.router.dead-lettered"]}, "target": {"queue": {}}}
    assert (await client.put("/subscriptions/dlq", json=dlq)).status_code == 201
    hook = {"pattern": {"source": ["tests"]}, "target": {"url": url}, "delivery": {**FAST, **delivery}}
    response = await client.put("/subscriptions/hook", json=hook)
    assert response.status_code == 201, response.text
    await client.post("/events", json=event(id="e1"), headers=STRUCTURED)
    received = await client.post("/subscriptions/dlq/receive", json={"wait_s": 15})
    (message,) = received.json()["messages"]
    (letter,) = (await client.get("/subscriptions/hook/dead-letters")).json()["items"]
    assert message["event"]["data"]["event_id"] == "e1"
    return letter  # type: ignore[no-any-return]


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_is_a_failed_attempt_and_never_followed(
    router_with: Callable[..., Any], receivers: Callable[..., Any], status: int
) -> None:
    elsewhere = await receivers()

    async def redirect(delivery: Delivery, count: int) -> web.Response:
        return web.Response(status=status, headers={"Location": elsewhere.url})

    target = await receivers(answer=redirect)
    async with router_with() as client:
        letter = await dead_letter_of(client, target.url, max_attempts=2)
    assert letter["attempts"] == 2 and len(target.deliveries) == 2  # retried as a failure
    assert letter["last_error"].startswith(f"HTTP {status}: redirect to '{elsewhere.url}' not followed")
    assert elsewhere.deliveries == []


@pytest.mark.parametrize("port_is", ["listening", "closed"])
async def test_a_name_resolving_outside_the_allowed_networks_is_refused_by_policy(
    router_with: Callable[..., Any], receivers: Callable[..., Any], port_is: str
) -> None:
    receiver = await receivers()
    port = receiver.port if port_is == "listening" else free_port()
    async with router_with(networks="127.0.0.2/32") as client:
        letter = await dead_letter_of(client, f"http://localhost:{port}/hook", max_attempts=5)
    assert receiver.deliveries == []
    # An open port and a closed one read the same: no address, no port, no errno; one attempt.
    assert letter["last_error"] == REFUSED and letter["attempts"] == 1
    assert letter["context"]["status"] is None


async def test_dns_rebinding_to_a_disallowed_address_is_refused_at_connect_time(
    router_with: Callable[..., Any], receivers: Callable[..., Any]
) -> None:
    inside = await receivers()  # 127.0.0.1, allowed
    outside = await receivers(host="127.0.0.2", port=inside.port)  # same port, not allowed
    resolver = FixedResolver(["127.0.0.2"])
    async with router_with(networks="127.0.0.1/32", resolver=resolver) as client:
        letter = await dead_letter_of(client, f"http://rebound.test:{inside.port}/hook")
    assert letter["last_error"] == REFUSED
    assert outside.deliveries == [] and inside.deliveries == []


async def test_a_name_with_allowed_and_disallowed_addresses_connects_only_to_the_allowed(
    router_with: Callable[..., Any], receivers: Callable[..., Any]
) -> None:
    inside = await receivers()
    outside = await receivers(host="127.0.0.2", port=inside.port)
    resolver = FixedResolver(["127.0.0.2", "127.0.0.1"])
    async with router_with(networks="127.0.0.1/32", resolver=resolver) as client:
        hook = {"pattern": {"source": ["tests"]}, "target": {"url": f"http://mixed.test:{inside.port}/hook"}}
        assert (await client.put("/subscriptions/hook", json=hook)).status_code == 201
        await client.post("/events", json=event(id="e1"), headers=STRUCTURED)
        await inside.wait_for(1)
    assert outside.deliveries == []


@pytest.mark.parametrize("url", ["http://10.1.2.3/hook", "http://169.254.169.254/latest", "http://[fe80::1]/x"])
async def test_a_literal_address_outside_the_policy_is_refused_at_put(router: httpx.AsyncClient, url: str) -> None:
    response = await router.put("/subscriptions/hook", json={"pattern": None, "target": {"url": url}})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == ["target.url"]
    assert (await router.get("/subscriptions/hook")).status_code == 404


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        ("127.0.0.0/8,::1/128", "127.0.0.1", True),
        ("127.0.0.0/8,::1/128", "::1", True),
        ("127.0.0.0/8,::1/128", "::ffff:127.0.0.1", True),
        ("127.0.0.0/8,::1/128", "10.0.0.1", False),
        ("127.0.0.0/8,::1/128", "::ffff:10.0.0.1", False),
        ("0.0.0.0/0,::/0", "8.8.8.8", True),
        ("0.0.0.0/0,::/0", "169.254.169.254", False),  # metadata: not by a broad network
        ("0.0.0.0/0,::/0", "fe80::1", False),
        ("0.0.0.0/0,::/0", "fd00:ec2::254", False),
        ("0.0.0.0/0,169.254.169.254/32", "169.254.169.254", True),  # listed explicitly
        ("169.254.0.0/16", "169.254.1.1", True),
        ("", "127.0.0.1", False),
    ],
)
def test_allowed_addresses(networks: str, address: str, allowed: bool) -> None:
    assert PushPolicy(parse_networks(networks)).allows(ipaddress.ip_address(address)) is allowed


def test_a_bad_network_setting_is_refused_at_start(router_settings: Callable[..., RouterSettings]) -> None:
    with pytest.raises(ValueError, match="not a network"):
        router_settings(push_allowed_networks="127.0.0.0/8,loopback")
