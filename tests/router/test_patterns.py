"""Unit and property tests for the event-pattern engine (router.patterns, router.pattern_ops)."""

import ipaddress
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.patterns import Pattern, PatternError, compile_pattern

properties = settings(database=None, deadline=None, max_examples=200)


def match(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    return compile_pattern(pattern).matches(event)


def refusal(pattern: Any) -> PatternError:
    with pytest.raises(PatternError) as refused:
        compile_pattern(pattern)
    return refused.value


# -- exact values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "value", "expected"),
    [
        (["video"], "video", True),
        (["video"], "Video", False),
        ([""], "", True),
        ([""], " ", False),
        ([5], 5, True),
        ([5], 5.0, True),
        ([5.5], 5.5, True),
        ([5], "5", False),
        (["5"], 5, False),
        ([1], True, False),
        ([True], 1, False),
        ([True], True, True),
        ([False], False, True),
        ([False], 0, False),
        (["true"], True, False),
        ([None], None, True),
        ([None], "null", False),
        (["a", "b", 3], 3, True),
        (["a", "b", 3], "c", False),
    ],
)
def test_exact_values_match_by_json_type_and_value(values: list[Any], value: Any, expected: bool) -> None:
    assert match({"field": values}, {"field": value}) is expected


def test_null_matches_a_present_null_but_not_a_missing_field() -> None:
    assert match({"a": [None]}, {"a": None})
    assert not match({"a": [None]}, {})
    assert not match({"a": [None]}, {"a": []})


def test_nested_keys_descend_and_are_case_sensitive() -> None:
    pattern = {"data": {"video": {"codec": ["h264"]}}}
    assert match(pattern, {"data": {"video": {"codec": "h264"}}})
    assert not match(pattern, {"data": {"Video": {"codec": "h264"}}})
    assert not match(pattern, {"data": {"video": "h264"}})
    assert not match(pattern, {"data": '{"video": {"codec": "h264"}}'})


def test_every_field_must_match() -> None:
    pattern = {"type": ["upload"], "data": {"size": [10]}}
    assert match(pattern, {"type": "upload", "data": {"size": 10}, "extra": 1})
    assert not match(pattern, {"type": "upload", "data": {"size": 11}})
    assert not match(pattern, {"type": "upload"})


def test_dotted_keys_join_paths_in_pattern_and_event() -> None:
    assert match({"a.b": [1]}, {"a": {"b": 1}})
    assert match({"a": {"b": [1]}}, {"a.b": 1})
    assert match({"a": {"b.c": [1]}}, {"a.b": {"c": 1}})
    assert not match({"a.b": [1]}, {"a": {"b": {"c": 1}}})


def test_a_repeated_path_keeps_the_later_rule() -> None:
    assert match({"a.b": ["x"], "a": {"b": ["y"]}}, {"a": {"b": "y"}})
    assert not match({"a.b": ["x"], "a": {"b": ["y"]}}, {"a": {"b": "x"}})


# -- string operators --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "value", "expected"),
    [
        ({"prefix": "cattube."}, "cattube.video.uploaded", True),
        ({"prefix": "cattube."}, "CATTUBE.video", False),
        ({"prefix": ""}, "anything", True),
        ({"prefix": ""}, 5, False),
        ({"prefix": "1"}, 12, False),
        ({"prefix": {"equals-ignore-case": "CatTube."}}, "CATTUBE.video", True),
        ({"prefix": {"equals-ignore-case": "CatTube."}}, "video.cattube.", False),
        ({"suffix": ".mp4"}, "cat.mp4", True),
        ({"suffix": ".mp4"}, "cat.MP4", False),
        ({"suffix": ""}, "", True),
        ({"suffix": {"equals-ignore-case": ".MP4"}}, "cat.mp4", True),
        ({"suffix": {"equals-ignore-case": ".MP4"}}, "cat.mkv", False),
        ({"equals-ignore-case": "Ready"}, "rEaDy", True),
        ({"equals-ignore-case": "Ready"}, "ready!", False),
        ({"equals-ignore-case": ""}, "", True),
        ({"equals-ignore-case": "true"}, True, False),
    ],
)
def test_string_operators(operator: dict[str, Any], value: Any, expected: bool) -> None:
    assert match({"f": [operator]}, {"f": value}) is expected


@pytest.mark.parametrize(
    ("wildcard", "value", "expected"),
    [
        ("*", "", True),
        ("*", "anything", True),
        ("", "", True),
        ("", "x", False),
        ("videos/*.mp4", "videos/cat.mp4", True),
        ("videos/*.mp4", "videos/a/b/cat.mp4", True),
        ("videos/*.mp4", "videos/cat.mkv", False),
        ("a*a", "a", False),
        ("a*a", "aa", True),
        ("*ab*ab*", "abab", True),
        ("*ab*ab*", "aba", False),
        ("a*b*c", "abc", True),
        ("a*b*c", "acb", False),
        (r"price\*", "price*", True),
        (r"price\*", "prices", False),
        (r"back\\slash*", "back\\slash!", True),
        ("no-star", "no-star", True),
    ],
)
def test_wildcard(wildcard: str, value: str, expected: bool) -> None:
    assert match({"f": [{"wildcard": wildcard}]}, {"f": value}) is expected


def test_wildcard_does_not_match_other_types() -> None:
    assert not match({"f": [{"wildcard": "*"}]}, {"f": 5})
    assert not match({"f": [{"wildcard": "*"}]}, {"f": None})


def test_wildcard_matching_stays_linear_on_adversarial_input() -> None:
    # A backtracking regex takes O(n^5) here; the split-and-find matcher is linear.
    pattern = compile_pattern({"f": [{"wildcard": "*a*a*a*a*b"}]})
    assert not pattern.matches({"f": "a" * 100_000})


# -- anything-but ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operand", "value", "expected"),
    [
        ("initializing", "running", True),
        ("initializing", "initializing", False),
        ("initializing", None, True),
        ("5", 5, True),
        (5, 5.0, False),
        (5, 6, True),
        (5, "5", True),
        (0, False, True),
        (["stopped", "overloaded"], "stopped", False),
        (["stopped", "overloaded"], "pending", True),
        ([100, 200], 200.0, False),
        ([100, 200], 300, True),
        ({"prefix": "init"}, "init-1", False),
        ({"prefix": "init"}, "post-init", True),
        ({"prefix": "init"}, 12, True),
        ({"prefix": ["a", "b"]}, "bee", False),
        ({"suffix": ".txt"}, "a.txt", False),
        ({"suffix": [".txt", ".jpg"]}, "a.png", True),
        ({"equals-ignore-case": "Stopped"}, "STOPPED", False),
        ({"equals-ignore-case": ["a", "B"]}, "b", False),
        ({"equals-ignore-case": ["a", "B"]}, "c", True),
        ({"equals-ignore-case": "x"}, None, True),
        ({"wildcard": "*/lib/*"}, "/usr/lib/x", False),
        ({"wildcard": ["*/lib/*", "*.so"]}, "/usr/bin/x", True),
        ({"wildcard": ""}, "x", True),
        ({"wildcard": ""}, "", False),
        ({"wildcard": "*"}, 3, True),
    ],
)
def test_anything_but(operand: Any, value: Any, expected: bool) -> None:
    assert match({"f": [{"anything-but": operand}]}, {"f": value}) is expected


@pytest.mark.parametrize(
    "operand", ["x", 5, ["x", "y"], {"prefix": "x"}, {"suffix": "x"}, {"equals-ignore-case": "x"}, {"wildcard": "x*"}]
)
def test_anything_but_never_matches_a_missing_field(operand: Any) -> None:
    assert not match({"f": [{"anything-but": operand}]}, {})
    assert not match({"f": [{"anything-but": operand}]}, {"f": []})


def test_anything_but_on_an_array_matches_when_some_element_differs() -> None:
    assert match({"f": [{"anything-but": "a"}]}, {"f": ["a", "b"]})
    assert not match({"f": [{"anything-but": "a"}]}, {"f": ["a", "a"]})


# -- numeric -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value", "expected"),
    [
        (["=", 301.8], 301.8, True),
        (["=", 5], 5.0, True),
        (["=", 5], 5.1, False),
        (["<", 10], 9.999, True),
        (["<", 10], 10, False),
        (["<=", 10], 10, True),
        ([">", 0], 0, False),
        ([">", 0], 1e-9, True),
        ([">=", 0], 0, True),
        ([">", 0, "<=", 5], 5, True),
        ([">", 0, "<=", 5], 0, False),
        ([">=", 0, "<", 5], 0, True),
        ([">=", 0, "<", 5], 5, False),
        ([">", -1e12, "<", 1e12], 10**11, True),
        ([">", 100], "300", False),
        ([">", 100], None, False),
        ([">", 0], True, False),
    ],
)
def test_numeric(expression: list[Any], value: Any, expected: bool) -> None:
    assert match({"n": [{"numeric": expression}]}, {"n": value}) is expected


# -- exists ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "exists", "absent"),
    [
        ({"f": "x"}, True, False),
        ({"f": ""}, True, False),
        ({"f": None}, True, False),
        ({"f": 0}, True, False),
        ({"f": [1]}, True, False),
        ({}, False, True),
        ({"f": []}, False, True),
        ({"f": {"nested": 1}}, False, True),
        ({"g": "x"}, False, True),
    ],
)
def test_exists_is_about_leaf_values(event: dict[str, Any], exists: bool, absent: bool) -> None:
    assert match({"f": [{"exists": True}]}, event) is exists
    assert match({"f": [{"exists": False}]}, event) is absent


def test_exists_false_under_a_missing_parent() -> None:
    assert match({"a": {"b": {"c": [{"exists": False}]}}}, {"a": "scalar"})


def test_a_list_of_matchers_is_an_or() -> None:
    pattern = {"s": [{"anything-but": ["roses"]}, {"exists": False}]}
    assert match(pattern, {"s": "tulips"})
    assert match(pattern, {})
    assert not match(pattern, {"s": "roses"})


# -- cidr --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "value", "expected"),
    [
        ("10.0.0.0/24", "10.0.0.255", True),
        ("10.0.0.0/24", "10.0.1.0", False),
        ("10.0.0.0/24", "10.0.0.256", False),
        ("10.0.0.0/24", "not an ip", False),
        ("10.0.0.0/24", 167772161, False),
        ("10.0.0.7/24", "10.0.0.1", True),
        ("0.0.0.0/0", "192.168.1.1", True),
        ("2001:db8::/32", "2001:0db8:ffff::1", True),
        ("2001:db8::/32", "2001:db9::1", False),
        ("2001:db8::/32", "10.0.0.1", False),
        ("10.0.0.0/8", "::ffff:10.0.0.1", False),
    ],
)
def test_cidr(cidr: str, value: Any, expected: bool) -> None:
    assert match({"ip": [{"cidr": cidr}]}, {"ip": value}) is expected


# -- $or ---------------------------------------------------------------------------------------


def test_or_at_the_top_and_nested() -> None:
    top = {"$or": [{"type": ["a"]}, {"data": {"n": [{"numeric": [">", 5]}]}}]}
    assert match(top, {"type": "a"})
    assert match(top, {"type": "b", "data": {"n": 6}})
    assert not match(top, {"type": "b", "data": {"n": 5}})
    nested = {"type": ["a"], "data": {"$or": [{"x": [1]}, {"y": [2]}, {"$or": [{"z": [3]}, {"w": [4]}]}]}}
    assert match(nested, {"type": "a", "data": {"w": 4}})
    assert not match(nested, {"type": "b", "data": {"w": 4}})
    assert not match(nested, {"type": "a", "data": {"v": 4}})


def test_or_branches_keep_array_consistency_with_their_siblings() -> None:
    pattern = {"items": {"kind": ["a"], "$or": [{"size": [1]}, {"size": [2]}]}}
    assert match(pattern, {"items": [{"kind": "a", "size": 2}]})
    assert not match(pattern, {"items": [{"kind": "a", "size": 3}, {"kind": "b", "size": 1}]})


def test_or_expansion_is_bounded() -> None:
    pattern = {f"k{i}": {"$or": [{"a": [1]}, {"b": [1]}]} for i in range(11)}
    assert "too complex" in refusal(pattern).reason


# -- arrays ------------------------------------------------------------------------------------


def test_a_field_matches_if_any_array_element_does() -> None:
    assert match({"tags": ["cat"]}, {"tags": ["dog", "cat"]})
    assert match({"tags": ["cat"]}, {"tags": [["dog"], ["cat"]]})
    assert not match({"tags": ["cat"]}, {"tags": []})
    assert match({"items": {"id": [{"exists": True}]}}, {"items": [{"x": 1}, {"id": 2}]})


def test_array_consistency_needs_one_element_for_sibling_fields() -> None:
    pattern = {"items": {"kind": ["a"], "size": [1]}}
    assert match(pattern, {"items": [{"kind": "b", "size": 2}, {"kind": "a", "size": 1}]})
    assert not match(pattern, {"items": [{"kind": "a", "size": 2}, {"kind": "b", "size": 1}]})


def test_array_consistency_through_nested_arrays() -> None:
    pattern = {"a": {"b": {"x": [1], "y": [2]}}}
    assert match(pattern, {"a": [{"b": [{"x": 0, "y": 2}, {"x": 1, "y": 2}]}]})
    assert not match(pattern, {"a": [{"b": [{"x": 1, "y": 0}]}, {"b": [{"x": 0, "y": 2}]}]})
    assert not match(pattern, {"a": [{"b": [{"x": 1, "y": 0}, {"x": 0, "y": 2}]}]})


def test_fields_in_different_arrays_are_independent() -> None:
    pattern = {"a": {"x": [1]}, "b": {"y": [2]}}
    assert match(pattern, {"a": [{"x": 0}, {"x": 1}], "b": [{"y": 2}, {"y": 3}]})


def test_exists_false_is_checked_within_the_chosen_element() -> None:
    pattern = {"items": {"kind": ["a"], "error": [{"exists": False}]}}
    assert match(pattern, {"items": [{"kind": "a", "error": "x"}, {"kind": "a"}]})
    assert not match(pattern, {"items": [{"kind": "a", "error": "x"}, {"kind": "b"}]})
    # With nothing else choosing an element, any element holding the field makes it present.
    assert not match({"items": {"error": [{"exists": False}]}}, {"items": [{"error": 1}, {"kind": "a"}]})
    assert match({"items": {"error": [{"exists": False}]}}, {"items": [{"kind": "a"}]})


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "reason"),
    [
        ([], "", "must be a JSON object"),
        ({}, "", "Empty objects"),
        ({"detail": {}}, "detail", "Empty objects"),
        ({"int": 42}, "int", "must be an object or an array"),
        ({"s": "x"}, "s", "must be an object or an array"),
        ({"s": None}, "s", "must be an object or an array"),
        ({"s": []}, "s", "Empty arrays"),
        ({"a": {"b": [[1]]}}, "a.b[0]", "Match value must be"),
        ({"a": [float("nan")]}, "a[0]", "Match value must be"),
        ({"a": [{}]}, "a[0]", "Match expression name not found"),
        ({"a": [{"prefix": "x", "suffix": "y"}]}, "a[0]", "Only one key"),
        ({"a": [{"EXISTS": True}]}, "a[0]", "Unrecognized match type EXISTS"),
        ({"a": [{"contains": "x"}]}, "a[0]", "Unrecognized match type contains"),
        ({"a": [{"exists": "yes"}]}, "a[0].exists", "either true or false"),
        ({"a": [{"prefix": 1}]}, "a[0].prefix", "must be a string"),
        ({"a": [{"prefix": {"equals-ignore-case": 1}}]}, "a[0].prefix", "equals-ignore-case"),
        ({"a": [{"suffix": {"other": "x"}}]}, "a[0].suffix", "equals-ignore-case"),
        ({"a": [{"equals-ignore-case": ["x"]}]}, "a[0].equals-ignore-case", "must be a string"),
        ({"a": [{"wildcard": ["x"]}]}, "a[0].wildcard", "must be a string"),
        ({"a": [{"wildcard": "a**"}]}, "a[0].wildcard", "Consecutive wildcard characters at pos 1"),
        ({"a": [{"wildcard": r"a\b"}]}, "a[0].wildcard", "Invalid escape character at pos 1"),
        ({"a": [{"wildcard": "trailing\\"}]}, "a[0].wildcard", "Invalid escape character"),
        ({"a": [{"wildcard": "*a*b*c*d*e*"}]}, "a[0].wildcard", "too complex"),
        ({"a": [{"numeric": 5}]}, "a[0].numeric", "must be an array"),
        ({"a": [{"numeric": []}]}, "a[0].numeric", "Invalid member in numeric match"),
        ({"a": [{"numeric": [5, ">"]}]}, "a[0].numeric", "Invalid member in numeric match"),
        ({"a": [{"numeric": ["!=", 5]}]}, "a[0].numeric", "Unrecognized numeric range operator"),
        ({"a": [{"numeric": ["=", "5"]}]}, "a[0].numeric", "Value of equals must be numeric"),
        ({"a": [{"numeric": [">", True]}]}, "a[0].numeric", "Value of > must be numeric"),
        ({"a": [{"numeric": [">", float("inf")]}]}, "a[0].numeric", "must be numeric"),
        ({"a": [{"numeric": ["=", 5, "<", 6]}]}, "a[0].numeric", "Too many elements"),
        ({"a": [{"numeric": ["<", 5, ">", 0]}]}, "a[0].numeric", "Too many elements"),
        ({"a": [{"numeric": [">", 0, ">", 0]}]}, "a[0].numeric", "Bad numeric range operator"),
        ({"a": [{"numeric": [">", 0, 5, 6]}]}, "a[0].numeric", "Bad value in numeric range"),
        ({"a": [{"numeric": [">", 0, "<"]}]}, "a[0].numeric", "Value of < must be numeric"),
        ({"a": [{"numeric": [">", 0, "<", 5, "x"]}]}, "a[0].numeric", "Too many terms"),
        ({"a": [{"numeric": [">", 5, "<", 5]}]}, "a[0].numeric", "Bottom must be less than top"),
        ({"a": [{"cidr": ["10.0.0.0/8"]}]}, "a[0].cidr", "must be a string"),
        ({"a": [{"cidr": "10.0.0.1"}]}, "a[0].cidr", "one '/' required"),
        ({"a": [{"cidr": "10.0.0.0/x"}]}, "a[0].cidr", "mask bits must be an integer"),
        ({"a": [{"cidr": "10.0.0.0/33"}]}, "a[0].cidr", "Nonstandard IP address"),
        ({"a": [{"anything-but": None}]}, "a[0].anything-but", "must be a string, a number"),
        ({"a": [{"anything-but": True}]}, "a[0].anything-but", "must be a string, a number"),
        ({"a": [{"anything-but": []}]}, "a[0].anything-but", "non-empty array"),
        ({"a": [{"anything-but": ["x", 1]}]}, "a[0].anything-but", "either all values are number or string"),
        ({"a": [{"anything-but": {"prefix": ""}}]}, "a[0].anything-but.prefix", "Null prefix/suffix"),
        ({"a": [{"anything-but": {"suffix": ["x", ""]}}]}, "a[0].anything-but.suffix", "Null prefix/suffix"),
        ({"a": [{"anything-but": {"prefix": {"equals-ignore-case": "x"}}}]}, "a[0].anything-but.prefix", "string"),
        ({"a": [{"anything-but": {"equals-ignore-case": 1}}]}, "a[0].anything-but.equals-ignore-case", "string"),
        ({"a": [{"anything-but": {"wildcard": []}}]}, "a[0].anything-but.wildcard", "non-empty array"),
        ({"a": [{"anything-but": {"wildcard": "x**"}}]}, "a[0].anything-but.wildcard", "Consecutive"),
        ({"a": [{"anything-but": {"numeric": [">", 1]}}]}, "a[0].anything-but.numeric", "Unsupported anything-but"),
        ({"a": [{"anything-but": {"prefix": "a", "suffix": "b"}}]}, "a[0].anything-but", "Only one key"),
        ({"$or": {"a": [1]}}, "$or", "must be an array"),
        ({"$or": [{"a": [1]}]}, "$or", "at least 2"),
        ({"$or": [{"a": [1]}, ["b"]]}, "$or[1]", "Only JSON objects"),
        ({"$or": [{"a": [1]}, {}]}, "$or[1]", "Empty objects"),
        ({"d": {"$or": [{"a": [1]}, {"b": {"c": []}}]}}, "d.$or[1].b.c", "Empty arrays"),
        ({"$or": [{"a": [1]}, {"x": {"prefix": ["p"]}}]}, "$or[1].x.prefix", "reserved field name"),
    ],
)
def test_invalid_patterns_are_refused_with_a_path_and_a_reason(pattern: Any, path: str, reason: str) -> None:
    error = refusal(pattern)
    assert error.path == path
    assert reason in error.reason
    assert str(error) == (f"{path}: {error.reason}" if path else error.reason)


def test_reserved_names_are_fine_outside_or() -> None:
    assert match({"prefix": ["p"], "numeric": {"=": [1]}}, {"prefix": "p", "numeric": {"=": 1}})


def test_pattern_error_is_a_value_error_and_pickles() -> None:
    error = refusal({"a": []})
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, str(copy)) == (error.path, error.reason, str(error))


def test_a_compiled_pattern_is_shared_safely_between_threads() -> None:
    pattern = compile_pattern({"items": {"kind": ["a"], "size": [{"numeric": [">", 1]}]}})
    events = [{"items": [{"kind": "a", "size": n % 3}, {"kind": "b", "size": 9}]} for n in range(300)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(pattern.matches, events))
    assert results == [n % 3 == 2 for n in range(300)]
    assert isinstance(pattern, Pattern)
    assert "items.kind" in repr(pattern)


# -- properties --------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**15), max_value=10**15)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
keys = st.text(max_size=6).filter(lambda key: key != "$or")


def nest(path: list[str], leaf: Any) -> Any:
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def same_json_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return bool(a == b)


@properties
@given(path=st.lists(keys, min_size=1, max_size=4), value=scalars, other=scalars)
def test_exact_match_of_a_scalar_placed_in_an_event(path: list[str], value: Any, other: Any) -> None:
    pattern = compile_pattern(nest(path, [value]))
    assert pattern.matches(nest(path, value))
    assert pattern.matches(nest(path, [other, value]))
    assert pattern.matches(nest(path, other)) is same_json_value(value, other)


@properties
@given(value=st.text(max_size=8) | st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False))
def test_anything_but_a_value_never_matches_it(value: Any) -> None:
    assert not match({"f": [{"anything-but": value}]}, {"f": value})
    assert not match({"f": [{"anything-but": [value]}]}, {"f": [value, value]})


@properties
@given(excluded=st.text(max_size=4) | st.integers(-5, 5), value=scalars)
def test_anything_but_matches_every_other_present_value(excluded: Any, value: Any) -> None:
    assert match({"f": [{"anything-but": excluded}]}, {"f": value}) is not same_json_value(excluded, value)


@properties
@given(text=st.text(max_size=20), data=st.data())
def test_a_strings_own_prefix_and_suffix_match(text: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(text)))
    assert match({"f": [{"prefix": text[:cut]}]}, {"f": text})
    assert match({"f": [{"suffix": text[cut:]}]}, {"f": text})


@properties
@given(text=st.text(alphabet="abcXYZ-09", max_size=12), data=st.data())
def test_ignore_case_variants_match_any_casing(text: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(text)))
    event = {"f": text.swapcase()}
    assert match({"f": [{"prefix": {"equals-ignore-case": text[:cut]}}]}, event)
    assert match({"f": [{"suffix": {"equals-ignore-case": text[cut:]}}]}, event)
    assert match({"f": [{"equals-ignore-case": text}]}, event)
    assert not match({"f": [{"anything-but": {"equals-ignore-case": text}}]}, event)


small_ints = st.integers(-3, 3)
conditions = st.one_of(
    st.lists(small_ints, min_size=1, max_size=3),
    small_ints.map(lambda n: [{"numeric": [">", n]}]),
    small_ints.map(lambda n: [{"anything-but": n}]),
    st.booleans().map(lambda flag: [{"exists": flag}]),
)
sub_patterns = st.dictionaries(st.sampled_from(["a", "b", "c"]), conditions, min_size=1, max_size=3)
events = st.dictionaries(st.sampled_from(["a", "b", "c"]), small_ints | st.lists(small_ints, max_size=2))


@properties
@given(p=sub_patterns, q=sub_patterns, event=events)
def test_or_of_two_patterns_is_either(p: dict[str, Any], q: dict[str, Any], event: dict[str, Any]) -> None:
    either = compile_pattern({"$or": [p, q]}).matches(event)
    assert either == (compile_pattern(p).matches(event) or compile_pattern(q).matches(event))


@properties
@given(p=sub_patterns, event=events)
def test_compiling_and_matching_are_deterministic(p: dict[str, Any], event: dict[str, Any]) -> None:
    first, second = compile_pattern(p), compile_pattern(p)
    verdicts = {first.matches(event), first.matches(event), second.matches(event)}
    assert len(verdicts) == 1


finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


@properties
@given(low=finite, high=finite, value=finite | st.integers(-(10**9), 10**9))
def test_numeric_ranges_agree_with_python_comparisons(low: float, high: float, value: float) -> None:
    for operator, holds in [
        ("=", value == low),
        ("<", value < low),
        ("<=", value <= low),
        (">", value > low),
        (">=", value >= low),
    ]:
        assert match({"n": [{"numeric": [operator, low]}]}, {"n": value}) is holds
    if low < high:
        for lower, upper in [(">", "<"), (">", "<="), (">=", "<"), (">=", "<=")]:
            above = value > low if lower == ">" else value >= low
            below = value < high if upper == "<" else value <= high
            assert match({"n": [{"numeric": [lower, low, upper, high]}]}, {"n": value}) is (above and below)


wildcards = st.text(alphabet="ab*", max_size=10).filter(lambda text: "**" not in text and text.count("*") <= 5)


@properties
@given(wildcard=wildcards, value=st.text(alphabet="ab", max_size=10))
def test_wildcard_agrees_with_a_regular_expression(wildcard: str, value: str) -> None:
    reference = re.fullmatch(".*".join(map(re.escape, wildcard.split("*"))), value, re.DOTALL) is not None
    assert match({"f": [{"wildcard": wildcard}]}, {"f": value}) is reference


@properties
@given(network=st.ip_addresses(v=4), mask=st.integers(0, 32), address=st.ip_addresses(v=4))
def test_cidr_agrees_with_ipaddress(network: ipaddress.IPv4Address, mask: int, address: ipaddress.IPv4Address) -> None:
    expected = address in ipaddress.ip_network(f"{network}/{mask}", strict=False)
    assert match({"ip": [{"cidr": f"{network}/{mask}"}]}, {"ip": str(address)}) is expected


items = st.lists(st.fixed_dictionaries({"kind": st.sampled_from("ab"), "size": st.integers(0, 2)}), max_size=4)


@properties
@given(elements=items, kind=st.sampled_from("ab"), size=st.integers(0, 2))
def test_array_consistency_matches_a_per_element_check(elements: list[dict[str, Any]], kind: str, size: int) -> None:
    expected = any(element["kind"] == kind and element["size"] == size for element in elements)
    assert match({"items": {"kind": [kind], "size": [size]}}, {"items": elements}) is expected
