"""JSON on the hot paths: orjson's speed with exactly the standard library's reading of a document.

orjson parses and writes ~5-15x faster than `json` (bench/README.md), but reads a few documents
differently: it turns integers beyond 64 bits into floats (silently losing digits), and refuses NaN,
Infinity, lone surrogates (`"\\ud800"`), a UTF-8 byte order mark, UTF-16/32 text and nesting past
1,024, all of which `json.loads(bytes)` reads. `loads` hands every such document to `json.loads`, so
what is accepted, what is refused (with `json`'s own message) and the values read are `json`'s:

    value, fast = loads(body)   # fast: orjson read it, so `dumps` writes it back as json would have

`dumps` writes compact UTF-8 JSON (`json.dumps(..., separators=(",", ":"), ensure_ascii=False)`):
orjson's output, or `json`'s for what orjson cannot write (integers beyond 64 bits, lone
surrogates, nesting past 254, non-string keys). Floats are written in their shortest form by both,
with one difference of spelling: orjson writes `1.5e-7` where `json` writes `1.5e-07`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# 19 digits in a row may be an integer orjson cannot hold exactly (beyond -2**63 .. 2**64-1); such a
# document (rare: ids are strings) goes to `json`. A digit run inside a string sends it there too,
# which costs time, never correctness. Found by mapping every ASCII digit to "0" and every other byte
# to " " (`bytes.translate`, C speed) and searching for 19 zeros: the same answer as the regex
# `rb"\d{19}"` (a bytes pattern's \d is [0-9]), ~10x faster (the regex cost 14x orjson's own parse
# of a 100 KiB batch: bench/README.md).
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_RUN = b"0" * 19


def has_long_digit_run(body: bytes) -> bool:
    """Whether `body` holds 19 or more ASCII digits in a row."""
    return _LONG_RUN in body.translate(_DIGITS_AS_ZEROS)


def loads(body: bytes) -> tuple[Any, bool]:
    """`json.loads(body)` and whether orjson read it (False: `json` did, the value may hold NaN)."""
    if not has_long_digit_run(body):
        try:
            return orjson.loads(body), True
        except orjson.JSONDecodeError:
            pass  # maybe a document only `json` reads: let it decide, with its own message
    return json.loads(body), False


def dumps(value: Any, *, plain: bool = False) -> bytes:
    """Compact UTF-8 JSON; `plain` writes it with `json` (a value `loads` did not read with orjson)."""
    if not plain:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass  # `json` writes it, or raises what it always raised (a lone surrogate, too deep)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
