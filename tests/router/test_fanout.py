"""The fan-out's catalog and its grants, engine-neutral (the stores' side is in the contract suite)."""

from __future__ import annotations

from pathlib import Path

from router.bus import Bus
from router.fanout import Fanout, Grant
from router.patterns import compile_pattern
from router.persistence import Delivery, Subscription, SubscriptionSpec
from router.stores.sqlite import SQLiteEventStore


def sub(name: str, source: str, push: bool = False) -> Subscription:
    pattern = {"source": [source]}
    target = {"url": "http://127.0.0.1:9/x"} if push else {"queue": {}}
    return Subscription(SubscriptionSpec(name, pattern, compile_pattern(pattern), target, Delivery()), "s", 0, 0)


def test_a_transaction_sees_its_own_version_and_never_rolls_the_cache_back() -> None:
    fanout = Fanout()
    new = fanout.at(2, lambda: [sub("a", "x"), sub("b", "x")])
    old = fanout.at(1, lambda: [sub("a", "x")])  # a concurrent transaction with an older snapshot
    assert sorted(new.subs) == ["a", "b"] and sorted(old.subs) == ["a"]
    assert fanout.version == 2 and fanout.at(2, lambda: []) is new  # no read when nothing moved


def test_reads_are_trusted_only_when_no_invalidation_came_in_between() -> None:
    fanout = Fanout()
    assert not fanout.fresh
    generation = fanout.generation
    fanout.invalidate()  # a PUT somewhere while the bus was reading
    fanout.load(1, [sub("a", "x")], generation)
    assert not fanout.fresh and fanout.get("a") is None
    fanout.load(2, [sub("a", "x")], fanout.generation)
    assert fanout.fresh and fanout.get("a") is not None
    fanout.at(3, lambda: [])  # an append's read keeps the cache current but does not vouch for it
    assert fanout.fresh and fanout.version == 3


def test_targets_match_and_take_offered_slots() -> None:
    fanout = Fanout()
    catalog = fanout.at(1, lambda: [sub("q", "x"), sub("hook", "x", push=True), sub("other", "y")])
    hook, stream = Grant("hook", lambda messages: None), Grant("q", lambda messages: None)
    fanout.offer(hook, 1, 500)
    fanout.offer(stream, 1, 700)  # a stream waiting on a queue
    event = {"source": "x", "id": "1", "type": "t", "specversion": "1.0"}
    first = {s.spec.name: grant for s, grant in fanout.targets(catalog, event)}
    second = {s.spec.name: grant for s, grant in fanout.targets(catalog, event)}
    assert first == {"q": stream, "hook": hook} and second == {"q": None, "hook": None}
    assert (hook.lease_ms, stream.lease_ms, hook.pending) == (500, 700, 1)
    fanout.rolled_back({hook: [object()]})  # type: ignore[list-item]
    assert fanout.withdraw(hook) == 1 and hook.pending == 0


def test_grants_of_one_subscription_take_turns() -> None:
    fanout = Fanout()
    catalog = fanout.at(1, lambda: [sub("q", "x")])
    a, b, c = (Grant("q", lambda messages: None) for _ in range(3))
    fanout.offer(a, 2, 100)
    fanout.offer(b, 1, 100)
    fanout.offer(c, 2, 100)
    event = {"source": "x", "id": "1", "type": "t", "specversion": "1.0"}
    taken = [grant for _ in range(6) for _, grant in fanout.targets(catalog, event)]
    assert taken == [a, b, c, a, c, None]


def test_a_waiting_receive_or_an_ordered_subscription_passes_grants_over() -> None:
    fanout = Fanout()
    ordered = Subscription(SubscriptionSpec("o", None, None, {"queue": {}}, Delivery(ordered=True)), "s", 0, 0)
    catalog = fanout.at(1, lambda: [sub("q", "x"), ordered])
    q, o = Grant("q", lambda messages: None), Grant("o", lambda messages: None)
    fanout.offer(q, 5, 100)
    fanout.offer(o, 5, 100)
    event = {"source": "x", "id": "1", "type": "t", "specversion": "1.0"}
    fanout.receiving("q", +1)
    assert {s.spec.name: grant for s, grant in fanout.targets(catalog, event)} == {"q": None, "o": None}
    fanout.receiving("q", -1)
    assert {s.spec.name: grant for s, grant in fanout.targets(catalog, event)} == {"q": q, "o": None}


async def test_a_subscription_the_cache_has_not_heard_of_yet_is_found_in_the_store(tmp_path: Path) -> None:
    """Another replica's PUT reaches this one's cache with its notification; until then a miss asks the store,
    so a client that moves between replicas never gets 404 for what it just made."""
    store = SQLiteEventStore(tmp_path / "bus.db")
    bus = Bus(store, retention_s=3600)
    await bus.start()
    try:
        assert await bus.find_subscription("late") is None
        version, before = bus.fanout.version, bus.fanout.all()
        assert version is not None
        await store.put_subscription(SubscriptionSpec("late", None, None, {"queue": {}}, Delivery()), 0)
        bus.fanout.load(version, before, bus.fanout.generation)  # as if its notification were still on the way
        assert bus.fanout.fresh and bus.fanout.get("late") is None
        found = await bus.find_subscription("late")
        assert found is not None and found.spec.name == "late"
        assert not bus.fanout.fresh, "the cache is read again on the next look"
    finally:
        bus.stop()
        await bus.close()
