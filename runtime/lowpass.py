"""The low-pass refine blend: how much of the refiner's correction a predict-and-refine output keeps.

The refiner returns x_0 = P(y) + d, its correction d of the predictor's estimate P(y). The runtime
keeps a share a of it (the manifest's ``prologue.refine_strength``), either the whole correction at
that share, ``P(y) + a * d``, or, with a low-pass sigma > 0 (``prologue.refine_lowpass``), only its
low frequencies, ``P(y) + a * G_sigma(d)``: a Gaussian blur of sigma pixels over the frame, which
keeps the refiner's correction of the rain's level (smooth across the frame) and drops the grain
a small refiner run for 2 steps leaves (docs/quality.md). The blur is a whole-frame operation: the
Derainer applies it once to the stitched frame, tiled or not, so the output of a tiled frame is
this formula on its stitched x_0 and P(y).

The Gaussian is scipy.ndimage.gaussian_filter's (mode "reflect", the edge pixel repeated, truncate
4: the kernel's radius is int(4 sigma + 0.5)); numpy only, run as banded matrix products in blocks
of columns, then of rows (BLAS), so a 720p frame takes tens of milliseconds and memory stays a few
frame-sized buffers.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["REFINE_LOWPASS_MAX", "gaussian_blur", "keep_correction", "refine_lowpass_error"]

#: the largest low-pass sigma a manifest or option may ask for, in pixels
REFINE_LOWPASS_MAX = 64.0
_TRUNCATE = 4.0
_BLOCK = 256  # output columns / rows per matrix product


def refine_lowpass_error(v: Any) -> str | None:
    """Why ``v`` is not a low-pass sigma (a number in [0, REFINE_LOWPASS_MAX] pixels; 0 = off), or None."""
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
            or not 0.0 <= v <= REFINE_LOWPASS_MAX):
        return f"must be a number of pixels in [0, {REFINE_LOWPASS_MAX:g}] (0 = off), got {v!r}"
    return None


@lru_cache(maxsize=8)
def _band(sigma: float) -> tuple[int, np.ndarray]:
    """(radius, B) with B[i, j] = k[i - j], [BLOCK + 2 r, BLOCK]: one block of the blur as a product."""
    r = int(_TRUNCATE * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    band = np.zeros((_BLOCK + 2 * r, _BLOCK), np.float32)
    for j in range(_BLOCK):
        band[j:j + 2 * r + 1, j] = k
    band.flags.writeable = False
    return r, band


def _blur_axis(x: np.ndarray, axis: int, r: int, band: np.ndarray) -> np.ndarray:
    """One pass of the separable blur along ``axis`` (-1: columns, -2: rows) of [..., H, W]."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="symmetric")  # scipy's "reflect": d c b a | a b c d | d c b a
    out = np.empty_like(x)
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        b = band[:m + 2 * r, :m]
        if axis == x.ndim - 1:
            np.matmul(xp[..., s:s + m + 2 * r], b, out=out[..., s:s + m])
        else:
            np.matmul(b.T, xp[..., s:s + m + 2 * r, :], out=out[..., s:s + m, :])
    return out


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of sigma pixels over the last two axes of float32 ``x`` [..., H, W] (a new array).

    Equal to ``scipy.ndimage.gaussian_filter(x, (0, ..., sigma, sigma), mode="reflect")`` within
    float32 rounding; sigma 0 returns a copy.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"gaussian_blur needs [..., H, W], got shape {x.shape}")
    if sigma == 0:
        return x.copy()
    if why := refine_lowpass_error(sigma):
        raise ValueError(f"sigma {why}")
    r, band = _band(float(sigma))
    return _blur_axis(_blur_axis(x, x.ndim - 1, r, band), x.ndim - 2, r, band)


def keep_correction(x_0: np.ndarray, estimate: np.ndarray, strength: float, lowpass: float = 0.0) -> None:
    """x_0 <- P(y) + a * d, or P(y) + a * G_sigma(d) with a low-pass sigma > 0, in place (d = x_0 - P(y)).

    ``x_0`` and ``estimate`` are [..., H, W] float32 frames of one shape: the refiner's output and
    the predictor's estimate P(y) of the same (whole) frames.
    """
    np.subtract(x_0, estimate, out=x_0)
    if lowpass:  # one [H, W] plane at a time: the blur's padded copy and output stay a plane's size
        for idx in np.ndindex(x_0.shape[:-2]):
            x_0[idx] = gaussian_blur(x_0[idx], lowpass)
    if strength != 1.0:
        x_0 *= np.float32(strength)
    x_0 += estimate
