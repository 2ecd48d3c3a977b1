"""The fan-out's catalog and its grants, engine-neutral (the stores' side is in the contract suite)."""

from __future__ import annotations

from router.fanout import Fanout
from router.patterns import compile_pattern
from router.persistence import Delivery, Subscription, SubscriptionSpec


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


def test_targets_match_and_take_offered_slots_for_push_only() -> None:
    fanout = Fanout()
    catalog = fanout.at(1, lambda: [sub("q", "x"), sub("hook", "x", push=True), sub("other", "y")])
    fanout.offer("hook", 1, 500)
    fanout.offer("q", 1, 500)  # queues are never handed off
    event = {"source": "x", "id": "1", "type": "t", "specversion": "1.0"}
    first = {s.spec.name: lease for s, lease in fanout.targets(catalog, event)}
    second = {s.spec.name: lease for s, lease in fanout.targets(catalog, event)}
    assert first == {"q": None, "hook": 500} and second == {"q": None, "hook": None}
    fanout.rolled_back({"hook": [object()]})  # type: ignore[list-item]
    assert fanout.withdraw("hook") == 1
