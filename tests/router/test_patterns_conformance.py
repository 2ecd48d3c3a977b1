"""Every EventBridge conformance vector in tests/router/conformance/eventbridge-patterns, run as it is.

The vectors were recorded against real EventBridge (see the folder's README.md). A file name
without a suffix must match, `_NEG` must not, and `_EXC` must be refused at compile time.
"""

import json
from pathlib import Path
from typing import Any

import json5
import pytest

from router.patterns import PatternError, compile_pattern

# Carried in the repository (with their LICENSE.txt), so a clone runs them with nothing beside it.
VECTORS = Path(__file__).resolve().parent / "conformance" / "eventbridge-patterns"
CASES = sorted(VECTORS.glob("*.json5"))

# The README's census: 66 matches, 51 _NEG, 38 _EXC.
EXPECTED = {"match": 66, "no-match": 51, "refused": 38}


def expected_outcome(case: Path) -> str:
    if case.stem.endswith("_EXC"):
        return "refused"
    return "no-match" if case.stem.endswith("_NEG") else "match"


def load(case: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json5.loads(case.read_text(encoding="utf-8"))
    return loaded


def test_every_vector_is_present() -> None:
    """A missing or moved folder must fail here rather than run zero cases."""
    assert VECTORS.is_dir(), f"conformance vectors not found at {VECTORS}"
    outcomes = [expected_outcome(case) for case in CASES]
    assert {outcome: outcomes.count(outcome) for outcome in EXPECTED} == EXPECTED
    assert len(CASES) == 155
    assert (VECTORS / "complex_multi_key_event.json").is_file()
    assert (VECTORS / "complex_multi_key_event_pattern.json").is_file()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_vector(case: Path) -> None:
    vector = load(case)
    outcome = expected_outcome(case)
    if outcome == "refused":
        with pytest.raises(PatternError) as refused:
            compile_pattern(vector["EventPattern"])
        assert refused.value.reason
        return
    pattern = compile_pattern(vector["EventPattern"])
    assert pattern.matches(vector["Event"]) is (outcome == "match")


def test_complex_multi_key_pair() -> None:
    # The pattern repeats the key "location"; as in EventBridge, the later one is the one in force.
    pattern = json.loads((VECTORS / "complex_multi_key_event_pattern.json").read_text(encoding="utf-8"))
    event = json.loads((VECTORS / "complex_multi_key_event.json").read_text(encoding="utf-8"))
    assert compile_pattern(pattern).matches(event) is True
