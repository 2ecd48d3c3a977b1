"""EventBridge event patterns: validated and compiled once, then matched against many events.

    pattern = compile_pattern({"type": ["cattube.video.uploaded"], "data": {"size": [{"numeric": [">", 0]}]}})
    pattern.matches(event)  # -> bool

The language is Amazon EventBridge's, matched the way EventBridge (aws/event-ruler) does:

* Keys descend into objects and are case-sensitive. A path is the dot-joined list of keys, in
  the pattern and in the event alike, so `{"a.b": [1]}` and `{"a": {"b": [1]}}` are the same
  pattern and both match `{"a": {"b": 1}}` and `{"a.b": 1}`.
* Each field holds a non-empty list; it matches when any leaf value at that path satisfies any
  member (see `router.pattern_ops` for the operators). Only leaves (strings, numbers,
  booleans, null) count: an object at the path is not a value, so `exists: true` does not
  match it and `exists: false` does. A present null is a value: `[null]` matches it, and
  `exists: false` does not.
* Event arrays are flattened: a field matches if any element does. Fields whose paths go
  through the same array must be satisfied by the same element of it ("array consistency"):
  `{"items": {"kind": ["a"], "size": [1]}}` needs one item with kind "a" and size 1.
  `exists: false` holds when no leaf at its path lies in the elements the other fields chose.
  Deciding this costs time linear in the part of the event the pattern's paths reach, for each
  alternative: fields are laid out as a tree of paths and the event is walked once along it,
  each node answering "can every field below be satisfied here, with at least one hit" and
  "are all of them absent here"; an array answers "some element can" and "every element is
  absent". (The search it replaced tried element combinations and took 11 s for seven fields
  over an 800-byte event: bench/README.md, "Pattern costs".)
* An event holding the same path twice (a key `"a.b"` beside an object `"a"` with a key `"b"`)
  merges the two when they are objects or leaves; when one of them is an array, all of them are
  taken as elements of one array, so two fields cannot be satisfied from two different ones.
  event-ruler would keep those arrays apart; no real event is known to hold such a pair.
* `$or` (at any level) takes an array of at least two non-empty objects. The pattern is
  expanded into its alternatives (as event-ruler does), each a conjunction of fields; when a
  path occurs twice in one alternative the later occurrence replaces the earlier one.

The empty pattern `{}` is refused, as EventBridge refuses it: a subscription that wants every
event has no pattern at all, which the router handles before asking this module.

Patterns are bounded before anything else looks at them (`LIMITS`): EventBridge's own default
quota is 2,048 characters per pattern, and the other bounds are ones that pattern size allows
many times over in practice but keep every pass over a pattern shallow and short.
"""

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from router.pattern_ops import FieldRule, PatternError, compile_field

__all__ = ["LIMITS", "Pattern", "PatternError", "PatternLimits", "PatternTooLarge", "compile_pattern"]

_OR: Final = "$or"
# The $or expansion is exponential in nested $ors; past this many alternatives a pattern is refused.
_MAX_ALTERNATIVES: Final = 1024
# event-ruler reserves these names (its operators and a few planned ones) as field names inside $or.
_RESERVED_IN_OR: Final = frozenset(
    {
        "exactly", "equals-ignore-case", "prefix", "suffix", "anything-but", "exists", "wildcard", "numeric",
        "cidr", "=", "<", "<=", ">", ">=", "regex", "not-wildcard", "not-equals-ignore-case", "date-after",
        "date-on-or-after", "date-before", "date-on-or-before", "in-date-range", "ip-address-in-range",
        "ip-address-not-in-range",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PatternLimits:
    """Bounds on a pattern, checked before it is compiled or stored (docs/decisions.md)."""

    max_chars: int = 2048  # compact JSON; EventBridge's default quota per pattern
    max_depth: int = 16  # nested objects and arrays; EventBridge's own examples use at most 7
    max_path_segments: int = 32  # a field's path, its dotted names split
    max_key_chars: int = 256
    max_fields: int = 100  # value lists in the whole pattern, counted before $or expansion
    max_values: int = 100  # members of one value list


LIMITS: Final = PatternLimits()


class PatternTooLarge(PatternError):
    """The pattern as a whole is over `max_chars` (the API answers 413, not 422)."""


def compile_pattern(pattern: Any, limits: PatternLimits | None = LIMITS) -> "Pattern":
    """Validate and compile an EventBridge pattern (a dict). Raises PatternError.

    `{}` is refused ("Empty objects are not allowed"), as by EventBridge; "match every event"
    is the absence of a pattern, for the caller to handle. `limits=None` skips the bounds (for
    patterns stored before they existed: refusing those would stop the router from starting).
    """
    if not isinstance(pattern, Mapping):
        raise PatternError("", "An event pattern must be a JSON object.")
    if limits is not None:
        check_limits(pattern, limits)
    alternatives = _expand(pattern, (), "", False, [{}])
    names = tuple(dict.fromkeys(name for alternative in alternatives for name in alternative))
    return Pattern(names, tuple(_tree(alternative) for alternative in alternatives))


def check_limits(pattern: Mapping[str, Any], limits: PatternLimits = LIMITS) -> None:
    """Refuse a pattern over any of `limits`, naming where. Iterative: the pattern may be arbitrarily deep."""
    fields = 0
    # (value, its path in the pattern for messages, containers above it, path segments above it)
    stack: list[tuple[Any, str, int, int]] = [(pattern, "", 1, 0)]
    while stack:
        value, where, depth, segments = stack.pop()
        if depth > limits.max_depth and isinstance(value, Mapping | list | tuple):
            raise PatternError(where, f"Nested more than {limits.max_depth} objects and arrays deep.")
        if isinstance(value, Mapping):
            for key, inner in value.items():
                name = str(key)
                if len(name) > limits.max_key_chars:
                    raise PatternError(where, f"A field name is longer than {limits.max_key_chars} characters.")
                steps = segments + (0 if name == _OR else name.count(".") + 1)
                at = f"{where}.{name}" if where else name
                if steps > limits.max_path_segments:
                    raise PatternError(at, f"A field path is longer than {limits.max_path_segments} segments.")
                if isinstance(inner, list | tuple) and name != _OR and segments >= 0:
                    fields += 1
                    if fields > limits.max_fields:
                        raise PatternError(at, f"More than {limits.max_fields} fields in one pattern.")
                    if len(inner) > limits.max_values:
                        raise PatternError(at, f"More than {limits.max_values} values for one field.")
                    # The values are matchers: their own keys are operators, not paths.
                    stack.extend((item, f"{at}[{i}]", depth + 2, -(1 << 30)) for i, item in enumerate(inner))
                else:
                    stack.append((inner, at, depth + 1, steps))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{where}[{i}]", depth + 1, segments) for i, item in enumerate(value))
    chars = len(json.dumps(pattern, separators=(",", ":"), ensure_ascii=False))
    if chars > limits.max_chars:
        raise PatternTooLarge("", f"The pattern is {chars} characters of JSON; at most {limits.max_chars} are allowed.")


class _Node:
    """A step of an alternative's tree of field paths: the field ending here, and the steps below."""

    __slots__ = ("absent_ok", "children", "rule")

    def __init__(self) -> None:
        self.rule: FieldRule | None = None
        self.children: dict[str, _Node] = {}
        self.absent_ok = True  # every field at or below this step may be absent (exists: false)


def _tree(alternative: dict[str, FieldRule]) -> _Node:
    root = _Node()
    for name, rule in alternative.items():
        node, on_the_way = root, [root]
        for segment in name.split("."):
            node = node.children.setdefault(segment, _Node())
            on_the_way.append(node)
        node.rule = rule
        if not rule.absent_ok:
            for step in on_the_way:
                step.absent_ok = False
    return root


class Pattern:
    """A compiled pattern: immutable, so one instance may be shared between threads and tasks."""

    __slots__ = ("_alternatives", "_names")

    def __init__(self, names: tuple[str, ...], alternatives: tuple[_Node, ...]) -> None:
        self._names = names
        self._alternatives = alternatives

    def __repr__(self) -> str:
        return f"<Pattern over {', '.join(self._names)} ({len(self._alternatives)} alternative(s))>"

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Does `event` (a JSON object, as decoded by `json.loads`) match this pattern?"""
        for root in self._alternatives:
            can, absent = _object(event, root, ())
            if can or absent:
                return True
        return False


# What the walk answers at each step: (can, absent). `can`: every field below can be satisfied
# within this part of the event, at least one of them by a matching value (so an array on the
# way is pinned to this element). `absent`: every field below may be absent and has no value here.
_Verdict = tuple[bool, bool]
_NEVER: Final = (False, False)
_HIT: Final = (True, False)


class _Same:
    """One path held more than once in an event (`"a.b"` beside `"a": {"b"}`): the values found there."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]) -> None:
        self.values = values


def _value(value: Any, node: _Node) -> _Verdict:
    if isinstance(value, Mapping):
        return _object(value, node, ())
    if isinstance(value, list | tuple):
        return _array(_elements(value), node)
    if isinstance(value, _Same):
        return _same(value.values, node)
    rule = node.rule
    if rule is None or node.children:
        return _object({}, node, (value,))
    # The common case, a value where one field ends: a hit, or neither a hit nor absent.
    return _HIT if rule.test is not None and rule.test(value) else _NEVER


def _object(obj: Mapping[str, Any], node: _Node, leaves: tuple[Any, ...]) -> _Verdict:
    """An object (`leaves`: the plain values also found at this path, outside any array)."""
    can = False
    rule = node.rule
    if rule is not None:
        if leaves:
            test = rule.test
            if test is None or not any(test(leaf) for leaf in leaves):
                return _NEVER  # a value is present and none matches: neither a hit nor absent
            can = True
        elif not rule.absent_ok:
            return _NEVER  # an object is not a value: the field is absent here
    absent = rule is None or not leaves  # values here only count for a field that ends here
    if node.children:
        obj = _split_dotted(obj)
        for segment, child in node.children.items():
            if segment in obj:
                child_can, child_absent = _value(obj[segment], child)
                if not (child_can or child_absent):
                    return _NEVER
                can, absent = can or child_can, absent and child_absent
            else:
                absent = absent and child.absent_ok
                if not child.absent_ok:
                    return _NEVER
    return can, absent


def _array(elements: Iterator[Any], node: _Node) -> _Verdict:
    """One element must satisfy every field that has a hit; being absent needs every element absent."""
    can, absent = False, True
    for element in elements:
        element_can, element_absent = _value(element, node)
        can, absent = can or element_can, absent and element_absent
        if can and not absent:
            break
    return can, absent and node.absent_ok


def _elements(array: Sequence[Any]) -> Iterator[Any]:
    """The elements of an array, with nested arrays flattened (iteratively: nesting may be deep).

    Flattening is exact: "some element can" and "every element is absent" nest as any() and all().
    """
    stack = [iter(array)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list | tuple):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _same(values: list[Any], node: _Node) -> _Verdict:
    objects = [value for value in values if isinstance(value, Mapping)]
    arrays = [value for value in values if isinstance(value, list | tuple | _Same)]
    if arrays:
        return _array(_elements([*_flat_same(values)]), node)
    leaves = tuple(value for value in values if not isinstance(value, Mapping))
    return _object(_merge(objects), node, leaves)


def _flat_same(values: list[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, _Same):
            yield from _flat_same(value.values)
        elif isinstance(value, list | tuple):
            yield from value
        else:
            yield value


def _merge(objects: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    if len(objects) == 1:
        return objects[0]
    merged: dict[str, list[Any]] = {}
    for obj in objects:
        for key, value in _split_dotted(obj).items():
            merged.setdefault(key, []).append(value)
    return {key: values[0] if len(values) == 1 else _Same(values) for key, values in merged.items()}


def _split_dotted(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object with dotted keys taken apart one level (`{"a.b": 1}` -> `{"a": {"b": 1}}`), merged."""
    if "." not in "".join(obj):  # (one C-level pass: this runs for every object on a pattern's paths)
        return obj
    found: dict[str, list[Any]] = {}
    for key, value in obj.items():
        first, dot, rest = key.partition(".")
        found.setdefault(first, []).append({rest: value} if dot else value)
    return {key: values[0] if len(values) == 1 else _Same(values) for key, values in found.items()}


def _expand(
    obj: Mapping[Any, Any],
    prefix: tuple[str, ...],
    where: str,
    in_or: bool,
    alternatives: list[dict[str, FieldRule]],
) -> list[dict[str, FieldRule]]:
    """Validate `obj` and add its fields to every alternative; `$or` multiplies the alternatives."""
    if not obj:
        raise PatternError(where, "Empty objects are not allowed.")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise PatternError(where, f"Field names must be strings, not {key!r}.")
        at = f"{where}.{key}" if where else key
        if key == _OR:
            alternatives = _expand_or(value, prefix, at, alternatives)
            continue
        if in_or and key in _RESERVED_IN_OR:
            raise PatternError(at, f"{key} is a reserved field name which cannot be used inside $or.")
        if isinstance(value, Mapping):
            alternatives = _expand(value, (*prefix, key), at, in_or, alternatives)
        elif isinstance(value, list | tuple):
            rule, name = compile_field(value, at), ".".join((*prefix, key))
            for alternative in alternatives:
                alternative[name] = rule
        else:
            raise PatternError(at, f'"{key}" must be an object or an array.')
    return alternatives


def _expand_or(
    value: Any, prefix: tuple[str, ...], at: str, alternatives: list[dict[str, FieldRule]]
) -> list[dict[str, FieldRule]]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise PatternError(at, "It must be an array followed with $or.")
    if len(value) < 2:
        raise PatternError(at, "There must be at least 2 objects in a $or relationship.")
    expanded: list[dict[str, FieldRule]] = []
    for position, branch in enumerate(value):
        if not isinstance(branch, Mapping):
            raise PatternError(f"{at}[{position}]", "Only JSON objects are allowed in the array of $or.")
        copies = [dict(alternative) for alternative in alternatives]
        expanded += _expand(branch, prefix, f"{at}[{position}]", True, copies)
        if len(expanded) > _MAX_ALTERNATIVES:
            raise PatternError(at, f"Rule is too complex: $or expands to more than {_MAX_ALTERNATIVES} alternatives.")
    return expanded
