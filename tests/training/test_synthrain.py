"""The synthetic rain renderer: deterministic per seed, brightens, adds oriented streaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.synthrain import rain_batch, render_rain, streak_kernel


def scene(h=64, w=80):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + xx, 80 + yy // 2, np.full_like(xx, 90)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_deterministic_per_seed():
    img = scene()
    a, b, c = render_rain(img, seed=1), render_rain(img, seed=1), render_rain(img, seed=2)
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_brightens_and_adds_streaks():
    img = scene()
    out = render_rain(img, seed=0, haze=0.0, density=0.01, brightness=0.8, angle=0.0, length=16)
    diff = out.astype(int) - img.astype(int)
    assert (diff >= 0).all()  # screen blend never darkens
    changed = (diff.max(axis=2) > 10)
    assert 0.02 < changed.mean() < 0.6
    # vertical streaks: the change correlates far more along columns than along rows
    d = diff.mean(axis=2).astype(float)
    d -= d.mean()
    vert = (d[1:] * d[:-1]).mean() / d.var()
    horiz = (d[:, 1:] * d[:, :-1]).mean() / d.var()
    assert vert > 0.8 and vert > horiz + 0.3
    assert out.mean() > img.mean() + 3


def test_no_rain_is_identity():
    img = scene()
    assert np.array_equal(render_rain(img, seed=0, density=0.0, haze=0.0), img)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown rain parameters"):
        render_rain(scene(), seed=0, colour=3)
    with pytest.raises(ValueError, match="uint8"):
        render_rain(scene().astype(np.float32), seed=0)


def test_kernel_is_a_line_at_the_angle():
    k = streak_kernel(0.0, 10, 0.7)
    assert k.max() == pytest.approx(1.0)
    c = k.shape[0] // 2
    assert k[c - 4, c] > 0.9 and k[c, c + 4] < 0.01  # vertical line
    k45 = streak_kernel(45.0, 10, 0.7)
    assert k45[c + 3, c + 3] > 0.9  # angle from vertical, towards +u for +v


def test_torch_batch_version():
    x = torch.rand(3, 3, 32, 32) * 1.6 - 0.8
    a = rain_batch(x, torch.Generator().manual_seed(0))
    b = rain_batch(x, torch.Generator().manual_seed(0))
    c = rain_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert float((a - x).mean()) > 0.01  # brightens
    assert not torch.equal(a[0] - x[0], a[1] - x[1])  # per-sample parameters


@pytest.mark.parametrize("style", ["v2", "v3", "v4"])
def test_every_style_is_seeded_in_range_and_brightens(style):
    x = torch.rand(4, 3, 48, 48) * 1.6 - 0.8
    a = rain_batch(x, torch.Generator().manual_seed(0), style)
    assert torch.equal(a, rain_batch(x, torch.Generator().manual_seed(0), style))
    assert not torch.equal(a, rain_batch(x, torch.Generator().manual_seed(1), style))
    assert a.shape == x.shape and float(a.min()) >= -1 and float(a.max()) <= 1
    assert float((a - x).mean()) > 0.01


def test_v4_is_v1_plus_a_dense_field_added_on_most_samples():
    """v4 draws after v1 (v1's streaks stay bit-exact): on a dark image, where v1's veil and
    clipping are negligible, v4 - v1 is a non-negative field covering most pixels of the samples
    that drew it, with a mean in the drawn level range, and exactly 0 on the others."""
    n = 16
    x = torch.full((n, 3, 64, 64), -0.9)
    v1 = rain_batch(x, torch.Generator().manual_seed(3), "v1")
    v4 = rain_batch(x, torch.Generator().manual_seed(3), "v4")
    extra = ((v4 - v1) / 2.0)[:, 0]  # in [0, 1] units
    assert float(extra.min()) >= -1e-6
    with_field = extra.mean(dim=(1, 2)) > 1e-4
    assert 6 <= int(with_field.sum()) < n  # three samples in four, on average
    assert float(extra[~with_field].abs().max()) < 1e-6
    covered = (extra[with_field] > 0.005).float().mean(dim=(1, 2))
    assert float(covered.min()) > 0.5  # dense: v1's sparse streaks cover far less
    v1_add = ((v1 - x) / 2.0)[:, 0]
    v1_streaks = v1_add - v1_add.flatten(1).median(dim=1).values[:, None, None]  # above v1's uniform veil
    v1_cover = (v1_streaks > 0.005).float().mean()
    assert float(v1_cover) < float(covered.mean()) / 2
    level = extra[with_field].mean(dim=(1, 2))
    assert float(level.min()) > 0.01 and float(level.max()) < 0.2
