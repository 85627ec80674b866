"""runtime.lowpass: the Gaussian blur equals scipy's, and the kept correction is P + a * G(x_0 - P)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.lowpass import REFINE_LOWPASS_MAX, gaussian_blur, keep_correction, refine_lowpass_error

scipy_ndimage = pytest.importorskip("scipy.ndimage")


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 40, 33), (3, 300, 517), (3, 1, 9), (1, 600, 20)])
@pytest.mark.parametrize("sigma", [0.7, 3.0, 8.0])
def test_blur_equals_scipy_gaussian_filter(shape, sigma):
    """Every size, including frames smaller than the kernel's radius (reflected again) and more
    than one block of columns / rows (256)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = scipy_ndimage.gaussian_filter(x.astype(np.float64), [0] * (x.ndim - 2) + [sigma, sigma], mode="reflect")
    got = gaussian_blur(x, sigma)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_blur_keeps_a_constant_and_its_input():
    x = np.full((3, 20, 30), 0.25, np.float32)
    x_before = x.copy()
    np.testing.assert_allclose(gaussian_blur(x, 8.0), x, atol=1e-6)
    np.testing.assert_array_equal(x, x_before)
    zero = gaussian_blur(x, 0)
    np.testing.assert_array_equal(zero, x)
    assert zero is not x


def test_keep_correction():
    rng = np.random.default_rng(1)
    x0, p = (rng.standard_normal((2, 3, 30, 40)).astype(np.float32) for _ in range(2))
    out = x0.copy()
    keep_correction(out, p, 0.5)
    np.testing.assert_allclose(out, p + 0.5 * (x0 - p), atol=1e-6)
    out = x0.copy()
    keep_correction(out, p, 0.75, 4.0)
    np.testing.assert_allclose(out, p + 0.75 * gaussian_blur(x0 - p, 4.0), atol=1e-6)


@pytest.mark.parametrize("bad", [-0.5, REFINE_LOWPASS_MAX + 1, float("nan"), float("inf"), True, "8", None])
def test_bad_sigma(bad):
    assert "must be a number of pixels in [0, 64]" in refine_lowpass_error(bad)
    with pytest.raises(ValueError, match="sigma must be a number of pixels"):
        gaussian_blur(np.zeros((2, 2), np.float32), bad)
    assert refine_lowpass_error(0) is None and refine_lowpass_error(REFINE_LOWPASS_MAX) is None
