"""Tile plans and blending weights (runtime/tiling.py): property tests, pure numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.tiling import TileBlender, axis_starts, plan_tiles, ramp

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def axis_case(draw):
    tile = draw(st.integers(1, 64))
    overlap = draw(st.integers(0, tile - 1))
    length = draw(st.integers(1, 300))
    return length, tile, overlap


@SETTINGS
@given(axis_case())
def test_axis_starts_cover_flush_and_overlap(case):
    length, tile, overlap = case
    starts = axis_starts(length, tile, overlap)
    size = min(tile, length)
    assert list(starts) == sorted(set(starts)), "starts are strictly increasing"
    assert starts[0] == 0
    assert starts[-1] + size == length, "the last tile is flush with the edge"
    assert all(0 <= s and s + size <= length for s in starts), "no tile leaves the canvas"
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered.all(), "every pixel is covered"
    for a, b in itertools.pairwise(starts):
        assert b - a <= tile - overlap, "neighbours share at least `overlap` pixels"


@st.composite
def plan_case(draw):
    multiple = draw(st.sampled_from([1, 4, 8]))
    h = multiple * draw(st.integers(1, 14))
    w = multiple * draw(st.integers(1, 14))
    tile = multiple * draw(st.integers(1, 6))
    overlap = draw(st.integers(0, 40))
    return h, w, tile, overlap, multiple


@SETTINGS
@given(plan_case())
def test_weights_sum_to_one_everywhere(case):
    h, w, tile, overlap, multiple = case
    if overlap >= tile:
        overlap = tile - 1
    plan = plan_tiles(h, w, tile, overlap, multiple=multiple)
    assert plan.tile_h == min(tile, h) and plan.tile_w == min(tile, w)
    assert plan.tile_h % multiple == 0 and plan.tile_w % multiple == 0
    blender = TileBlender(plan)
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int64)
    for k in range(len(plan)):
        ys, xs = plan.slices(k)
        assert ys.stop <= h and xs.stop <= w
        total[ys, xs] += blender.weights[k]
        count[ys, xs] += 1
    assert (count >= 1).all(), "every pixel is covered by a tile"
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert (blender.weights > 0).all()


@SETTINGS
@given(plan_case(), st.integers(0, 2**31 - 1))
def test_blend_of_cut_is_identity(case, seed):
    """Cutting a canvas into tiles and blending them back gives the canvas (weights sum to one)."""
    h, w, tile, overlap, multiple = case
    overlap = min(overlap, tile - 1)
    blender = TileBlender(plan_tiles(h, w, tile, overlap, multiple=multiple))
    canvas = np.random.default_rng(seed).standard_normal((3, h, w)).astype(np.float32)
    k = len(blender.plan)
    tiles = blender.cut(canvas, np.empty((k, 3, blender.plan.tile_h, blender.plan.tile_w), np.float32), range(k))
    np.testing.assert_allclose(blender.blend(tiles), canvas, atol=1e-5)


def test_accumulate_in_chunks_equals_blend():
    blender = TileBlender(plan_tiles(40, 56, 16, 6, multiple=8))
    k = len(blender.plan)
    tiles = np.random.default_rng(0).standard_normal((k, 3, 16, 16)).astype(np.float32)
    acc = np.zeros((3, 40, 56), np.float32)
    for j in range(0, k, 4):  # batches of 4 tiles, as the Derainer feeds the engine
        idx = list(range(j, min(j + 4, k)))
        blender.accumulate(tiles[idx], idx, acc)
    np.testing.assert_allclose(acc, blender.blend(tiles), atol=1e-6)


def test_golden_plan():
    plan = plan_tiles(100, 64, 48, 16, multiple=8)
    assert plan.ys == (0, 32, 52)  # stride 32, last flush at 100 - 48
    assert plan.xs == (0, 16)  # 64 - 48 = 16 < stride: the flush tile is the second
    assert len(plan) == 6
    assert plan.origins[:3] == ((0, 0), (0, 16), (32, 0))


def test_ramp_window():
    np.testing.assert_allclose(ramp(6, 2), [1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(ramp(4, 0), 1.0)


def test_single_tile_when_tile_covers_the_canvas():
    plan = plan_tiles(24, 40, 64, 32, multiple=8)
    assert len(plan) == 1 and (plan.tile_h, plan.tile_w) == (24, 40)
    np.testing.assert_allclose(TileBlender(plan).weights[0], 1.0)


@pytest.mark.parametrize(("args", "match"), [
    ((10, 10, 0, 0), "positive multiple"),
    ((16, 16, 12, 2), "multiple of 8"),
    ((16, 16, 8, -1), "overlap"),
])
def test_bad_plans_raise(args, match):
    with pytest.raises(ValueError, match=match):
        plan_tiles(*args, multiple=8)


def test_axis_starts_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        axis_starts(100, 16, 16)
