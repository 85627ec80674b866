"""Y-channel PSNR / SSIM (MATLAB rgb2ycbcr BT.601), brightness matching, change correlation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from runtime.metrics import brightness_matched, change_correlation, psnr_y, rgb_to_y, ssim_y


def gray(v, shape=(8, 8)):
    return np.full((*shape, 3), v, np.uint8)


def test_rgb_to_y_hand_values():
    assert rgb_to_y(gray(0))[0, 0] == 16
    assert rgb_to_y(gray(255))[0, 0] == 235
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert rgb_to_y(red)[0, 0] == 81  # round(16 + 65.481)
    px = np.array([[[100, 150, 200]]], np.uint8)
    assert rgb_to_y(px)[0, 0] == round(16 + (65.481 * 100 + 128.553 * 150 + 24.966 * 200) / 255)  # 138
    assert rgb_to_y(px).dtype == np.float64


def test_psnr_hand_value():
    # Y: 16 vs 235 everywhere -> PSNR = 20 log10(255 / 219)
    assert psnr_y(gray(0), gray(255)) == pytest.approx(20 * math.log10(255 / 219), abs=1e-12)
    assert psnr_y(gray(7), gray(7)) == math.inf


def test_agrees_with_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    assert psnr_y(a, b) == pytest.approx(peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-10)
    ref = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255, K1=0.01, K2=0.03)
    assert ssim_y(a, b) == pytest.approx(ref, abs=1e-12)
    assert 0 < ssim_y(a, b) < 1 and ssim_y(a, a) == pytest.approx(1.0)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(gray(0, (4, 4)), gray(0, (4, 5)))
    with pytest.raises(ValueError, match="uint8"):
        ssim_y(gray(0).astype(np.float32), gray(0))


def test_brightness_matched_undoes_a_global_shift():
    rng = np.random.default_rng(1)
    clean = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    rainy = (clean.astype(int) + 30).astype(np.uint8)
    matched = brightness_matched(rainy, clean)
    assert psnr_y(rainy, clean) < 20
    assert psnr_y(matched, clean) > 45
    assert abs(rgb_to_y(matched).mean() - rgb_to_y(clean).mean()) < 0.5


def test_change_correlation():
    rng = np.random.default_rng(2)
    clean = rng.integers(40, 200, (16, 16, 3), dtype=np.uint8)
    rainy = np.clip(clean.astype(int) + rng.integers(0, 40, clean.shape), 0, 255).astype(np.uint8)
    assert change_correlation(clean, rainy, clean) == pytest.approx(1.0)
    assert change_correlation(rainy, rainy, clean) == 0.0
    darker = np.clip(rainy.astype(int) - 10, 0, 255).astype(np.uint8)  # global darkening only
    assert abs(change_correlation(darker, rainy, clean)) < 0.1  # ~0 up to the rounding of Y


def test_metrics_never_import_torch():
    code = "import sys, runtime.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
