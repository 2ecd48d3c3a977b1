"""NATS JetStream, Redis Streams and RabbitMQ through their own Python clients, used the way their docs show.

- NATS: `js.publish` awaits the PubAck; a batch is `publish_async` × N, then every PubAck. The
  consumer is a durable pull consumer: `fetch(window)`, `msg.ack()` each (a one-way send, so the
  run ends with a flush, which the server answers after every earlier ack).
- RabbitMQ's basic.ack has no answer in AMQP 0-9-1: its last ack counts once sent.
- Redis: XADD (a batch is one pipeline of XADDs); XREADGROUP COUNT window, then one XACK for them.
- RabbitMQ: a durable queue (classic or quorum), persistent messages on a channel with publisher
  confirms; the consumer has prefetch = window and acks each message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import nats
import redis.asyncio as aioredis
from nats.js.api import StorageType

from bench.peers.tally import Tally

WAIT_S = 5  # how long one fetch / read waits for the next events before asking again


def _body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


class NatsClient:
    def __init__(self, url: str, name: str, window: int) -> None:
        self.url, self.stream, self.subject, self.window = url, name, f"bench.{name}", window

    async def connect(self) -> None:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()

    async def close(self) -> None:
        await self.nc.close()

    async def declare(self) -> None:
        await self.js.add_stream(name=self.stream, subjects=[self.subject], storage=StorageType.FILE)

    async def publish(self, events: list[dict[str, Any]]) -> None:
        if len(events) == 1:
            await self.js.publish(self.subject, _body(events[0]))
            return
        acks = [await self.js.publish_async(self.subject, _body(event)) for event in events]
        await asyncio.gather(*acks)

    async def consume(self, tally: Tally) -> None:
        pull = await self.js.pull_subscribe(self.subject, durable="consumer", stream=self.stream)
        while not tally.done.is_set():
            try:
                messages = await pull.fetch(batch=self.window, timeout=WAIT_S)
            except nats.errors.TimeoutError:
                continue
            numbers = []
            for message in messages:
                numbers.append(tally.delivered(message.data))
                await message.ack()
            if tally.completes(numbers):
                await self.nc.flush()  # answered once the server has read every ack before it
            tally.acked(numbers)

    async def remove(self) -> None:
        await self.js.delete_stream(self.stream)


class RedisClient:
    GROUP = "consumers"

    def __init__(self, url: str, name: str, window: int) -> None:
        self.url, self.key, self.window = url, name, window

    async def connect(self) -> None:
        self.redis = aioredis.Redis.from_url(self.url, socket_timeout=WAIT_S * 2)  # > the blocking read's wait

    async def close(self) -> None:
        await self.redis.aclose()

    async def declare(self) -> None:
        await self.redis.xgroup_create(self.key, self.GROUP, id="$", mkstream=True)

    async def publish(self, events: list[dict[str, Any]]) -> None:
        if len(events) == 1:
            await self.redis.xadd(self.key, {"e": _body(events[0])})
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(self.key, {"e": _body(event)})
            await pipe.execute()

    async def consume(self, tally: Tally) -> None:
        streams: dict[Any, Any] = {self.key: ">"}
        while not tally.done.is_set():
            answer: Any = await self.redis.xreadgroup(  # RESP2: [[key, [(id, fields), ...]]]
                self.GROUP, "consumer", streams, count=self.window, block=WAIT_S * 1000
            )
            for _, entries in answer:
                ids, numbers = [], []
                for entry_id, fields in entries:
                    numbers.append(tally.delivered(fields[b"e"]))
                    ids.append(entry_id)
                await self.redis.xack(self.key, self.GROUP, *ids)
                tally.acked(numbers)

    async def remove(self) -> None:
        await self.redis.delete(self.key)


class RabbitClient:
    def __init__(self, url: str, name: str, window: int, *, queue_type: str) -> None:
        self.url, self.name, self.window, self.queue_type = url, name, window, queue_type

    async def connect(self) -> None:
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)

    async def close(self) -> None:
        await self.connection.close()

    async def declare(self) -> None:
        await self.channel.set_qos(prefetch_count=self.window)
        self.queue = await self.channel.declare_queue(
            self.name, durable=True, arguments={"x-queue-type": self.queue_type}
        )

    async def publish(self, events: list[dict[str, Any]]) -> None:
        exchange = self.channel.default_exchange
        messages = [
            aio_pika.Message(_body(e), content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            for e in events
        ]
        await asyncio.gather(*(exchange.publish(m, routing_key=self.name) for m in messages))

    async def consume(self, tally: Tally) -> None:
        async with self.queue.iterator() as messages:
            async for message in messages:
                n = tally.delivered(message.body)
                await message.ack()
                tally.acked([n])

    async def remove(self) -> None:
        await self.queue.delete(if_unused=False, if_empty=False)
