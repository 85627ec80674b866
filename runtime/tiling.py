"""Overlapping tiles for frames larger than the engine's profile (or when ``tile`` is set).

Why tiling works on the fused step (docs/ARCHITECTURE.md): one DDIM step is affine in the noise estimate,
``x_next = c * (a * x_t - b * eps_hat) + d * eps_hat``, and every tile is cut from the same
x_t. So a per-pixel weighted average of the tiles' ``x_next`` (weights summing to one) equals
the step applied with the averaged ``eps_hat``. At **every** step the tile outputs are blended
into the full canvas and the canvas is cut again for the next step, so neighbouring tiles
agree on x_t throughout the trajectory and no seams build up.

Plan along one axis of length L with tile P and overlap O (P <= L): starts 0, P-O, 2(P-O), ...
and the last tile flush with the edge (start L - P), so every pixel is covered and no tile
leaves the canvas. Blending weights: a separable linear ramp (1 at a tile's interior, falling
to 1/(O+1) at its border over O pixels), divided by the sum over the tiles covering each
pixel, so the weights of every pixel sum to exactly one. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TilePlan", "axis_starts", "plan_tiles", "ramp", "TileBlender"]


def axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile origins along one axis: stride ``tile - overlap``, the last one flush with the end."""
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be positive, got {length} and {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1} for tile {tile}, got {overlap}")
    if tile >= length:
        return (0,)
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one canvas (height x width) go; every tile is tile_h x tile_w."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    origins: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origins", tuple((y, x) for y in self.ys for x in self.xs))

    def __len__(self) -> int:
        return len(self.origins)

    def slices(self, k: int) -> tuple[slice, slice]:
        y, x = self.origins[k]
        return slice(y, y + self.tile_h), slice(x, x + self.tile_w)


def plan_tiles(height: int, width: int, tile: int | tuple[int, int], overlap: int, *, multiple: int = 1) -> TilePlan:
    """Tiles of ``tile`` pixels (capped at the canvas size) overlapping by ``overlap``.

    ``tile`` (and the canvas, when smaller) must be multiples of ``multiple`` so every tile is a
    valid engine input; the overlap is capped at tile - 1 on an axis whose tile is capped.
    """
    th, tw = (tile, tile) if isinstance(tile, (int, np.integer)) else tile
    th, tw = min(int(th), height), min(int(tw), width)
    for name, v in (("tile height", th), ("tile width", tw)):
        if v < 1 or v % multiple:
            raise ValueError(f"{name} {v} must be a positive multiple of {multiple}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    oy, ox = min(overlap, th - 1), min(overlap, tw - 1)
    return TilePlan(height=height, width=width, tile_h=th, tile_w=tw, overlap=overlap,
                    ys=axis_starts(height, th, oy), xs=axis_starts(width, tw, ox))


def ramp(size: int, overlap: int) -> np.ndarray:
    """1-D window: min(1, (i+1)/(O+1), (size-i)/(O+1)); strictly positive, 1 in the interior."""
    i = np.arange(size, dtype=np.float64)
    o = max(int(overlap), 0) + 1
    return np.minimum(1.0, np.minimum(i + 1, size - i) / o)


class TileBlender:
    """Cuts a [C, H, W] canvas into the plan's tiles and blends tiles back with normalised weights.

    ``weights[k]`` ([tile_h, tile_w], float32) is tile k's share of each of its pixels; for
    every canvas pixel the shares of the tiles covering it sum to one.
    """

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        window = np.outer(ramp(plan.tile_h, min(plan.overlap, plan.tile_h - 1)),
                          ramp(plan.tile_w, min(plan.overlap, plan.tile_w - 1)))
        total = np.zeros((plan.height, plan.width), dtype=np.float64)
        for k in range(len(plan)):
            total[plan.slices(k)] += window
        if not np.all(total > 0):  # pragma: no cover - guaranteed by axis_starts
            raise AssertionError("tile plan leaves pixels uncovered")
        self.weights = np.stack([(window / total[plan.slices(k)]) for k in range(len(plan))]).astype(np.float32)

    def cut(self, canvas: np.ndarray, out: np.ndarray, indices: range | list[int]) -> np.ndarray:
        """Copy tiles ``indices`` of ``canvas`` [C, H, W] into ``out`` [len(indices) or more, C, th, tw]."""
        for j, k in enumerate(indices):
            ys, xs = self.plan.slices(k)
            np.copyto(out[j], canvas[:, ys, xs])
        return out

    def accumulate(self, tiles: np.ndarray, indices: range | list[int], acc: np.ndarray) -> None:
        """acc[:, tile k] += weights[k] * tiles[j] for the j-th of ``indices`` (acc starts at zero)."""
        for j, k in enumerate(indices):
            ys, xs = self.plan.slices(k)
            acc[:, ys, xs] += self.weights[k] * tiles[j]

    def blend(self, tiles: np.ndarray) -> np.ndarray:
        """All tiles [K, C, th, tw] -> the blended canvas [C, H, W] (float32)."""
        acc = np.zeros((tiles.shape[1], self.plan.height, self.plan.width), dtype=np.float32)
        self.accumulate(tiles, range(len(self.plan)), acc)
        return acc
