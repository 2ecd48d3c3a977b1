"""What a pattern may cost (issue 10 item 4): bounded patterns, matching linear in the event, same verdicts.

No timings: the cost of a match is counted in Python function calls (a profile hook that stops the
match once it is over budget), which the exhaustive search this engine replaced exceeds by orders
of magnitude on the event below.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.patterns import LIMITS, PatternError, PatternTooLarge, compile_pattern
from tests.router import reference_patterns


class OverBudget(Exception):
    pass


@contextmanager
def call_budget(calls: int) -> Iterator[None]:
    spent = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal spent
        if event == "call":
            spent += 1
            if spent > calls:
                raise OverBudget(f"more than {calls} calls")

    sys.setprofile(count)
    try:
        yield
    finally:
        sys.setprofile(None)


def arrays_event(arrays: int, elements: int) -> dict[str, Any]:
    """`arrays` arrays whose elements all match their field, then one array no element of which matches two fields."""
    data: dict[str, Any] = {f"k{i}": [{"v": 1} for _ in range(elements)] for i in range(arrays)}
    data["last"] = [{"x": 1} if i % 2 else {"y": 1} for i in range(elements)]
    return {"type": "t", "data": data}


def arrays_pattern(arrays: int) -> dict[str, Any]:
    return {"data": {**{f"k{i}": {"v": [1]} for i in range(arrays)}, "last": {"x": [1], "y": [1]}}}


@pytest.mark.parametrize("arrays", [2, 5, 8])
def test_fields_through_many_arrays_cost_calls_linear_in_the_event(arrays: int) -> None:
    event, pattern = arrays_event(arrays, 12), compile_pattern(arrays_pattern(arrays))
    nodes = (arrays + 1) * 12 * 2
    with call_budget(20 * nodes):
        assert pattern.matches(event) is False
        event["data"]["last"].append({"x": 1, "y": 1})
        assert pattern.matches(event) is True


def test_a_deeply_nested_array_in_the_event_is_walked_without_recursion() -> None:
    nested: Any = "x"
    for _ in range(5000):
        nested = [nested]
    assert compile_pattern({"f": ["x"]}).matches({"f": nested})
    assert not compile_pattern({"f": ["y"]}).matches({"f": nested})


# -- limits ------------------------------------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    pattern: dict[str, Any] = {"x": ["y"]}
    for _ in range(depth - 1):
        pattern = {"n": pattern}
    return pattern


def test_patterns_within_every_limit_compile() -> None:
    compile_pattern(nested(LIMITS.max_depth - 1))
    compile_pattern({".".join(["a"] * LIMITS.max_path_segments): ["x"]})
    compile_pattern({"k" * LIMITS.max_key_chars: ["x"]})
    compile_pattern({f"f{i}": [1] for i in range(LIMITS.max_fields)})
    compile_pattern({"f": list(range(LIMITS.max_values))})


@pytest.mark.parametrize(
    ("pattern", "path", "reason"),
    [
        (nested(900), ".".join(["n"] * LIMITS.max_depth), "Nested more than 16"),
        (
            {"a": {"b": [{"numeric": [">", [[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}]}},
            "a.b[0].numeric[1][0]",
            "Nested more than",
        ),
        ({".".join(["a"] * 1600): ["x"]}, "", "longer than 256 characters"),
        ({".".join(["a"] * 33): ["x"]}, ".".join(["a"] * 33), "longer than 32 segments"),
        ({"a.b": {".".join(["c"] * 31): ["x"]}}, "a.b." + ".".join(["c"] * 31), "longer than 32 segments"),
        ({f"f{i}": [1] for i in range(101)}, "f100", "More than 100 fields"),
        ({"f": list(range(101))}, "f", "More than 100 values"),
    ],
)
def test_patterns_over_a_limit_are_refused_naming_where(pattern: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(PatternError) as refused:
        compile_pattern(pattern)
    assert refused.value.path.startswith(path) and reason in refused.value.reason
    assert len(refused.value.path) < 200


def test_a_pattern_over_2048_characters_is_too_large() -> None:
    pattern = {f"f{i}": ["x" * 40] for i in range(50)}
    with pytest.raises(PatternTooLarge) as refused:
        compile_pattern(pattern)
    assert "2048" in refused.value.reason
    compile_pattern(pattern, limits=None)  # a pattern stored before the limits still loads


def test_operators_keys_do_not_count_as_path_segments() -> None:
    deep_path = {".".join(["a"] * LIMITS.max_path_segments): [{"anything-but": {"prefix": "x"}}]}
    assert compile_pattern(deep_path).matches({"a": {"a": 1}}) is False


# -- the same verdicts as the exhaustive search ------------------------------------------------

leaf = st.sampled_from([0, 1, 2, "a", None])
element = st.dictionaries(st.sampled_from(["x", "y", "z"]), leaf | st.lists(leaf, max_size=2), max_size=3)
value = leaf | st.lists(element | leaf, max_size=3) | element | st.lists(st.lists(element, max_size=2), max_size=2)
events = st.dictionaries(st.sampled_from(["a", "b"]), value, min_size=1, max_size=2)
conditions = st.one_of(
    st.lists(leaf, min_size=1, max_size=2),
    st.sampled_from([[{"exists": True}], [{"exists": False}], [{"anything-but": 1}], [{"numeric": [">", 0]}]]),
    st.sampled_from([[{"exists": False}, 1], [{"anything-but": "a"}, {"exists": False}]]),
)
paths = st.sampled_from(["a", "b", "a.x", "a.y", "a.z", "b.x", "b.y", "a.x.x", "a.y.z"])
patterns = st.dictionaries(paths, conditions, min_size=1, max_size=4)


@settings(database=None, deadline=None, max_examples=1500)
@given(pattern=patterns, event=events)
def test_verdicts_agree_with_the_exhaustive_search(pattern: dict[str, Any], event: dict[str, Any]) -> None:
    expected = reference_patterns.compile_pattern(pattern).matches(event)
    assert compile_pattern(pattern).matches(event) is expected


def test_a_stored_pattern_that_no_longer_compiles_loads_matching_nothing() -> None:
    from router.persistence import spec_from_json

    # Stored by a laxer router: refusing it now must not stop the router from starting.
    spec = spec_from_json("old", '{"pattern": {"x": []}, "target": {"queue": {}}, "delivery": {}}')
    assert spec.compiled is not None and not spec.matches({"x": "y"})
