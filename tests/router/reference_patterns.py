"""The pattern matcher as it was before issue 10 (a backtracking search over array elements), kept as an oracle.

It is exact but exponential in the number of fields through arrays, so `router.patterns` now decides
array consistency bottom-up; `test_patterns.py` checks on small random events that both agree.
Its original description follows.

EventBridge event patterns: validated and compiled once, then matched against many events.

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
* `$or` (at any level) takes an array of at least two non-empty objects. The pattern is
  expanded into its alternatives (as event-ruler does), each a conjunction of fields; when a
  path occurs twice in one alternative the later occurrence replaces the earlier one.

The empty pattern `{}` is refused, as EventBridge refuses it: a subscription that wants every
event has no pattern at all, which the router handles before asking this module.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

from router.pattern_ops import FieldRule, PatternError, Predicate, compile_field

__all__ = ["Pattern", "PatternError", "compile_pattern"]

# Where a leaf sits: for each event array on its way, (the array's position in the event, index).
Membership: TypeAlias = tuple[tuple[tuple[str | int, ...], int], ...]
Leaf: TypeAlias = tuple[Any, Membership]
# One field of one alternative: (index into the pattern's paths, test, exists:false allowed).
_Field: TypeAlias = tuple[int, Predicate | None, bool]

_OR: Final = "$or"
# The $or expansion is exponential in nested $ors; past this many alternatives a pattern is refused.
_MAX_ALTERNATIVES: Final = 1024
_LEAF_TYPES: Final = (str, int, float, bool, type(None))
# event-ruler reserves these names (its operators and a few planned ones) as field names inside $or.
_RESERVED_IN_OR: Final = frozenset(
    {
        "exactly", "equals-ignore-case", "prefix", "suffix", "anything-but", "exists", "wildcard", "numeric",
        "cidr", "=", "<", "<=", ">", ">=", "regex", "not-wildcard", "not-equals-ignore-case", "date-after",
        "date-on-or-after", "date-before", "date-on-or-before", "in-date-range", "ip-address-in-range",
        "ip-address-not-in-range",
    }
)  # fmt: skip


def compile_pattern(pattern: Any) -> "Pattern":
    """Validate and compile an EventBridge pattern (a dict). Raises PatternError.

    `{}` is refused ("Empty objects are not allowed"), as by EventBridge; "match every event"
    is the absence of a pattern, for the caller to handle.
    """
    if not isinstance(pattern, Mapping):
        raise PatternError("", "An event pattern must be a JSON object.")
    alternatives = _expand(pattern, (), "", False, [{}])
    paths: dict[str, int] = {}
    compiled = []
    for alternative in alternatives:
        fields = [(paths.setdefault(name, len(paths)), rule.test, rule.absent_ok) for name, rule in alternative.items()]
        compiled.append(tuple(fields))
    return Pattern(tuple(_Path(name) for name in paths), tuple(compiled))


class Pattern:
    """A compiled pattern: immutable, so one instance may be shared between threads and tasks."""

    __slots__ = ("_alternatives", "_paths")

    def __init__(self, paths: tuple["_Path", ...], alternatives: tuple[tuple[_Field, ...], ...]) -> None:
        self._paths = paths
        self._alternatives = alternatives

    def __repr__(self) -> str:
        names = ", ".join(path.name for path in self._paths)
        return f"<Pattern over {names} ({len(self._alternatives)} alternative(s))>"

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Does `event` (a JSON object, as decoded by `json.loads`) match this pattern?"""
        leaves: list[list[Leaf] | None] = [None] * len(self._paths)
        return any(self._matches(fields, event, leaves) for fields in self._alternatives)

    def _matches(self, fields: tuple[_Field, ...], event: Mapping[str, Any], cache: list[list[Leaf] | None]) -> bool:
        constrained: list[tuple[list[Membership], list[Membership] | None]] = []
        for index, test, absent_ok in fields:
            leaves = cache[index]
            if leaves is None:
                leaves = cache[index] = self._paths[index].leaves(event)
            if not leaves:
                if absent_ok:
                    continue
                return False
            hits = [] if test is None else [membership for value, membership in leaves if test(value)]
            if () in hits:
                continue  # a hit outside any array agrees with every other choice
            # exists:false can still hold if every leaf lies in array elements the other fields did not choose
            absent = [membership for _, membership in leaves] if absent_ok else None
            if absent is not None and () in absent:
                absent = None
            if not hits and absent is None:
                return False
            constrained.append((list(dict.fromkeys(hits)), absent))
        return not constrained or _choose(constrained, 0, {}, [])


def _choose(
    fields: list[tuple[list[Membership], list[Membership] | None]],
    position: int,
    chosen: dict[tuple[str | int, ...], int],
    absent: list[list[Membership]],
) -> bool:
    """Backtrack over the fields' array elements for one array-consistent choice."""
    if position == len(fields):
        return not any(_agrees(chosen, membership) for leaves in absent for membership in leaves)
    hits, leaves = fields[position]
    for membership in hits:
        if _agrees(chosen, membership) and _choose(fields, position + 1, {**chosen, **dict(membership)}, absent):
            return True
    return leaves is not None and _choose(fields, position + 1, chosen, [*absent, leaves])


def _agrees(chosen: dict[tuple[str | int, ...], int], membership: Membership) -> bool:
    return all(chosen.get(array, index) == index for array, index in membership)


class _Path:
    """A dotted field name, resolved against events whose own keys may contain dots."""

    __slots__ = ("_end", "_steps", "name")

    def __init__(self, name: str) -> None:
        segments = name.split(".")
        self.name = name
        self._end = len(segments)
        # From segment i, an event key may span segments i..j-1 (joined by dots): (key, j), shortest first.
        self._steps = tuple(
            tuple((".".join(segments[i:j]), j) for j in range(i + 1, len(segments) + 1)) for i in range(len(segments))
        )

    def leaves(self, event: Mapping[str, Any]) -> list[Leaf]:
        found: list[Leaf] = []
        self._object(event, 0, (), (), found)
        return found

    def _object(
        self, obj: Mapping[str, Any], i: int, where: tuple[str | int, ...], membership: Membership, found: list[Leaf]
    ) -> None:
        for key, j in self._steps[i]:
            if key in obj:
                self._value(obj[key], j, (*where, key), membership, found)

    def _value(
        self, value: Any, j: int, where: tuple[str | int, ...], membership: Membership, found: list[Leaf]
    ) -> None:
        if isinstance(value, _LEAF_TYPES):
            if j == self._end:
                found.append((value, membership))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                self._value(item, j, (*where, index), (*membership, (where, index)), found)
        elif isinstance(value, Mapping):
            if j < self._end:
                self._object(value, j, where, membership, found)
        elif j == self._end:
            found.append((value, membership))


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
