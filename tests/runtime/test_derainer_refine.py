"""Derainer on a predict-and-refine artifact: the prologue once per frame, steps 0 = P(y), native tiles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rd_export"))

from rdx_helpers import one_torch_thread, write_random_checkpoint

from runtime.derainer import Derainer
from runtime.errors import UsageError


@pytest.fixture(scope="module")
def refine(tmp_path_factory):
    from rd_export.export import export_onnx
    from training.checkpoint import build_estimator, build_prologue, load_checkpoint

    d = tmp_path_factory.mktemp("refine_rt")
    with one_torch_thread():
        ck = write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual", crop=32)
        onnx = export_onnx(ck, d / "out", steps=3)
    c = load_checkpoint(ck)
    return onnx, build_estimator(c), build_prologue(c)


def reference(est, pro, frames_u8: np.ndarray, steps: int) -> np.ndarray:
    import torch

    from runtime.derainer import to_float
    from training.diffusion import ddim_sample

    with one_torch_thread(), torch.no_grad():
        return ddim_sample(est, torch.from_numpy(to_float(frames_u8)), steps=steps, seed=0, prologue=pro).numpy()


@pytest.mark.parametrize("steps", [0, 2, 3])
def test_matches_the_torch_reference(refine, steps):
    onnx, est, pro = refine
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)  # within the native tile: one pass
    with Derainer(onnx, steps=steps, threads=1) as d:
        got = d.sample(d_in := (frame[None].astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2).copy())
    want = reference(est, pro, frame[None], steps)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert d_in.shape == (1, 3, 24, 30)


def test_zero_steps_is_the_prologue_estimate(refine):
    import torch

    onnx, _, pro = refine
    frame = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with Derainer(onnx, steps=0, threads=1) as d:
        out = d.derain(frame)
    from runtime.derainer import to_float, to_uint8

    with torch.no_grad():
        b = pro(torch.from_numpy(to_float(frame[None])))[:, 3:].numpy()
    assert np.abs(out.astype(int) - to_uint8(b)[0].astype(int)).max() <= 1
    assert not np.array_equal(out, frame)


def test_batch_equals_single_frames(refine):
    onnx, _, _ = refine
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    with Derainer(onnx, steps=2, threads=1) as d:
        batched = d.derain_batch(frames)
        single = [d.derain(f) for f in frames]
    for a, b in zip(batched, single):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("steps", [0, 2])
def test_frames_beyond_the_native_tile_are_tiled_with_the_prologue_per_tile(refine, steps):
    """A frame larger than the native tile (32) goes through 32-px tiles; each tile runs the prologue
    on its own crop, so the output equals blending the torch reference's tiles."""
    import torch

    from runtime.derainer import to_float
    from runtime.tiling import TileBlender, plan_tiles
    from training.diffusion import ddim_sample
    from training.multiscale import fused_step

    onnx, est, pro = refine
    frame = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    with Derainer(onnx, steps=steps, threads=1) as d:
        assert d.native_tile == 32 and d.overlap == 8
        got = d.sample(to_float(frame[None]))[0]
    y = torch.from_numpy(to_float(frame[None]))[0]
    blender = TileBlender(plan_tiles(48, 64, 32, 8, multiple=d.size_multiple))
    tiles = torch.from_numpy(blender.cut(y.numpy(), np.zeros((len(blender.plan), 3, 32, 32), np.float32),
                                         range(len(blender.plan))))
    with one_torch_thread(), torch.no_grad():
        cond = pro(tiles)
        if steps == 0:
            want = blender.blend(cond[:, 3:].numpy())
        else:  # the fused step on every tile, blended after every step (Derainer's tiled loop)
            from runtime.schedule import DDIMSchedule, initial_noise, step_inputs

            s = DDIMSchedule()
            s.set_timesteps(steps)
            canvas = initial_noise((1, 3, 48, 64), 0)[0]
            for i in range(steps):
                t, coef = step_inputs(s.coefficients(), s.timesteps, i, len(blender.plan))
                x = torch.from_numpy(blender.cut(canvas, np.zeros((len(blender.plan), 3, 32, 32), np.float32),
                                                 range(len(blender.plan))))
                canvas = blender.blend(fused_step(est, x, cond, torch.from_numpy(t), torch.from_numpy(coef)).numpy())
            want = canvas
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    del ddim_sample


def test_zero_steps_refused_for_a_y_only_model(tiny_model):
    with pytest.raises(UsageError, match=r"steps must be an integer in 2\.\.1000, got 0"):
        Derainer(tiny_model.onnx, steps=0)


def test_leaving_the_native_tile_warns(refine):
    onnx, _, _ = refine
    with pytest.warns(UserWarning, match="tile 64 differs from the model's native tile size 32"):
        Derainer(onnx, steps=2, tile=64, threads=1).close()
