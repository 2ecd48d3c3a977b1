"""The rendition ladder: sizes, skips and rate caps, by example and by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidInput
from services.processing.ladder import (
    RUNG_NAMES,
    displayed_size,
    fit_short_side,
    plan_ladder,
    poster_size,
    rate_caps,
)


def test_landscape_1080p_source_gets_the_usual_sizes() -> None:
    plan = plan_ladder(1920, 1080, 0, ["1080p", "720p", "480p", "360p", "240p", "144p"])
    sizes = {rung.name: (rung.width, rung.height) for rung in plan.rungs}
    assert sizes == {
        "1080p": (1920, 1080),
        "720p": (1280, 720),
        "480p": (854, 480),
        "360p": (640, 360),
        "240p": (426, 240),
        "144p": (256, 144),
    }
    assert plan.skipped == ()


def test_a_720p_source_keeps_its_own_size_and_skips_larger_rungs() -> None:
    plan = plan_ladder(1280, 720, 0, ["1080p", "720p"])
    assert [(r.name, r.width, r.height) for r in plan.rungs] == [("720p", 1280, 720)]
    assert plan.skipped == ("1080p",)


def test_requested_order_is_kept_and_repeats_count_once() -> None:
    plan = plan_ladder(3840, 2160, 0, ["360p", "2160p", "720p", "360p", "144p"])
    assert [r.name for r in plan.rungs] == ["360p", "2160p", "720p", "144p"]


@pytest.mark.parametrize("rotation", [90, -90, 270, 90.4])
def test_quarter_turn_makes_a_portrait_picture(rotation: float) -> None:
    plan = plan_ladder(1920, 1080, rotation, ["1080p", "720p"])
    assert [(r.width, r.height) for r in plan.rungs] == [(1080, 1920), (720, 1280)]


@pytest.mark.parametrize("rotation", [0, 180, -180, None, 45])
def test_no_quarter_turn_keeps_the_stored_orientation(rotation: float | None) -> None:
    assert displayed_size(1920, 1080, rotation) == (1920, 1080)


def test_portrait_phone_clip_is_named_by_its_shorter_side() -> None:
    plan = plan_ladder(1080, 1920, 0, ["1440p", "1080p"])
    assert plan.skipped == ("1440p",)
    assert [(r.name, r.width, r.height) for r in plan.rungs] == [("1080p", 1080, 1920)]


def test_odd_source_sizes_give_even_outputs_within_the_source() -> None:
    (rung,) = plan_ladder(1165, 767, 0, ["720p"]).rungs
    assert (rung.width, rung.height) == (1094, 720)
    assert fit_short_side(1921, 1080, 1080) == (1920, 1080)


def test_a_source_smaller_than_every_rung_skips_them_all() -> None:
    plan = plan_ladder(160, 120, 0, ["720p", "144p"])
    assert plan.rungs == ()
    assert plan.skipped == ("720p", "144p")


def test_unknown_names_are_refused_by_name() -> None:
    with pytest.raises(InvalidInput) as caught:
        plan_ladder(1920, 1080, 0, ["720p", "8k", "hd"])
    assert caught.value.field == "renditions"
    assert "8k,hd" in caught.value.expected


def test_caps_grow_with_the_rung_and_with_high_frame_rates() -> None:
    caps = [rate_caps(name)[0] for name in RUNG_NAMES]
    assert caps == sorted(caps, reverse=True)
    assert rate_caps("1080p", 30) == (6_000_000, 12_000_000)
    assert rate_caps("1080p", 60) == (9_000_000, 18_000_000)
    (rung,) = plan_ladder(1920, 1080, 0, ["720p"], fps=59.94).rungs
    assert (rung.crf, rung.maxrate_bps, rung.bufsize_bits) == (23, 4_500_000, 9_000_000)


def test_poster_is_at_most_720_on_the_shorter_side() -> None:
    assert poster_size(3840, 2160, 0) == (1280, 720)
    assert poster_size(3840, 2160, 90) == (720, 1280)
    assert poster_size(641, 361, 0) == (640, 360)


sides = st.integers(min_value=2, max_value=7680)
rotations = st.sampled_from([0, 90, 180, 270, -90, None])
requests = st.lists(st.sampled_from(RUNG_NAMES), min_size=1, max_size=10)


@given(width=sides, height=sides, rotation=rotations, names=requests)
def test_every_planned_rung_fits_the_rules(width: int, height: int, rotation: int | None, names: list[str]) -> None:
    plan = plan_ladder(width, height, rotation, names)
    shown_w, shown_h = displayed_size(width, height, rotation)
    assert sorted([r.name for r in plan.rungs] + list(plan.skipped)) == sorted(set(names))
    for rung in plan.rungs:
        short_side = int(rung.name.removesuffix("p"))
        assert rung.width % 2 == 0 and rung.height % 2 == 0
        assert min(rung.width, rung.height) == short_side
        assert rung.width <= shown_w and rung.height <= shown_h
        if shown_w != shown_h:
            assert (rung.width > rung.height) == (shown_w > shown_h) or rung.width == rung.height
        assert rung.width / rung.height == pytest.approx(shown_w / shown_h, rel=0.01)
    for name in plan.skipped:
        assert int(name.removesuffix("p")) > min(shown_w, shown_h)


@given(width=sides, height=sides, rotation=rotations)
def test_poster_fits_the_rules(width: int, height: int, rotation: int | None) -> None:
    out_w, out_h = poster_size(width, height, rotation)
    shown_w, shown_h = displayed_size(width, height, rotation)
    assert out_w % 2 == 0 and out_h % 2 == 0
    assert out_w <= shown_w and out_h <= shown_h
    assert min(out_w, out_h) == min(720, min(shown_w, shown_h) // 2 * 2)
