"""Worst cases of the pattern engine (issue 10 item 4): time and peak memory, each in a fresh process.

    .venv/bin/python -m bench.patterns            # every case
    .venv/bin/python -m bench.patterns long-key   # one case

Cases: `long-key`, a field name of 1,600 dotted segments (3.2 KB), compiled and matched, as
`POST /patterns/test` and a router start with it stored do; `arrays`, 7 `data` fields against an
870-byte event whose arrays hold objects, so array consistency has to be searched for and fails
at the last field; `deep`, a pattern nested 900 objects deep, compiled and encoded back as JSON
(as `GET /subscriptions` does); `arrays-20`, the `arrays` case with 18 arrays. `--no-limits` compiles
without `router.patterns.LIMITS`, to see what the matcher itself costs. Each runs in a child
process (`resource.getrusage` gives that
child's peak RSS) and is given up on after `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from router.patterns import LIMITS, PatternError, compile_pattern


def long_key() -> tuple[dict[str, Any], dict[str, Any]]:
    key = ".".join(["a"] * 1600)
    return {key: ["x"]}, {"a": {"a": "x"}}


def arrays() -> tuple[dict[str, Any], dict[str, Any]]:
    # Five arrays whose every element matches its field, then two fields on one more array that
    # no single element satisfies together: a backtracking search tries every combination first.
    data: dict[str, Any] = {name: [{"v": 1} for _ in range(12)] for name in "bcdef"}
    data["a"] = [{"x": 1} if i % 2 else {"y": 1} for i in range(12)]
    pattern = {"data": {**{name: {"v": [1]} for name in "bcdef"}, "a": {"x": [1], "y": [1]}}}
    return pattern, {"type": "t", "data": data}


def deep() -> tuple[dict[str, Any], dict[str, Any]]:
    pattern: dict[str, Any] = {"x": ["y"]}
    for _ in range(900):
        pattern = {"n": pattern}
    return pattern, {"n": {"x": "y"}}


def arrays_20() -> tuple[dict[str, Any], dict[str, Any]]:
    names = [f"k{i}" for i in range(18)]
    data: dict[str, Any] = {name: [{"v": 1} for _ in range(12)] for name in names}
    data["a"] = [{"x": 1} if i % 2 else {"y": 1} for i in range(12)]
    pattern = {"data": {**{name: {"v": [1]} for name in names}, "a": {"x": [1], "y": [1]}}}
    return pattern, {"type": "t", "data": data}


CASES = {"long-key": long_key, "arrays": arrays, "arrays-20": arrays_20, "deep": deep}


def run(name: str, limits: bool) -> None:
    pattern, event = CASES[name]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        verdict: object = compile_pattern(pattern, LIMITS if limits else None).matches(event)
        json.dumps(pattern)
    except (PatternError, RecursionError) as exc:
        verdict = f"refused ({type(exc).__name__}: {str(exc)[:70]})"
    elapsed = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    size = len(json.dumps(pattern, separators=(",", ":")))
    print(
        f"{name:9} pattern {size:>6,} B, event {len(json.dumps(event)):>5,} B: {elapsed:8.3f} s, "
        f"peak RSS +{grown:,.0f} MB -> {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="some of: " + ", ".join(CASES) + " (default: all)")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--no-limits", action="store_true", help="compile without the pattern limits")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.child, not args.no_limits)
        return
    for name in args.cases or CASES:
        try:
            subprocess.run(
                [sys.executable, "-m", "bench.patterns", "--child", name, *(["--no-limits"] if args.no_limits else [])],
                check=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"{name:9} gave up after {args.timeout:.0f} s")


if __name__ == "__main__":
    main()
