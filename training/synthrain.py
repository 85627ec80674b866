"""A synthetic rain-streak renderer (seeded, deterministic).

Model: sparse random drops (density = fraction of pixels seeding a drop, each with a random
intensity up to ``brightness``) are motion-blurred by an anti-aliased line kernel (length,
angle from vertical, Gaussian cross-section ``width``), giving a streak layer S in [0, 1];
it is composited onto the clean image I in [0, 1] by a screen blend, 1 - (1 - I)(1 - S), and an
optional veil (``haze``, rain accumulation) mixes towards a bright atmospheric light A:
out = (1 - haze) * screen + haze * A (A = 0.95). Both brighten (the veil only darkens pixels
already above A), as real rain does (DESIGN.md's brightness confound).

Used for tests, demos, paired evaluation sets made from clean photos, and, in training's
``--ntb synthetic`` mode, as a weak prior for G_A (:func:`rain_batch`, the torch form).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import fftconvolve

__all__ = ["PARAM_RANGES", "sample_params", "streak_kernel", "render_rain", "rain_batch"]

#: Uniform ranges the random parameters are drawn from.
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "angle": (-25.0, 25.0),  # degrees from vertical
    "length": (8.0, 24.0),  # pixels
    "width": (0.5, 1.2),  # Gaussian sigma across the streak, pixels
    "density": (0.004, 0.015),  # fraction of pixels that seed a drop
    "brightness": (0.5, 0.95),  # max streak intensity
    "haze": (0.0, 0.12),  # veil strength
}
_MAX_KERNEL = 2 * math.ceil(PARAM_RANGES["length"][1] / 2 + 2) + 1


def sample_params(rng: np.random.Generator) -> dict[str, float]:
    """One random draw of every parameter (in PARAM_RANGES' order)."""
    return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in PARAM_RANGES.items()}


def streak_kernel(angle: float, length: float, width: float, size: int | None = None) -> np.ndarray:
    """Anti-aliased line segment (peak 1) of ``length`` px at ``angle`` degrees from vertical."""
    size = size or 2 * math.ceil(length / 2 + 2) + 1
    r = np.arange(size, dtype=np.float64) - size // 2
    v, u = np.meshgrid(r, r, indexing="ij")  # v down, u right
    th = math.radians(angle)
    dx, dy = math.sin(th), math.cos(th)  # unit direction of the streak
    along = u * dx + v * dy
    across = -u * dy + v * dx
    half = length / 2.0
    outside = np.clip(np.abs(along) - half, 0.0, None)  # soft, tapered ends
    k = np.exp(-0.5 * (across / width) ** 2) * np.exp(-0.5 * (outside / max(width, 0.5)) ** 2)
    return (k / k.max()).astype(np.float32)


def _composite(img01: np.ndarray, streaks: np.ndarray, haze: float, light: float = 0.95) -> np.ndarray:
    screen = 1.0 - (1.0 - img01) * (1.0 - streaks[..., None])
    return (1.0 - haze) * screen + haze * max(light, 0.0)


def render_rain(clean_u8: np.ndarray, seed: int, **params: float) -> np.ndarray:
    """Render rain onto an HxWx3 uint8 image; parameters not given are drawn from ``seed``.

    Parameters: angle, length, width, density, brightness, haze (see ``PARAM_RANGES``).
    Same (image, seed, params) -> same output, bit for bit.
    """
    arr = np.asarray(clean_u8)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"render_rain expects HxWx3 uint8, got {arr.dtype} {arr.shape}")
    unknown = set(params) - set(PARAM_RANGES)
    if unknown:
        raise ValueError(f"unknown rain parameters {sorted(unknown)}; valid: {list(PARAM_RANGES)}")
    rng = np.random.Generator(np.random.PCG64(seed))
    p = sample_params(rng)
    p.update({k: float(v) for k, v in params.items()})
    h, w = arr.shape[:2]
    drops = (rng.random((h, w)) < p["density"]) * rng.uniform(0.3, 1.0, (h, w)) * p["brightness"]
    kernel = streak_kernel(p["angle"], p["length"], p["width"])
    streaks = np.clip(fftconvolve(drops, kernel, mode="same"), 0.0, 1.0)
    out = _composite(arr.astype(np.float64) / 255.0, streaks, p["haze"])
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def rain_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Torch batch form for the training loss: x [N, 3, H, W] in [-1, 1] -> rainy x, same range.

    Each sample gets its own parameters; all randomness comes from ``generator`` (a CPU
    torch.Generator whose state the checkpoint saves). One grouped convolution renders the
    whole batch (a few ms for 4 x 128 x 128 on CPU). No gradient flows through it.
    """
    n, _, h, w = x.shape
    with torch.no_grad():
        u = torch.rand(n, len(PARAM_RANGES), generator=generator, dtype=torch.float64)
        params = [{k: lo + (hi - lo) * float(u[i, j]) for j, (k, (lo, hi)) in enumerate(PARAM_RANGES.items())}
                  for i in range(n)]
        kernels = torch.from_numpy(np.stack([
            streak_kernel(p["angle"], p["length"], p["width"], size=_MAX_KERNEL) for p in params]))[:, None]
        density = torch.tensor([p["density"] for p in params])[:, None, None, None]
        bright = torch.tensor([p["brightness"] for p in params])[:, None, None, None]
        haze = torch.tensor([p["haze"] for p in params])[:, None, None, None]
        seeds = torch.rand(n, 1, h, w, generator=generator)
        amp = 0.3 + 0.7 * torch.rand(n, 1, h, w, generator=generator)
        drops = (seeds < density).float() * amp * bright
        pad = _MAX_KERNEL // 2
        # The randomness is drawn on the CPU (the checkpointed generator); the convolution runs on
        # x's device (on a GPU it would otherwise cost more than the training step).
        drops, kernels = drops.to(x.device), kernels.to(x.device)
        streaks = F.conv2d(F.pad(drops.reshape(1, n, h, w), (pad, pad, pad, pad)), kernels, groups=n)
        streaks = streaks.reshape(n, 1, h, w).clamp(0.0, 1.0).to(x.dtype)
        img01 = (x.detach() + 1.0) * 0.5
        screen = 1.0 - (1.0 - img01) * (1.0 - streaks)
        out = (1.0 - haze.to(x.device, x.dtype)) * screen + haze.to(x.device, x.dtype) * 0.95
        return (out * 2.0 - 1.0).clamp(-1.0, 1.0)
