"""The systems measured, each behind the same small interface, and which server each one needs.

A client is made per process: the consumer declares the stream / queue / subscription, consumes and
removes it; the producer only publishes. `publish(events)` returns once the system has confirmed
every event of the call (a JetStream PubAck, Redis's reply to XADD, a publisher confirm, a 202).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from bench.peers.tally import Tally


class Client(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self) -> None:
        """Create what the run's events go to (before either side starts, by the consumer)."""

    async def publish(self, events: list[dict[str, Any]]) -> None:
        """Publish the events (one call, a batch if several) and return once all are confirmed."""

    async def consume(self, tally: Tally) -> None:
        """Receive, record and ack events until cancelled, holding at most the window unacked.

        `tally.acked` is called once the acks are answered; where an ack is a one-way send that the
        server can confirm (NATS: a flush), the ack that completes the run is confirmed first.
        """

    async def remove(self) -> None:
        """Delete what `declare` made."""


@dataclass(frozen=True)
class System:
    name: str
    title: str  # the table's column
    server: str  # nats, redis, rabbitmq, cattube or floor
    client_modules: tuple[str, ...]  # what must be importable (installed from the `bench` extra when missing)


SYSTEMS = {
    s.name: s
    for s in [
        System("cattube-sdk", "CatTube SDK", "cattube", ()),
        System("cattube-aiohttp", "CatTube aiohttp", "cattube", ()),
        # The router's API in memory with nothing else (bench/peers/floor.py): the ceiling of the protocol.
        System("floor-sdk", "HTTP floor, SDK", "floor", ()),
        System("floor-aiohttp", "HTTP floor, aiohttp", "floor", ()),
        System("nats", "NATS JetStream", "nats", ("nats",)),
        System("redis", "Redis Streams", "redis", ("redis",)),
        System("rabbitmq-classic", "RabbitMQ classic", "rabbitmq", ("aio_pika",)),
        System("rabbitmq-quorum", "RabbitMQ quorum", "rabbitmq", ("aio_pika",)),
    ]
}


def client(system: str, url: str, name: str, window: int) -> Client:
    """The client of `system` for the run called `name` (its stream, queue or subscription)."""
    # Imported here, so that measuring CatTube alone needs none of the peers' client libraries.
    if system == "nats":
        from bench.peers.peer_clients import NatsClient

        return NatsClient(url, name, window)
    if system == "redis":
        from bench.peers.peer_clients import RedisClient

        return RedisClient(url, name, window)
    if system.startswith("rabbitmq-"):
        from bench.peers.peer_clients import RabbitClient

        return RabbitClient(url, name, window, queue_type=system.removeprefix("rabbitmq-"))
    if system in ("cattube-sdk", "floor-sdk"):
        from bench.peers.cattube_clients import SdkClient

        return SdkClient(url, name, window)
    if system in ("cattube-aiohttp", "floor-aiohttp"):
        from bench.peers.cattube_clients import AiohttpClient

        return AiohttpClient(url, name, window)
    raise ValueError(f"unknown system {system!r}")
