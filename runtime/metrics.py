"""Quality metrics on the Y channel, as deraining papers report them (numpy; SSIM also scikit-image).

``rgb_to_y`` follows MATLAB's ``rgb2ycbcr`` on uint8 input (BT.601, studio range 16..235) and
rounds to integers as MATLAB's uint8 output does, so PSNR / SSIM match the papers' MATLAB code.

Beware the brightness confound (docs/ARCHITECTURE.md): rain brightens images, so a global darkening alone
raises PSNR. Score against :func:`brightness_matched` input too, and look at
:func:`change_correlation` (does the output change the rainy image the way the clean image does?).

scikit-image (the [eval] and [train] extras) is imported only by :func:`ssim_y`, so PSNR and the
rest work on the base install; without it ``ssim_y`` and :func:`require_ssim` raise a one-line
DependencyError naming the extra.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rgb_to_y", "psnr_y", "ssim_y", "require_ssim", "brightness_matched", "change_correlation"]

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _check_rgb(img: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name}: expected HxWx3 uint8, got {arr.dtype} {arr.shape}")
    return arr


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y = round(16 + (65.481 R + 128.553 G + 24.966 B) / 255) for uint8 RGB; float64 HxW in 16..235."""
    arr = _check_rgb(img, "rgb_to_y").astype(np.float64)
    return np.round(16.0 + arr @ _Y_WEIGHTS / 255.0)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_rgb(a, "a"), _check_rgb(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return rgb_to_y(a), rgb_to_y(b)


def psnr_y(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, peak 255) between the Y channels; inf for identical Y."""
    ya, yb = _pair(a, b)
    mse = float(np.mean((ya - yb) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def require_ssim():
    """scikit-image's ``structural_similarity``, or DependencyError (exit 6) naming the [eval] extra.

    Call it before a long loop so a missing extra fails at once, not on every item.
    """
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        from runtime.extras import missing

        raise missing("skimage", needed_for="SSIM") from None
    return structural_similarity


def ssim_y(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM between the Y channels (Wang et al. settings: Gaussian window sigma 1.5, K1 .01, K2 .03)."""
    ya, yb = _pair(a, b)
    structural_similarity = require_ssim()
    return float(structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255, K1=0.01, K2=0.03))


def brightness_matched(inp: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``inp`` after its best global brightness shift towards ``ref`` (uint8 HxWx3).

    One scalar offset is added to all three channels so that the mean of Y(inp) equals the mean
    of Y(ref) (the offset minimising the Y MSE, before rounding and clipping). A Y shift dY needs
    an RGB shift dY * 255 / 219 (the Y weights sum to 219 / 255).
    """
    yi, yr = _pair(inp, ref)
    delta = (yr.mean() - yi.mean()) * 255.0 / float(_Y_WEIGHTS.sum())
    return np.clip(np.round(inp.astype(np.float64) + delta), 0, 255).astype(np.uint8)


def change_correlation(out: np.ndarray, rainy: np.ndarray, clean: np.ndarray) -> float:
    """Pearson correlation on Y of (out - rainy) with (clean - rainy); 0 when either is constant."""
    yo, yr = _pair(out, rainy)
    yc = rgb_to_y(_check_rgb(clean, "clean"))
    if yc.shape != yr.shape:
        raise ValueError(f"images differ in shape: {clean.shape} vs {rainy.shape}")
    d_out = (yo - yr).ravel()
    d_ref = (yc - yr).ravel()
    d_out = d_out - d_out.mean()
    d_ref = d_ref - d_ref.mean()
    den = math.sqrt(float(d_out @ d_out) * float(d_ref @ d_ref))
    return 0.0 if den == 0 else float(d_out @ d_ref) / den
