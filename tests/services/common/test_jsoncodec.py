"""services/common/jsoncodec.py: orjson's speed, the standard library's reading of every document."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.jsoncodec import dumps, has_long_digit_run, loads

# Documents orjson alone would read differently (a float for a big integer) or refuse.
ONLY_JSON_READS = [
    b'{"n": 111111111111111111111111111111}',
    b"[-9223372036854775809]",
    b"[NaN, Infinity, -Infinity]",
    b"[1e400]",
    b'["\\ud800"]',
    b'{"\\udc00": 1}',
    b"\xef\xbb\xbf[1]",
    '["utf-16"]'.encode("utf-16"),
]


@pytest.mark.parametrize("body", ONLY_JSON_READS)
def test_documents_orjson_reads_otherwise_are_read_as_json_reads_them(body: bytes) -> None:
    value, fast = loads(body)
    expected = json.loads(body)
    assert not fast
    assert repr(value) == repr(expected)  # repr: NaN != NaN, and 1.0 == 1 would hide a float


@pytest.mark.parametrize("body", [b"[1,", b"", b"\xff", b"[" * 5000 + b"]" * 5000])
def test_what_json_refuses_is_refused_with_its_error(body: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)) as ours:
        loads(body)
    with pytest.raises((ValueError, RecursionError)) as theirs:
        json.loads(body)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_a_value_json_read_is_written_back_as_json_writes_it() -> None:
    value, fast = loads(b'{"x": NaN, "big": 111111111111111111111111111111}')
    assert dumps(value, plain=not fast) == b'{"x":NaN,"big":111111111111111111111111111111}'


@pytest.mark.parametrize("value", [{"s": "\ud800"}, {1: "non-string key"}, {"big": 2**70}])
def test_what_orjson_cannot_write_is_written_by_json(value: object) -> None:
    try:
        expected: object = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        expected = type(exc)
    try:
        got: object = dumps(value)
    except UnicodeEncodeError as exc:
        got = type(exc)
    assert got == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@settings(database=None, deadline=None, max_examples=150)
@given(value=json_values)
def test_any_json_document_reads_as_json_reads_it(value: object) -> None:
    try:
        body = json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        body = json.dumps(value).encode()  # lone surrogates, escaped
    got, fast = loads(body)
    assert repr(got) == repr(json.loads(body))
    assert repr(json.loads(dumps(got, plain=not fast))) == repr(got)  # written back, it reads the same


@settings(max_examples=500)
@given(st.binary(max_size=80) | st.text(alphabet="0123456789x ٣\u0660", max_size=80).map(str.encode))
def test_the_long_digit_check_answers_as_the_regex_it_replaced(body: bytes) -> None:
    # A bytes pattern's \d is ASCII [0-9] only: Arabic-Indic digits (UTF-8 encoded) are no digits here.
    assert has_long_digit_run(body) == (re.search(rb"\d{19}", body) is not None)


@pytest.mark.parametrize(
    ("body", "long"),
    [(b"1" * 19, True), (b"1" * 18, False), (b"x" + b"9" * 19 + b"x", True), (b"123456789 1234567890", False)],
)
def test_nineteen_ascii_digits_in_a_row_is_a_long_run(body: bytes, long: bool) -> None:
    assert has_long_digit_run(body) is long
