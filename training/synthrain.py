"""A synthetic rain-streak renderer (seeded, deterministic).

Model: sparse random drops (density = fraction of pixels seeding a drop, each with a random
intensity up to ``brightness``) are motion-blurred by an anti-aliased line kernel (length,
angle from vertical, Gaussian cross-section ``width``), giving a streak layer S in [0, 1];
it is composited onto the clean image I in [0, 1] by a screen blend, 1 - (1 - I)(1 - S), and an
optional veil (``haze``, rain accumulation) mixes towards a bright atmospheric light A:
out = (1 - haze) * screen + haze * A (A = 0.95). Both brighten (the veil only darkens pixels
already above A), as real rain does (docs/ARCHITECTURE.md's brightness confound).

Used for tests, demos, paired evaluation sets made from clean photos, and, in training's
``--ntb synthetic`` / ``render`` modes, as the rainy half of the clean photos' pairs
(:func:`rain_batch`, the torch form).

:func:`rain_batch` has four styles. ``v1`` is the model above (one streak layer, light veil).
``v2`` draws what heavy rain in the wild looks like: a light or a heavy regime per sample (half
each), two or three streak layers per sample, each with its own angle around a common direction
(multi-directional in the heavy regime), length, density and width (a wider, dimmer streak is a
nearer, out-of-focus one: the depth blur), merged by a screen blend, and a veil whose strength
and atmospheric light are drawn too (up to 0.45 in the heavy regime: rain accumulation and haze).
``v3`` keeps v1's streaks under a veil drawn from wider ranges (strength 0..0.4, atmospheric
light 0.7..1): the dev sets' rain is hazy, which v1's light veil (at most 0.12) does not teach.
``v4`` adds to v1's streaks a dense rain field, added rather than screened: many faint seeds
motion-blurred by one long kernel (20-60 px, near v1's angle), scaled to a drawn mean level
(0.02-0.16), on three samples in four. Measured on the dev sets' pairs, their rain is of that
kind: ``rainy - clean`` is a dense field of overlapping long streaks whose level does not depend
on the clean intensity (a fit of rainy = (1 - v) clean + v A gives v = 0.00 on ``dev/sirr``), with
a median of 18 grey levels there, while v1's sparse streaks leave most pixels untouched.
docs/quality.md measures each style against v1 with a fixed short training on both dev sets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import fftconvolve

__all__ = ["PARAM_RANGES", "RAIN_STYLES", "sample_params", "streak_kernel", "render_rain", "rain_batch"]

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

#: The styles :func:`rain_batch` renders (see the module docstring).
RAIN_STYLES = ("v1", "v2", "v3", "v4")
#: v3: v1's streaks under a drawn veil (rain accumulation / haze): strength and atmospheric light
_V3_HAZE, _V3_LIGHT = (0.0, 0.4), (0.7, 1.0)
#: v4's dense field: probability per sample, seed density, kernel length / width, angle jitter
#: around v1's angle (degrees), mean level added (in [0, 1] units)
_V4 = {"p": 0.75, "density": (0.02, 0.12), "length": (20.0, 60.0), "width": (0.5, 1.5), "jitter": 5.0,
       "level": (0.02, 0.16)}
_V4_MAX_KERNEL = 2 * math.ceil(_V4["length"][1] / 2 + 2) + 1

#: v2's ranges per regime (light, heavy); each layer draws its own angle offset, length, width, density.
_V2 = {
    "light": {"layers": (2, 2), "spread": 4.0, "length": (8.0, 24.0), "width": (0.5, 1.4),
              "density": (0.002, 0.008), "brightness": (0.45, 0.95), "haze": (0.0, 0.12)},
    "heavy": {"layers": (2, 3), "spread": 12.0, "length": (16.0, 44.0), "width": (0.6, 2.0),
              "density": (0.006, 0.022), "brightness": (0.55, 1.0), "haze": (0.08, 0.45)},
}
_V2_ANGLE = (-30.0, 30.0)
_V2_LIGHT = (0.75, 1.0)  # atmospheric light of the veil
_V2_MAX_KERNEL = 2 * math.ceil(_V2["heavy"]["length"][1] / 2 + 2) + 1


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


def rain_batch(x: torch.Tensor, generator: torch.Generator, style: str = "v1") -> torch.Tensor:
    """Torch batch form for the training loss: x [N, 3, H, W] in [-1, 1] -> rainy x, same range.

    Each sample gets its own parameters; all randomness comes from ``generator`` (a CPU
    torch.Generator whose state the checkpoint saves). One grouped convolution renders the
    whole batch (a few ms for 4 x 128 x 128 on CPU). No gradient flows through it.
    ``style`` is one of :data:`RAIN_STYLES` (the module docstring).
    """
    if style == "v2":
        return _rain_batch_v2(x, generator)
    if style not in ("v1", "v3", "v4"):
        raise ValueError(f"rain style must be one of {', '.join(RAIN_STYLES)}, got {style!r}")
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
        light = torch.full((n, 1, 1, 1), 0.95, dtype=torch.float64)
        if style == "v3":  # the veil drawn from its own, wider ranges (after v1's draws: v1 stays bit-exact)
            u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
            haze = _uniform(u[:, 0], *_V3_HAZE)[:, None, None, None]
            light = _uniform(u[:, 1], *_V3_LIGHT)[:, None, None, None]
        if style == "v4":  # the dense field, drawn after v1's draws (v1 stays bit-exact)
            angles = [p["angle"] for p in params]
            screen = (screen + _dense_field(n, h, w, angles, generator, x.device).to(x.dtype)).clamp(0.0, 1.0)
        hz, a = haze.to(x.device, x.dtype), light.to(x.device, x.dtype)
        out = (1.0 - hz) * screen + hz * a
        return (out * 2.0 - 1.0).clamp(-1.0, 1.0)


def _conv_same_fft(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each [..., h, w] map of ``x`` linearly convolved with its square odd-sized kernel of ``k``
    ([..., K, K]), cropped to the map's size ('same'): in the frequency domain, for the long kernels."""
    h, w = x.shape[-2:]
    size = k.shape[-1]
    fh, fw = h + size - 1, w + size - 1
    spec = torch.fft.rfft2(x, s=(fh, fw)) * torch.fft.rfft2(k, s=(fh, fw))
    pad = size // 2
    return torch.fft.irfft2(spec, s=(fh, fw))[..., pad:pad + h, pad:pad + w]


def _dense_field(n: int, h: int, w: int, angles: list[float], generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """v4's dense rain field [n, 1, h, w] on ``device`` (0 on the samples drawn without it), in [0, 1]
    units. Drawn on the CPU from ``generator``; the convolution runs on ``device``, as in v1 and v2."""
    r = _V4
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    kernels = np.stack([streak_kernel(angles[i] + r["jitter"] * float(2.0 * u[i, 0] - 1.0),
                                      float(_uniform(u[i, 1], *r["length"])), float(_uniform(u[i, 2], *r["width"])),
                                      size=_V4_MAX_KERNEL) for i in range(n)])
    density = _uniform(u[:, 3], *r["density"]).float()[:, None, None, None]
    level = (_uniform(u[:, 4], *r["level"]) * (u[:, 5] < r["p"])).float()[:, None, None, None]
    seeds = torch.rand(n, 1, h, w, generator=generator)
    amp = torch.rand(n, 1, h, w, generator=generator)
    drops = ((seeds < density).float() * amp).to(device)
    field = _conv_same_fft(drops, torch.from_numpy(kernels)[:, None].to(device)).clamp(min=0.0)
    field = field / field.mean(dim=(2, 3), keepdim=True).clamp(min=1e-6) * level.to(device)
    return field.clamp(0.0, 0.6)


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _rain_batch_v2(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ``v2`` style of :func:`rain_batch`: regimes, several streak layers, a drawn veil."""
    n, _, h, w = x.shape
    n_layers = max(r["layers"][1] for r in _V2.values())
    with torch.no_grad():
        heavy = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        u = torch.rand(n, 3, generator=generator, dtype=torch.float64)  # angle, haze, light
        ul = torch.rand(n, n_layers, 5, generator=generator, dtype=torch.float64)  # per layer
        kernels, density, bright = [], torch.zeros(n, n_layers), torch.zeros(n, n_layers)
        haze = torch.zeros(n)
        for i in range(n):
            r = _V2["heavy" if bool(heavy[i]) else "light"]
            base = float(_uniform(u[i, 0], *_V2_ANGLE))
            haze[i] = float(_uniform(u[i, 1], *r["haze"]))
            active = r["layers"][0] + int(ul[i, 0, 4] < 0.5) * (r["layers"][1] - r["layers"][0])
            for j in range(n_layers):
                angle = base + r["spread"] * float(2.0 * ul[i, j, 0] - 1.0)
                length = float(_uniform(ul[i, j, 1], *r["length"]))
                width = float(_uniform(ul[i, j, 2], *r["width"]))
                kernels.append(streak_kernel(angle, length, width, size=_V2_MAX_KERNEL))
                if j < active:
                    density[i, j] = float(_uniform(ul[i, j, 3], *r["density"]))
                    # A wide (near, out-of-focus) streak spreads its light: dimmer per pixel.
                    bright[i, j] = float(_uniform(ul[i, j, 3], *r["brightness"])) * min(1.0, 0.8 / width)
        light = _uniform(u[:, 2], *_V2_LIGHT).float()
        seeds = torch.rand(n, n_layers, h, w, generator=generator)
        amp = 0.3 + 0.7 * torch.rand(n, n_layers, h, w, generator=generator)
        drops = (seeds < density[:, :, None, None]).float() * amp * bright[:, :, None, None]
        k = torch.from_numpy(np.stack(kernels)).reshape(n, n_layers, _V2_MAX_KERNEL, _V2_MAX_KERNEL)
        layers = _conv_same_fft(drops.to(x.device), k.to(x.device)).clamp(0.0, 1.0)
        streaks = (1.0 - torch.prod(1.0 - layers, dim=1, keepdim=True)).to(x.dtype)  # screen of the layers
        img01 = (x.detach() + 1.0) * 0.5
        screen = 1.0 - (1.0 - img01) * (1.0 - streaks)
        hz = haze.to(x.device, x.dtype)[:, None, None, None]
        out = (1.0 - hz) * screen + hz * light.to(x.device, x.dtype)[:, None, None, None]
        return (out * 2.0 - 1.0).clamp(-1.0, 1.0)
