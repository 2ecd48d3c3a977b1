"""The value side of EventBridge event patterns: one field's list of matchers, compiled to a predicate.

A field in a pattern holds a list (`"state": ["running", {"prefix": "stop"}]`); the field matches
when any leaf value found at its path satisfies any member of the list. `compile_field` validates
such a list the way EventBridge does and returns a `FieldRule`: a predicate over one leaf value
plus whether `{"exists": false}` was among the members. Walking the event is `router.patterns`'s job.

Types are never coerced: `"5"` is a string and `5` a number, and booleans are not numbers.
Numbers compare numerically (`300` matches `300.0`). String operators (prefix, suffix,
equals-ignore-case, wildcard, cidr) only ever match strings; numeric ranges only numbers.
"""

import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

Predicate = Callable[[Any], bool]
StrPredicate = Callable[[str], bool]

_NUMERIC_OPERATORS: Final = frozenset({"=", "<", "<=", ">", ">="})
# EventBridge's wildcard complexity limit is not published; a wildcard with more than five `*` is
# refused ("*:*:*:*:*:event-bus/*" is, in the conformance vectors).
_MAX_WILDCARDS: Final = 5


class PatternError(ValueError):
    """An invalid pattern. `path` is the dotted path into the pattern (e.g. "data.size"), `reason` a sentence.

    List positions are written `[i]` and operators are path steps, so a bad operand reads
    `"detail.state[0].anything-but"`. The root of the pattern is the empty path.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type["PatternError"], tuple[str, str]]:
        return type(self), (self.path, self.reason)


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One field's compiled list: `test` holds for a matching leaf (None: only `exists: false` was given)."""

    test: Predicate | None
    absent_ok: bool


def compile_field(values: Sequence[Any], where: str) -> FieldRule:
    """Compile the list of matchers at one pattern field; `where` is its path for error messages."""
    if not values:
        raise PatternError(where, "Empty arrays are not allowed.")
    exact = _ExactSet()
    tests: list[Predicate] = []
    exists = absent_ok = False
    for position, value in enumerate(values):
        at = f"{where}[{position}]"
        if isinstance(value, Mapping):
            if len(value) == 1 and "exists" in value:
                flag = value["exists"]
                if not isinstance(flag, bool):
                    raise PatternError(f"{at}.exists", "exists match pattern must be either true or false.")
                exists, absent_ok = exists or flag, absent_ok or not flag
            else:
                tests.append(_compile_operator(value, at))
        elif not exact.add(value):
            raise PatternError(at, "Match value must be String, number, true, false, or null.")
    if exists:
        return FieldRule(_any_value, absent_ok)
    if exact:
        tests.insert(0, exact.predicate())
    if not tests:
        return FieldRule(None, absent_ok)
    if len(tests) == 1:
        return FieldRule(tests[0], absent_ok)
    members = tuple(tests)
    return FieldRule(lambda v: any(test(v) for test in members), absent_ok)


def _any_value(value: Any) -> bool:
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


class _ExactSet:
    """Exact values, split by JSON type so that `true` never equals `1` nor `"true"`."""

    def __init__(self) -> None:
        self.strings: set[str] = set()
        self.numbers: set[int | float] = set()
        self.booleans: set[bool] = set()
        self.null = False

    def __bool__(self) -> bool:
        return bool(self.strings or self.numbers or self.booleans or self.null)

    def add(self, value: Any) -> bool:
        if value is None:
            self.null = True
        elif isinstance(value, bool):
            self.booleans.add(value)
        elif isinstance(value, str):
            self.strings.add(value)
        elif _finite_number(value):
            self.numbers.add(value)
        else:
            return False
        return True

    def predicate(self) -> Predicate:
        strings, numbers, booleans = frozenset(self.strings), frozenset(self.numbers), frozenset(self.booleans)
        null = self.null
        if not (numbers or booleans or null):
            return lambda v: isinstance(v, str) and v in strings

        def test(v: Any) -> bool:
            if isinstance(v, str):
                return v in strings
            if isinstance(v, bool):
                return v in booleans
            if isinstance(v, int | float):
                return v in numbers  # numeric equality: hash(5) == hash(5.0)
            return v is None and null

        return test


def _strings_only(test: StrPredicate) -> Predicate:
    return lambda v: isinstance(v, str) and test(v)


def _compile_operator(expression: Mapping[str, Any], at: str) -> Predicate:
    if len(expression) != 1:
        reason = "Match expression name not found." if not expression else "Only one key allowed in match expression."
        raise PatternError(at, reason)
    ((name, operand),) = expression.items()
    where = f"{at}.{name}"
    if name in ("prefix", "suffix", "equals-ignore-case"):
        return _strings_only(_compile_text(name, operand, where))
    if name == "wildcard":
        if not isinstance(operand, str):
            raise PatternError(where, "wildcard match pattern must be a string.")
        return _strings_only(_compile_wildcard(operand, where))
    if name == "numeric":
        return _compile_numeric(operand, where)
    if name == "cidr":
        return _compile_cidr(operand, where)
    if name == "anything-but":
        return _compile_anything_but(operand, where)
    raise PatternError(at, f"Unrecognized match type {name}.")


def _compile_text(name: str, operand: Any, where: str) -> StrPredicate:
    """prefix / suffix (each also as `{"equals-ignore-case": text}`) and equals-ignore-case."""
    fold = name == "equals-ignore-case"
    if fold and isinstance(operand, Mapping):
        raise PatternError(where, "equals-ignore-case match pattern must be a string.")
    if isinstance(operand, Mapping):
        if len(operand) != 1 or not isinstance(operand.get("equals-ignore-case"), str):
            raise PatternError(where, f'{name} takes a string or {{"equals-ignore-case": string}}.')
        operand, fold = operand["equals-ignore-case"], True
    if not isinstance(operand, str):
        raise PatternError(where, f"{name} match pattern must be a string.")
    text: str = operand.lower() if fold else operand
    if name == "equals-ignore-case":

        def equals(value: str) -> bool:
            return value.lower() == text

        return equals
    if name == "prefix":

        def starts(value: str) -> bool:
            return (value.lower() if fold else value).startswith(text)

        return starts

    def ends(value: str) -> bool:
        return (value.lower() if fold else value).endswith(text)

    return ends


def _compile_wildcard(text: str, where: str) -> StrPredicate:
    """`*` matches any run of characters; `\\*` is a literal star and `\\\\` a literal backslash.

    Matching splits the pattern at its wildcards and finds the literal parts left to right, which
    is linear in the value (a backtracking regex is not, with several stars).
    """
    parts = [""]
    index = 0
    while index < len(text):
        char = text[index]
        if char == "*":
            if text.startswith("*", index + 1):
                raise PatternError(where, f"Consecutive wildcard characters at pos {index}.")
            parts.append("")
        elif char == "\\":
            if not text.startswith(("*", "\\"), index + 1):
                raise PatternError(where, f"Invalid escape character at pos {index}.")
            index += 1
            parts[-1] += text[index]
        else:
            parts[-1] += char
        index += 1
    if len(parts) - 1 > _MAX_WILDCARDS:
        raise PatternError(where, "Rule is too complex - try using fewer wildcard characters.")
    if len(parts) == 1:
        literal = parts[0]
        return lambda v: v == literal
    head, middle, tail = parts[0], tuple(parts[1:-1]), parts[-1]
    shortest = sum(map(len, parts))

    def test(value: str) -> bool:
        if len(value) < shortest or not value.startswith(head) or not value.endswith(tail):
            return False
        position, end = len(head), len(value) - len(tail)
        for part in middle:
            found = value.find(part, position, end)
            if found < 0:
                return False
            position = found + len(part)
        return True

    return test


def _compile_numeric(operand: Any, where: str) -> Predicate:
    """`[op, n]` with op one of = < <= > >=, or a range `[> | >=, low, < | <=, high]` with low < high."""
    if not isinstance(operand, list):
        raise PatternError(where, "Value of numeric must be an array.")
    if not operand or not isinstance(operand[0], str):
        raise PatternError(where, f"Invalid member in numeric match: {operand[0] if operand else ']'}.")
    first = operand[0]
    if first not in _NUMERIC_OPERATORS:
        raise PatternError(where, f"Unrecognized numeric range operator: {first}.")
    if len(operand) < 2 or not _finite_number(operand[1]):
        raise PatternError(where, f"Value of {'equals' if first == '=' else first} must be numeric.")
    if len(operand) == 2:
        return _numeric_test(first, operand[1], None, math.nan)
    if first not in (">", ">="):
        raise PatternError(where, "Too many elements in numeric expression.")
    second = operand[2]
    if not isinstance(second, str):
        raise PatternError(where, f"Bad value in numeric range: {second}.")
    if second not in ("<", "<="):
        raise PatternError(where, f"Bad numeric range operator: {second}.")
    if len(operand) < 4 or not _finite_number(operand[3]):
        raise PatternError(where, f"Value of {second} must be numeric.")
    if len(operand) > 4:
        raise PatternError(where, "Too many terms in numeric range expression.")
    if operand[1] >= operand[3]:
        raise PatternError(where, "Bottom must be less than top.")
    return _numeric_test(first, operand[1], second, operand[3])


def _numeric_test(first: str, bound: float, second: str | None, top: float) -> Predicate:
    if first == "=":
        return lambda v: _is_number(v) and v == bound
    if first == "<":
        return lambda v: _is_number(v) and v < bound
    if first == "<=":
        return lambda v: _is_number(v) and v <= bound
    if second is None:
        return (lambda v: _is_number(v) and v > bound) if first == ">" else (lambda v: _is_number(v) and v >= bound)
    open_low, open_high = first == ">", second == "<"

    def between(v: Any) -> bool:
        if not _is_number(v):
            return False
        number: float = v
        above = number > bound if open_low else number >= bound
        return above and (number < top if open_high else number <= top)

    return between


def _compile_cidr(operand: Any, where: str) -> Predicate:
    if not isinstance(operand, str):
        raise PatternError(where, "cidr match pattern must be a string.")
    address, slash, mask = operand.partition("/")
    if not slash or "/" in mask:
        raise PatternError(where, "Malformed CIDR, one '/' required.")
    if not mask.isdigit():
        raise PatternError(where, "Malformed CIDR, mask bits must be an integer.")
    try:
        network = ipaddress.ip_network(operand, strict=False)
    except ValueError:
        raise PatternError(where, f"Nonstandard IP address: {address}.") from None

    def test(value: str) -> bool:
        try:
            return ipaddress.ip_address(value) in network
        except ValueError:
            return False

    return _strings_only(test)


def _compile_anything_but(operand: Any, where: str) -> Predicate:
    """`anything-but` matches any present leaf (null and other JSON types included) the inner test refuses."""
    if isinstance(operand, Mapping):
        inner = _compile_anything_but_operator(operand, where)
        return lambda v: not (isinstance(v, str) and inner(v))
    values = operand if isinstance(operand, list) else [operand]
    if not values or not all(isinstance(v, str) or _finite_number(v) for v in values):
        raise PatternError(where, "Value of anything-but must be a string, a number, or a non-empty array of them.")
    if len({isinstance(v, str) for v in values}) != 1:
        raise PatternError(where, "Inside anything-but list, either all values are number or string.")
    excluded = _ExactSet()
    for value in values:
        excluded.add(value)
    test = excluded.predicate()
    return lambda v: not test(v)


def _compile_anything_but_operator(operand: Mapping[str, Any], where: str) -> StrPredicate:
    if len(operand) != 1:
        raise PatternError(where, "Only one key allowed in anything-but expression.")
    ((name, value),) = operand.items()
    at = f"{where}.{name}"
    if name not in ("prefix", "suffix", "equals-ignore-case", "wildcard"):
        raise PatternError(at, f"Unsupported anything-but pattern: {name}.")
    texts = value if isinstance(value, list) else [value]
    if not texts or not all(isinstance(text, str) for text in texts):
        raise PatternError(at, f"Inside anything-but, {name} takes a string or a non-empty array of strings.")
    if name in ("prefix", "suffix") and not all(texts):
        raise PatternError(at, "Null prefix/suffix not allowed.")
    if name == "prefix":
        starts = tuple(texts)
        return lambda v: v.startswith(starts)
    if name == "suffix":
        ends = tuple(texts)
        return lambda v: v.endswith(ends)
    if name == "equals-ignore-case":
        folded = frozenset(text.lower() for text in texts)
        return lambda v: v.lower() in folded
    wildcards = tuple(_compile_wildcard(text, at) for text in texts)
    return lambda v: any(wildcard(v) for wildcard in wildcards)
