"""The torch reference DDIM sampler against the numpy schedule, padding, and pixel conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from runtime.schedule import DDIMSchedule, frame_noise, initial_noise
from training.config import model_preset
from training.diffusion import ddim_sample, pad_to_multiple, to_tensor, to_uint8
from training.multiscale import MultiScaleEstimator


class LinearEstimator(nn.Module):
    """eps_hat = 0.3 x_t - 0.2 cond + t / 2000: simple, exact in numpy too."""

    size_multiple = 4

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, cond, t):
        return 0.3 * x_t - 0.2 * cond + t[:, None, None, None] / 2000.0


def test_ddim_matches_numpy_schedule_loop():
    rng = np.random.default_rng(0)
    cond = rng.uniform(-1, 1, (2, 3, 8, 12)).astype(np.float32)
    x0, traj = ddim_sample(LinearEstimator(), torch.from_numpy(cond), steps=10, seed=3, return_trajectory=True)
    sched = DDIMSchedule()
    x = frame_noise(2, 8, 12, 3).astype(np.float64)  # every frame the same draw, as in the runtime
    for t in sched.set_timesteps(10):
        eps = 0.3 * x - 0.2 * cond + t / 2000.0
        x, _ = sched.step(eps, int(t), x)
    np.testing.assert_allclose(x0.numpy(), x, atol=2e-5)
    assert len(traj) == 10
    assert np.array_equal(traj[0]["x_t"], np.repeat(initial_noise((1, 3, 8, 12), 3), 2, axis=0))
    assert traj[0]["t"].tolist() == [901.0, 901.0] and traj[-1]["t"].tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(traj[3]["coef"][0], sched.coefficients()[3])
    assert traj[0]["coef"].shape == (2, 4) and traj[0]["coef"].dtype == np.float32


def test_any_size_is_padded_and_cropped_back():
    torch.manual_seed(0)
    est = MultiScaleEstimator(model_preset("tiny").estimator).eval()
    cond = torch.rand(1, 3, 13, 21) * 2 - 1
    x0, traj = ddim_sample(est, cond, steps=2, seed=0, return_trajectory=True)
    assert x0.shape == (1, 3, 13, 21)
    assert traj[0]["x_t"].shape == (1, 3, 16, 24)  # noise drawn at the padded shape
    np.testing.assert_array_equal(traj[0]["cond"][..., :13, :21], cond.numpy())
    again = ddim_sample(est, cond, steps=2, seed=0)
    assert torch.equal(x0, again)
    assert not torch.equal(x0, ddim_sample(est, cond, steps=2, seed=1))


@pytest.mark.parametrize("h,w,m", [(13, 21, 8), (1, 1, 8), (3, 2, 16), (16, 16, 8)])
def test_pad_to_multiple(h, w, m):
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    y, size = pad_to_multiple(x, m)
    assert size == (h, w) and y.shape[-2] % m == 0 and y.shape[-1] % m == 0
    assert torch.equal(y[..., :h, :w], x)
    if h > 1 and y.shape[-2] > h:
        assert torch.equal(y[..., h, :w], x[..., h - 2, :])  # reflect, not replicate


def test_pixel_conversion_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    assert float(t.min()) >= -1 and float(t.max()) <= 1
    assert np.array_equal(to_uint8(t), img)
    assert to_uint8(torch.full((3, 2, 2), 5.0)).max() == 255  # clipped
    with pytest.raises(ValueError):
        to_tensor(img.astype(np.float32))
